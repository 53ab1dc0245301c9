"""ONP's agent: a GNN encoder over the layer graphs and a PPO actor-critic (CleanRL-style).

The ONP paper (Li, Yu, Yi, arXiv 2405.17746) confirms only that GNN-based RL agents embed the
layer graphs and learn the pruning policy. Everything below is OUR design:

Encoder. A 2-layer GCN (``conv="gcn"``, PyTorch Geometric's ``GCNConv`` with the cosine
similarities as edge weights and self-loops) or GAT (``conv="gat"``, ``GATConv`` with the
similarity as a 1-dim edge feature), ONE network shared by all layers: every layer graph is a
disjoint component of one batched graph, and the layer depth is a node feature. The ablation
``encoder="mlp"`` replaces each graph convolution by a linear layer on the node's own features
(same sizes, same agent): the policy then never sees the graph.

Actor. One logit per node from ``[embedding, raw features]``: the probability that the channel
is PRUNED. The skip connection from the raw features lets the actor start from them:
its weights on the probe's network-wide columns (``*_global``) are initialised to
``prior / number of such columns`` (``prior`` = 1.0), the others at 0, and its bias so that an
average channel is pruned with probability ``init_prune`` (0.02). At episode 0 the policy is
thus "prune what the probe finds suspicious, sparingly"; the agent then learns from rewards
which of those (and which others) to prune. Without this warm start, random exploration over
hundreds of channels almost never removes the few that matter within a few hundred episodes.

Critic. Mean- and max-pooled embeddings of each layer, averaged over layers, then a 2-layer MLP;
its output is shifted to the mean reward of the first batch of episodes once they are scored
(so the first advantages are centred rather than all of one sign).

Episodes and PPO. An episode is ONE action: a keep/prune decision for every channel of every
layer, sampled as independent Bernoullis from the actor's probabilities, whose reward is
computed at once (clean accuracy - backdoor_weight x backdoor score - prune_cost x pruned
fraction; see :mod:`trojanprune.defenses.onp`). With one-step episodes GAE reduces to the
advantage ``A = r - V(s)``; advantages are divided by the batch's standard deviation but not
re-centred, so the critic's value is the baseline. ``episodes_per_update`` episodes are
sampled from the same policy and their rewards computed in ONE batched evaluation, then
``update_epochs`` epochs of PPO's clipped objective follow. The probability ratio is clipped
per node (each channel's decision is one "token" sharing the episode's advantage, as in
token-level PPO for language models), since the ratio of a joint probability over hundreds of
independent decisions would be clipped almost always. Adam, gradient-norm clipping, a small
entropy bonus. Seeded: the same seed gives the same episodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .graphs import NetworkGraphs

ENCODERS = ("gnn", "mlp")
CONVS = ("gcn", "gat")


# ------------------------------------------------------------------------------------------
# networks
# ------------------------------------------------------------------------------------------

class GraphEncoder(nn.Module):
    """``layers`` graph convolutions (GCN or GAT) with ReLU, or per-node linear layers (MLP)."""

    def __init__(self, in_dim: int, hidden: int, layers: int, encoder: str = "gnn", conv: str = "gcn"):
        super().__init__()
        if encoder not in ENCODERS:
            raise ConfigError(f"encoder must be one of {', '.join(ENCODERS)}; got {encoder!r}")
        if conv not in CONVS:
            raise ConfigError(f"conv must be one of {', '.join(CONVS)}; got {conv!r}")
        if layers < 1 or hidden < 1:
            raise ConfigError(f"the encoder needs layers >= 1 and hidden >= 1; got {layers}, {hidden}")
        self.encoder, self.conv = encoder, conv
        dims = [in_dim] + [hidden] * layers
        mods = []
        for a, b in zip(dims[:-1], dims[1:]):
            if encoder == "mlp":
                mods.append(nn.Linear(a, b))
            elif conv == "gcn":
                from torch_geometric.nn import GCNConv
                mods.append(GCNConv(a, b))
            else:
                from torch_geometric.nn import GATConv
                mods.append(GATConv(a, b, heads=1, edge_dim=1))
        self.layers = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.layers:
            if self.encoder == "mlp":
                h = layer(h)
            elif self.conv == "gcn":
                h = layer(h, edge_index, edge_weight)
            else:
                h = layer(h, edge_index, edge_attr=edge_weight[:, None])
            h = F.relu(h)
        return h


class ActorCritic(nn.Module):
    """Per-node prune logits and a value for the whole network (see the module docstring)."""

    def __init__(self, feature_names: tuple[str, ...], hidden: int = 32, layers: int = 2,
                 encoder: str = "gnn", conv: str = "gcn", init_prune: float = 0.02,
                 prior: float = 1.0):
        super().__init__()
        if not 0 < init_prune < 1:
            raise ConfigError(f"init_prune must be in (0, 1), got {init_prune}")
        f = len(feature_names)
        self.encoder = GraphEncoder(f, hidden, layers, encoder, conv)
        self.actor = nn.Linear(hidden + f, 1)
        self.critic = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.actor.weight.normal_(0.0, 0.01)
            prior_cols = [i for i, n in enumerate(feature_names) if n.endswith("_global")]
            for i in prior_cols:
                self.actor.weight[0, hidden + i] = prior / len(prior_cols)
            self.actor.bias.fill_(math.log(init_prune / (1 - init_prune)))
            self.critic[-1].weight.normal_(0.0, 0.01)
            self.critic[-1].bias.zero_()

    def forward(self, graph: NetworkGraphs) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N,), value ())."""
        from torch_geometric.nn import global_max_pool, global_mean_pool

        h = self.encoder(graph.x, graph.edge_index, graph.edge_weight)
        logits = self.actor(torch.cat([h, graph.x], 1)).squeeze(-1)
        pooled = torch.cat([global_mean_pool(h, graph.batch), global_max_pool(h, graph.batch)], 1)
        value = self.critic(pooled.mean(0)).squeeze(-1)
        return logits, value


# ------------------------------------------------------------------------------------------
# PPO
# ------------------------------------------------------------------------------------------

@dataclass
class PPOConfig:
    """PPO hyper-parameters (ours; see :class:`trojanprune.defenses.onp.Options`)."""

    episodes: int = 192
    episodes_per_update: int = 16
    update_epochs: int = 8
    lr: float = 0.01
    clip: float = 0.2
    ent_coef: float = 0.001
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5

    def __post_init__(self):
        if self.episodes < 1:
            raise ConfigError(f"episodes must be at least 1, got {self.episodes}")
        if self.episodes_per_update < 2:
            raise ConfigError(f"episodes_per_update must be at least 2 (advantages are scaled by "
                              f"the batch's spread), got {self.episodes_per_update}")
        if self.update_epochs < 1 or not self.lr > 0 or not 0 < self.clip < 1:
            raise ConfigError("update_epochs must be >= 1, lr > 0 and clip in (0, 1)")


@dataclass
class EpisodeBatch:
    """What the environment returns for a batch of prunings: (E,) tensors."""

    reward: torch.Tensor
    info: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PPOHistory:
    actions: list[torch.Tensor] = field(default_factory=list)   # (E, N) bool per update
    rewards: list[torch.Tensor] = field(default_factory=list)   # (E,) per update
    info: list[dict[str, torch.Tensor]] = field(default_factory=list)
    value: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    clipfrac: list[float] = field(default_factory=list)

    @property
    def episode_rewards(self) -> torch.Tensor:
        return torch.cat(self.rewards) if self.rewards else torch.empty(0)


def bernoulli_logprob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Per-node log-probability of ``actions`` (1 = prune) under Bernoulli(sigmoid(logits))."""
    return -F.binary_cross_entropy_with_logits(logits.expand_as(actions), actions, reduction="none")


def bernoulli_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return F.binary_cross_entropy_with_logits(logits, p, reduction="none")


def train_ppo(policy: ActorCritic, graph: NetworkGraphs,
              environment: Callable[[torch.Tensor], EpisodeBatch], config: PPOConfig, seed: int,
              on_update: Callable[[int, torch.Tensor, EpisodeBatch], None] | None = None) -> PPOHistory:
    """Train ``policy`` with PPO; ``environment(actions)`` scores a (E, N) batch of prunings
    (1 = prune) and returns an :class:`EpisodeBatch`. ``on_update(update, actions, batch)`` is
    called after each batch is scored (progress, NaN checks)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(policy.parameters(), lr=config.lr, eps=1e-5)
    history = PPOHistory()
    done = 0
    update = 0
    while done < config.episodes:
        e = min(config.episodes_per_update, config.episodes - done)
        # -- rollout: e one-step episodes from the current policy --------------------------
        with torch.no_grad():
            logits, value = policy(graph)
            probs = torch.sigmoid(logits)
            actions = torch.bernoulli(probs.expand(e, -1), generator=gen)
            old_logp = bernoulli_logprob(logits, actions)
        batch = environment(actions)
        if on_update is not None:
            on_update(update, actions, batch)
        rewards = batch.reward.detach().float()
        if update == 0:  # start the critic at the first batch's mean reward
            with torch.no_grad():
                policy.critic[-1].bias += rewards.mean() - value
                value = rewards.mean()
        history.actions.append(actions.bool())
        history.rewards.append(rewards)
        history.info.append(batch.info)
        history.value.append(float(value))
        done += e
        update += 1
        if e < 2:
            continue  # a last batch of one episode is scored (it counts) but not learned from
        # -- advantages: one-step episodes, so GAE = r - V ---------------------------------
        advantages = (rewards - value) / (rewards.std() + 1e-8)
        # -- PPO update ----------------------------------------------------------------------
        clipped = []
        for _ in range(config.update_epochs):
            logits, new_value = policy(graph)
            logp = bernoulli_logprob(logits, actions)
            ratio = (logp - old_logp).exp()
            adv = advantages[:, None]
            pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - config.clip, 1 + config.clip)).mean()
            v_loss = 0.5 * ((new_value - rewards) ** 2).mean()
            entropy = bernoulli_entropy(logits).mean()
            loss = pg_loss - config.ent_coef * entropy + config.vf_coef * v_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            opt.step()
            clipped.append(float(((ratio - 1).abs() > config.clip).float().mean()))
        history.entropy.append(float(entropy.detach()))
        history.clipfrac.append(sum(clipped) / len(clipped))
    return history


@torch.no_grad()
def prune_probabilities(policy: ActorCritic, graph: NetworkGraphs) -> torch.Tensor:
    """(N,) the trained policy's probability of pruning each channel."""
    logits, _ = policy(graph)
    return torch.sigmoid(logits)


__all__ = ["ActorCritic", "CONVS", "ENCODERS", "EpisodeBatch", "GraphEncoder", "PPOConfig",
           "PPOHistory", "bernoulli_entropy", "bernoulli_logprob", "prune_probabilities", "train_ppo"]
