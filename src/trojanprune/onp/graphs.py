"""ONP's view of a network: one graph per prunable unit group, nodes = channels.

What the ONP paper (Li, Yu, Yi, arXiv 2405.17746) confirms, and this module follows:

- one graph per layer, a node per neuron (conv filter / channel);
- a node's connection strength is the L1 norm of its weights;
- two nodes are linked when the cosine similarity of their weights exceeds a per-layer
  threshold, tuned so that dormant neurons do not get linked;
- node features include the neuron's average activation on clean data;
- residual connections are handled by group-based pruning.

Our choices (the paper does not publish them):

- "layer" means a unit group of :mod:`trojanprune.engine`: channels tied by a skip connection
  form ONE graph whose node ``c`` stands for channel ``c`` of every conv writing into that
  residual stream (so they are pruned together). A node's weight vector is the concatenation
  of its filters in every producing conv/linear of the group.
- node features (raw values are kept in :attr:`LayerGraph.raw`), see :data:`BASE_FEATURES`:
  L1 norm of the weight vector; mean and standard deviation over the clean images of the
  channel's activation (the positive part of the group's hook-point output, averaged over
  spatial positions and over the group's hook points); BatchNorm scale and shift (mean over the
  group's normalization layers; 1 and 0 without one); the first-order (Taylor) estimate of the
  clean loss increase when the channel is removed; and the probe's backdoor-sensitivity
  columns. Each is z-scored within its layer (the GNN is shared across layers whose scales
  differ); the probe columns are also z-scored over the whole network (a backdoor may sit in
  one layer). Then the layer depth (0 = first group, 1 = last) and a residual-group flag.
- dormant channel: mean activation at most ``dormant_ratio`` (0.05) times the layer's mean
  (or an all-zero weight vector).
- per-layer threshold: first from the rule, ``edge_rule="quantile"`` (the
  ``edge_quantile``-quantile, 0.9, of the layer's pairwise similarities: about the top 10% of
  pairs are linked) or ``edge_rule="neighbours"`` (the median over nodes of each node's
  ``edge_neighbours``-th largest similarity, 4: a typical node gets about that many
  neighbours); then raised just above the largest similarity of any dormant channel, so
  dormant channels stay unlinked. Edges are exactly the pairs above the final threshold, with
  the similarity as edge weight. (A layer whose dormant channels resemble active ones thus
  gets fewer edges than the rule asked for; :attr:`LayerGraph.rule_threshold` keeps the
  rule's value and ``summary()`` reports both.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import Units, channel_dim
from ..engine.units import UnitGroup
from ..errors import ConfigError, TrojanPruneError

#: Per-node features every graph has, before the probe's columns (see the module docstring).
BASE_FEATURES = ("l1_norm", "act_mean", "act_std", "bn_scale", "bn_shift", "clean_taylor")
EDGE_RULES = ("quantile", "neighbours")
_Z_CLAMP = 10.0


class GraphBuildError(TrojanPruneError):
    """The graph builder cannot map a layer of the model onto a graph (the message names it)."""


@dataclass
class LayerGraph:
    """The graph of one unit group: ``size`` nodes (channel ``c`` is node ``c``).

    ``edge_index`` (2, E) holds local node numbers, both directions; ``edge_weight`` (E,) the
    cosine similarities; ``threshold`` the layer's final similarity threshold; ``dormant`` a
    (size,) bool tensor; ``raw`` the unnormalized features by name.
    """

    group: str
    size: int
    offset: int
    depth: float
    residual: bool
    edge_index: torch.Tensor
    edge_weight: torch.Tensor
    threshold: float
    rule_threshold: float
    dormant: torch.Tensor
    raw: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_edges(self) -> int:
        """Undirected edges (each is stored in both directions)."""
        return int(self.edge_index.shape[1]) // 2


@dataclass
class NetworkGraphs:
    """All layer graphs of a model, stacked into one disjoint graph in flat unit order.

    Node ``i`` of the stacked graph is flat unit ``i`` of ``units`` (see
    :class:`~trojanprune.engine.Units`), so a policy's per-node output is directly a unit mask.
    """

    units: Units
    layers: list[LayerGraph]
    x: torch.Tensor                 # (total, F) normalized node features
    feature_names: tuple[str, ...]
    edge_index: torch.Tensor        # (2, E) global node numbers
    edge_weight: torch.Tensor       # (E,)
    batch: torch.Tensor             # (total,) layer index of each node

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    def feature(self, name: str) -> torch.Tensor:
        try:
            return self.x[:, self.feature_names.index(name)]
        except ValueError:
            raise ConfigError(f"no node feature {name!r}; features: {', '.join(self.feature_names)}") from None

    def to_pyg(self):
        """The stacked graph as a PyTorch Geometric ``Data`` (x, edge_index, edge_weight, batch)."""
        from torch_geometric.data import Data

        return Data(x=self.x, edge_index=self.edge_index, edge_weight=self.edge_weight,
                    batch=self.batch, num_nodes=self.num_nodes)

    def summary(self) -> list[dict]:
        """Per-layer statistics (JSON-able): nodes, edges, thresholds, dormant count."""
        return [{"group": g.group, "nodes": g.size, "edges": g.num_edges,
                 "threshold": round(g.threshold, 4), "rule_threshold": round(g.rule_threshold, 4),
                 "dormant": int(g.dormant.sum()), "residual": g.residual} for g in self.layers]


# ------------------------------------------------------------------------------------------
# raw per-channel measurements
# ------------------------------------------------------------------------------------------

def channel_weights(model: nn.Module, group: UnitGroup) -> torch.Tensor:
    """(size, D): each channel's filters in every producing conv/linear of ``group``, flattened
    and concatenated (for a residual group: all convs writing into the stream)."""
    parts = []
    for point in group.producers:
        module = _submodule(model, point, group)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise GraphBuildError(f"cannot map layer {point!r} (unit group {group.name!r}) onto a "
                                  f"graph: {type(module).__name__} has no weight tensor")
        chans = torch.tensor(group.channels_at(point), dtype=torch.long, device=weight.device)
        w = weight.detach()
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            if module.groups != 1:
                raise GraphBuildError(f"cannot map layer {point!r} (unit group {group.name!r}): grouped "
                                      "transposed convolutions are not supported by the graph builder")
            w = w.transpose(0, 1)  # stored (in, out, ...)
        if w.dim() < 2 or w.shape[0] <= int(chans.max()):
            raise GraphBuildError(f"cannot map layer {point!r} (unit group {group.name!r}) onto a graph: "
                                  f"its weight of shape {tuple(weight.shape)} has no row per channel")
        parts.append(w.index_select(0, chans).reshape(len(chans), -1).float().cpu())
    if not parts:
        raise GraphBuildError(f"cannot map unit group {group.name!r} onto a graph: it has no "
                              "producing conv/linear layer")
    w = torch.cat(parts, 1)
    if not torch.isfinite(w).all():
        raise GraphBuildError(f"cannot map layer {group.name!r} onto a graph: its weights contain "
                              "NaN or infinity")
    return w


def norm_affine(model: nn.Module, group: UnitGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel: mean over the group's normalization layers' weight and
    bias (1 and 0 where there is none)."""
    scales, shifts = [], []
    for point in group.mask_points:
        module = _submodule(model, point, group)
        if point in group.producers:
            continue
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        chans = torch.tensor(group.channels_at(point), dtype=torch.long)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1:
            scales.append(weight.detach().float().cpu()[chans])
        if isinstance(bias, torch.Tensor) and bias.dim() == 1:
            shifts.append(bias.detach().float().cpu()[chans])
    scale = torch.stack(scales).mean(0) if scales else torch.ones(group.size)
    shift = torch.stack(shifts).mean(0) if shifts else torch.zeros(group.size)
    return scale, shift


def check_mappable(model: nn.Module, units: Units) -> None:
    """Raise :class:`GraphBuildError` (naming the layer) if some unit group cannot become a
    graph; cheap, so a defense can fail before its expensive steps."""
    for g in units:
        channel_weights(model, g)
        norm_affine(model, g)


@torch.no_grad()
def channel_activations(model: nn.Module, units: Units, images: torch.Tensor,
                        batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-unit activation statistics over ``images``: flat (total,) mean and std over images,
    and the (N, total) per-image values (positive part of the hook-point output, averaged over
    everything but the batch and channel dims, and over the group's hook points)."""
    per_point: dict[str, list[torch.Tensor]] = {}
    handles = []

    def make_hook(name, dim):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise GraphBuildError(f"cannot map layer {name!r} onto a graph: its output is a "
                                      f"{type(output).__name__}, not a tensor")
            out = output.detach().clamp_min(0).movedim(dim, 1)
            per_point.setdefault(name, []).append(out.reshape(out.shape[0], out.shape[1], -1).mean(-1).float().cpu())
        return hook

    points = {p for g in units for p in g.hook_points}
    for name in sorted(points):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise GraphBuildError(f"cannot map layer {name!r} onto a graph: the model has no such "
                                  "module (were the units found on a different model?)") from None
        handles.append(module.register_forward_hook(make_hook(name, channel_dim(module))))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            seen = {name: len(calls) for name, calls in per_point.items()}
            model(images[start:start + batch_size])
            for name, calls in per_point.items():
                # a module applied more than once per forward (shared weights): the mean of its calls
                first = seen.get(name, 0)
                if len(calls) - first > 1:
                    calls[first:] = [torch.stack(calls[first:]).mean(0)]
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    values = torch.zeros(len(images), units.total)
    for g, offset in zip(units, units.offsets):
        acc = torch.zeros(len(images), g.size)
        for point in g.hook_points:
            if point not in per_point:
                raise GraphBuildError(f"cannot map layer {point!r} (unit group {g.name!r}) onto a graph: "
                                      "it did not run in the forward pass")
            out = torch.cat(per_point[point])
            acc += out[:, list(g.channels_at(point))]
        values[:, offset:offset + g.size] = acc / len(g.hook_points)
    return values.mean(0), values.std(0) if len(images) > 1 else torch.zeros(units.total), values


def clean_taylor(model: nn.Module, units: Units, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = 128) -> torch.Tensor:
    """(total,) first-order estimate of the clean cross-entropy increase when each unit is
    removed: ``-dL/dm`` at mask 1 (mean over images). Ours; cheap (one backward pass)."""
    from ..engine import ChannelMasks

    mask = torch.ones(units.total, device=images.device, requires_grad=True)
    grad = torch.zeros(units.total, device=images.device)
    was_training = model.training
    model.eval()
    try:
        with ChannelMasks(model, units, mask), torch.enable_grad():
            for start in range(0, len(images), batch_size):
                x, y = images[start:start + batch_size], labels[start:start + batch_size]
                loss = F.cross_entropy(model(x), y, reduction="sum") / len(images)
                grad += torch.autograd.grad(loss, mask)[0]
    finally:
        model.train(was_training)
    return (-grad).detach().float().cpu()


# ------------------------------------------------------------------------------------------
# edges
# ------------------------------------------------------------------------------------------

def cosine_similarity_matrix(weights: torch.Tensor) -> torch.Tensor:
    """(n, n) cosine similarities of rows; rows of zeros have similarity 0 with everything."""
    norms = weights.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, weights / norms.clamp_min(1e-12), torch.zeros_like(weights))
    sim = unit @ unit.T
    sim.fill_diagonal_(0.0)
    return sim


def layer_threshold(sim: torch.Tensor, dormant: torch.Tensor, rule: str, quantile: float,
                    neighbours: int) -> tuple[float, float]:
    """(final threshold, rule threshold) of one layer (see the module docstring)."""
    n = sim.shape[0]
    if n < 2:
        return math.inf, math.inf
    if rule == "quantile":
        iu = torch.triu_indices(n, n, offset=1)
        rule_t = float(torch.quantile(sim[iu[0], iu[1]].double(), quantile))
    elif rule == "neighbours":
        k = min(max(1, neighbours), n - 1)
        off = sim.clone()
        off.fill_diagonal_(-math.inf)
        kth = off.topk(k, dim=1).values[:, -1]
        rule_t = float(kth.median())
    else:
        raise ConfigError(f"edge_rule must be one of {', '.join(EDGE_RULES)}; got {rule!r}")
    threshold = rule_t
    if dormant.any():
        worst = float(sim[dormant].max())
        # Strictly above every similarity of a dormant channel: they stay isolated.
        threshold = max(threshold, math.nextafter(worst, math.inf))
    return threshold, rule_t


def similarity_edges(sim: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges (both directions) between distinct nodes whose similarity exceeds ``threshold``."""
    above = sim > threshold
    above.fill_diagonal_(False)
    index = above.nonzero().T.contiguous()
    return index, sim[index[0], index[1]].float()


# ------------------------------------------------------------------------------------------
# the builder
# ------------------------------------------------------------------------------------------

def build_graphs(model: nn.Module, units: Units, images: torch.Tensor, labels: torch.Tensor,
                 signal: torch.Tensor | None = None, signal_names: Sequence[str] = (), *,
                 edge_rule: str = "quantile", edge_quantile: float = 0.9, edge_neighbours: int = 4,
                 dormant_ratio: float = 0.05) -> NetworkGraphs:
    """The graphs of ``model``'s unit groups (see the module docstring for what is whose).

    Args:
        model: the classifier (not modified).
        units: its prunable units (``discover_units``); one graph per group.
        images, labels: clean images (float [0, 1]) for the activation and Taylor features.
        signal: optional (total,) or (total, P) backdoor-sensitivity columns from a probe.
        signal_names: names of those columns (default ``probe0``, ``probe1``...).
        edge_rule, edge_quantile, edge_neighbours, dormant_ratio: the edge threshold rule.

    Raises :class:`GraphBuildError` naming the layer the builder cannot map.
    """
    if edge_rule not in EDGE_RULES:
        raise ConfigError(f"edge_rule must be one of {', '.join(EDGE_RULES)}; got {edge_rule!r}")
    if not 0.0 < edge_quantile < 1.0:
        raise ConfigError(f"edge_quantile must be in (0, 1), got {edge_quantile}")
    if edge_neighbours < 1:
        raise ConfigError(f"edge_neighbours must be at least 1, got {edge_neighbours}")
    if signal is not None:
        signal = signal.detach().float().cpu()
        if signal.dim() == 1:
            signal = signal[:, None]
        if signal.dim() != 2 or signal.shape[0] != units.total:
            raise ConfigError(f"probe signal must be ({units.total},) or ({units.total}, P); got "
                              f"{tuple(signal.shape)}")
        names = tuple(signal_names) or tuple(f"probe{i}" for i in range(signal.shape[1]))
        if len(names) != signal.shape[1]:
            raise ConfigError(f"{signal.shape[1]} probe columns but {len(names)} names")
        if not torch.isfinite(signal).all():
            bad = units.unit_of(int((~torch.isfinite(signal)).any(1).nonzero()[0]))[0]
            raise GraphBuildError(f"the probe's signal is NaN or infinite in layer {bad!r}")
    else:
        names = ()

    check_mappable(model, units)  # weights first: a NaN layer is named, not its downstream
    act_mean, act_std, _ = channel_activations(model, units, images)
    taylor = clean_taylor(model, units, images, labels)
    layers: list[LayerGraph] = []
    columns: list[torch.Tensor] = []
    n_groups = len(units)
    for i, (g, offset) in enumerate(zip(units, units.offsets)):
        w = channel_weights(model, g)
        scale, shift = norm_affine(model, g)
        sl = slice(offset, offset + g.size)
        raw = {"l1_norm": w.abs().sum(1), "act_mean": act_mean[sl], "act_std": act_std[sl],
               "bn_scale": scale, "bn_shift": shift, "clean_taylor": taylor[sl]}
        for j, name in enumerate(names):
            raw[name] = signal[sl, j]
        for key, value in raw.items():
            if not torch.isfinite(value).all():
                raise GraphBuildError(f"cannot map layer {g.name!r} onto a graph: its feature "
                                      f"{key!r} is NaN or infinite")
        dormant = (raw["act_mean"] <= dormant_ratio * raw["act_mean"].mean()) | (w.abs().sum(1) == 0)
        sim = cosine_similarity_matrix(w)
        threshold, rule_t = layer_threshold(sim, dormant, edge_rule, edge_quantile, edge_neighbours)
        edge_index, edge_weight = similarity_edges(sim, threshold)
        depth = i / (n_groups - 1) if n_groups > 1 else 0.0
        layers.append(LayerGraph(g.name, g.size, offset, depth, g.residual, edge_index, edge_weight,
                                 threshold, rule_t, dormant, raw))
        cols = [_zscore(raw[k]) for k in BASE_FEATURES + names]
        cols += [torch.full((g.size,), depth), torch.full((g.size,), float(g.residual))]
        columns.append(torch.stack(cols, 1))
    # columns: base + probe features (z-scored per layer), depth, residual flag, then the probe
    # features again, z-scored over the whole network
    x = torch.cat(columns)
    if names:
        x = torch.cat([x, torch.stack([_zscore(signal[:, j]) for j in range(len(names))], 1)], 1)
    feature_names = BASE_FEATURES + names + ("depth", "residual") + tuple(f"{k}_global" for k in names)
    edge_index = torch.cat([g.edge_index + g.offset for g in layers], 1)
    edge_weight = torch.cat([g.edge_weight for g in layers])
    batch = torch.cat([torch.full((g.size,), i, dtype=torch.long) for i, g in enumerate(layers)])
    return NetworkGraphs(units, layers, x.float(), feature_names, edge_index, edge_weight, batch)


def _zscore(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    std = v.std() if v.numel() > 1 else torch.tensor(0.0, dtype=v.dtype)
    if not std > 1e-12:
        return torch.zeros(v.shape, dtype=torch.float32)
    return ((v - v.mean()) / std).clamp(-_Z_CLAMP, _Z_CLAMP).float()


def _submodule(model: nn.Module, name: str, group: UnitGroup) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise GraphBuildError(f"cannot map layer {name!r} (unit group {group.name!r}) onto a graph: "
                              "the model has no such module (were the units found on a different "
                              "model?)") from None


__all__ = ["BASE_FEATURES", "EDGE_RULES", "GraphBuildError", "LayerGraph", "NetworkGraphs",
           "build_graphs", "channel_activations", "check_mappable", "channel_weights", "clean_taylor",
           "cosine_similarity_matrix", "layer_threshold", "norm_affine", "similarity_edges"]
