"""Shapley values of many players by truncated Monte-Carlo permutation sampling, accelerated.

Independent of defenses: a *game* is any ``value_fn`` mapping a batch of coalitions (an
(M, n) bool tensor, True = the player is present) to (M,) values. ShapPruning's players are
channels and a coalition is the set of channels kept; here everything is generic, so the
estimator can be checked against :func:`exact_shapley` on a small game.

The estimator (Neuron Shapley, Ghorbani & Zou, NeurIPS 2020; accelerations as in ShapPruning,
Guan et al., CVPR 2022):

* **Permutation sampling.** For a random permutation ``pi`` the players are removed one by one
  from the full coalition; player ``pi[j]``'s marginal contribution is
  ``v(all but pi[:j]) - v(all but pi[:j+1])``. Averaged over permutations this is the Shapley
  value (removing in the order ``pi`` is adding in the reverse order). One permutation's
  coalitions are evaluated as one batch of masks.
* **Truncation** (``truncation_tol``). Once the value of the shrinking coalition is within
  ``truncation_tol * |v(full) - v(empty)|`` of ``v(empty)``, the remaining players' marginal
  contributions are taken as 0 and not evaluated (Neuron Shapley's TMC). States are evaluated
  in chunks of ``chunk`` along the permutation so that truncation can stop early.
* **Discarding threshold** (``discard``). After ``warmup`` full permutations, a player whose
  upper confidence bound ``mean + z * std / sqrt(count)`` falls below a threshold is no longer
  sampled (its estimate is frozen). ``"auto"``: the threshold is the ``top_k``-th largest lower
  confidence bound, i.e. the player is confidently outside the top ``top_k`` (Neuron Shapley's
  bandit); a number ``r``: the threshold is ``r * (v(full) - v(empty))``, an absolute share of
  the total value; ``None``: never discard.
* **Epsilon-greedy** (``epsilon``). After the warm-up, each permutation spends its evaluations
  on ``top_k`` players only: with probability ``1 - epsilon`` the current top ``top_k`` active
  players by estimated value, with probability ``epsilon`` ``top_k`` random active players.
  "Top" ranks by the mean marginal so far (``greedy_rank="mean"``) or, optimistically, by its
  upper confidence bound (``"ucb"``), which spends the exploiting permutations also on players
  whose few samples leave them possibly in the top set (as a UCB bandit would), not only on
  those already there.
  Only the coalitions just before and after a sampled player's position are evaluated
  (adjacent ones are shared), so a permutation costs at most ``2 * top_k`` evaluations instead
  of ``n - 1``. Each sampled marginal is still an unbiased sample of that player's Shapley
  value: which players are sampled depends on past permutations only, never on the current
  one. ``None``: every active player is sampled in every permutation.

The exact rules for the discarding threshold and the epsilon-greedy choice are *our*
reconstruction: ShapPruning names the two accelerations but does not publish their details.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import ConfigError
from .progress import progress_bar

ValueFn = Callable[[torch.Tensor], torch.Tensor]
GREEDY_RANKS = ("mean", "ucb")


@dataclass
class ShapleyEstimate:
    """Estimated Shapley values and what the estimate cost."""

    values: torch.Tensor       # (n,) mean marginal contribution (float64)
    stds: torch.Tensor         # (n,) sample standard deviation of the marginal contributions
    counts: torch.Tensor       # (n,) marginal contributions sampled per player
    active: torch.Tensor       # (n,) bool: not discarded at the end
    evaluations: int           # coalitions evaluated (full and empty ones included)
    evaluations_plain: int     # what plain permutation sampling (no truncation, no discarding,
                               # no epsilon-greedy) spends for the same number of permutations
    permutations: int          # permutations drawn
    truncated: int             # permutations cut short by truncation
    v_full: float
    v_empty: float
    threshold: float | None    # the last discarding threshold (None: never computed)
    stopped: str               # "permutations" or "max_evaluations"

    @property
    def n(self) -> int:
        return int(self.values.numel())

    def ranking(self) -> torch.Tensor:
        """Player indices by estimated value, largest first (ties by index)."""
        order = torch.arange(self.n)
        # stable sort on -value keeps index order among ties
        return order[torch.sort(-self.values, stable=True).indices]

    def summary(self) -> dict:
        return {"permutations": self.permutations, "evaluations": self.evaluations,
                "evaluations_plain": self.evaluations_plain, "truncated": self.truncated,
                "active_at_end": int(self.active.sum()), "players": self.n,
                "v_full": round(self.v_full, 6), "v_empty": round(self.v_empty, 6),
                "threshold": None if self.threshold is None else round(self.threshold, 6),
                "stopped": self.stopped}


def estimate_shapley(value_fn: ValueFn, n_players: int, *, permutations: int = 100,
                     truncation_tol: float = 0.05, discard: str | float | None = "auto",
                     epsilon: float | None = 0.2, top_k: int = 10, warmup: int = 10,
                     z: float = 2.0, chunk: int = 64, max_evaluations: int | None = None,
                     greedy_rank: str = "mean", seed: int = 0,
                     progress: bool = False) -> ShapleyEstimate:
    """Estimate the Shapley value of each of ``n_players`` players of ``value_fn``.

    See the module docstring for the algorithm. ``truncation_tol=0``, ``discard=None`` and
    ``epsilon=None`` together give plain permutation sampling. ``max_evaluations`` stops the
    sampling before a permutation that could exceed it (the estimate so far is returned).
    """
    n = int(n_players)
    if n < 1:
        raise ConfigError(f"a game needs at least one player, got {n_players}")
    if permutations < 1:
        raise ConfigError(f"permutations must be at least 1, got {permutations}")
    if truncation_tol < 0:
        raise ConfigError(f"truncation_tol must be >= 0, got {truncation_tol}")
    if epsilon is not None and not 0 <= epsilon <= 1:
        raise ConfigError(f"epsilon must be in [0, 1] (or None to disable), got {epsilon}")
    if top_k < 1 or warmup < 0 or chunk < 1 or z < 0:
        raise ConfigError("top_k and chunk must be positive, warmup and z non-negative")
    if greedy_rank not in GREEDY_RANKS:
        raise ConfigError(f"greedy_rank must be one of {GREEDY_RANKS}, got {greedy_rank!r}")
    if isinstance(discard, str) and discard != "auto":
        raise ConfigError(f"discard must be 'auto', a number or None, got {discard!r}")

    gen = torch.Generator().manual_seed(int(seed))
    evaluations = 0

    def evaluate(keep: torch.Tensor) -> torch.Tensor:
        nonlocal evaluations
        out = torch.as_tensor(value_fn(keep)).detach().to("cpu", torch.float64).flatten()
        if out.numel() != keep.shape[0]:
            raise ConfigError(f"value_fn returned {out.numel()} values for {keep.shape[0]} coalitions")
        if not torch.isfinite(out).all():
            raise ConfigError("value_fn returned NaN or infinity")
        evaluations += keep.shape[0]
        return out

    ends = evaluate(torch.stack([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)]))
    v_full, v_empty = float(ends[0]), float(ends[1])
    span = abs(v_full - v_empty)
    tol = truncation_tol * span

    total = torch.zeros(n, dtype=torch.float64)
    total_sq = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.long)
    active = torch.ones(n, dtype=torch.bool)
    threshold: float | None = None
    truncated = 0
    done = 0
    stopped = "permutations"
    with progress_bar(progress) as bar:
        task = bar.add_task("shapley estimation", total=permutations)
        for r in range(permutations):
            if max_evaluations is not None and evaluations + (n - 1) > max_evaluations:
                stopped = "max_evaluations"
                break
            perm = torch.randperm(n, generator=gen)
            bandit = r >= warmup
            if bandit and discard is not None:
                threshold = _threshold(total, total_sq, counts, discard, top_k, z, v_full - v_empty)
                active = _upper(total, total_sq, counts, z) >= threshold
            sampled = active.clone() if bandit else torch.ones(n, dtype=torch.bool)
            if bandit and epsilon is not None and int(sampled.sum()) > top_k:
                score = (_mean_var(total, total_sq, counts)[0] if greedy_rank == "mean"
                         else _upper(total, total_sq, counts, z))
                sampled = _epsilon_greedy(score, sampled, top_k, epsilon, gen)
            if not bool(sampled.any()):
                done += 1
                bar.advance(task)
                continue
            marginals, positions, cut = _walk(perm, sampled, evaluate, v_full, v_empty, tol,
                                              chunk if tol > 0 else n + 1)
            truncated += int(cut)
            players = perm[positions]
            total[players] += marginals
            total_sq[players] += marginals ** 2
            counts[players] += 1
            done += 1
            bar.advance(task)

    means, var = _mean_var(total, total_sq, counts)
    return ShapleyEstimate(
        values=means, stds=var.sqrt(), counts=counts, active=active, evaluations=evaluations,
        evaluations_plain=2 + done * max(0, n - 1), permutations=done, truncated=truncated,
        v_full=v_full, v_empty=v_empty, threshold=threshold, stopped=stopped)


def _walk(perm, sampled, evaluate, v_full, v_empty, tol, chunk):
    """Marginal contributions of the sampled players along one permutation.

    State ``t`` is the coalition without ``perm[:t]``; player ``perm[j]`` contributes
    ``v(j) - v(j + 1)``. Returns (marginals, positions j, truncated?).
    """
    n = perm.numel()
    positions = torch.nonzero(sampled[perm]).flatten()
    needed = torch.unique(torch.cat([positions, positions + 1]))
    needed = needed[(needed > 0) & (needed < n)]  # states 0 and n are known
    rank = torch.empty(n, dtype=torch.long)
    rank[perm] = torch.arange(n)
    values = {0: v_full, n: v_empty}
    cut_at = None
    for s in range(0, needed.numel(), chunk):
        ts = needed[s:s + chunk]
        keep = rank.unsqueeze(0) >= ts.unsqueeze(1)  # (M, n): player kept in state t
        vals = evaluate(keep)
        for t, v in zip(ts.tolist(), vals.tolist()):
            values[t] = v
        if tol > 0:
            close = (vals - v_empty).abs() <= tol
            if bool(close.any()):
                cut_at = int(ts[int(torch.nonzero(close)[0])])
                break

    def value(t: int) -> float:
        if cut_at is not None and t > cut_at:
            return values[cut_at]  # truncated: later players contribute nothing
        return values[t]

    marginals = torch.tensor([value(j) - value(j + 1) for j in positions.tolist()], dtype=torch.float64)
    return marginals, positions, cut_at is not None


def _mean_var(total, total_sq, counts):
    """Each player's mean marginal and its sample variance, from the running sums."""
    mean = total / counts.clamp_min(1)
    var = (total_sq / counts.clamp_min(1) - mean ** 2).clamp_min(0) * counts / (counts - 1).clamp_min(1)
    return mean, var


def _upper(total, total_sq, counts, z):
    mean, var = _mean_var(total, total_sq, counts)
    bound = mean + z * var.sqrt() / counts.clamp_min(1).sqrt()
    return torch.where(counts >= 2, bound, torch.full_like(bound, math.inf))


def _lower(total, total_sq, counts, z):
    mean, var = _mean_var(total, total_sq, counts)
    bound = mean - z * var.sqrt() / counts.clamp_min(1).sqrt()
    return torch.where(counts >= 2, bound, torch.full_like(bound, -math.inf))


def _threshold(total, total_sq, counts, discard, top_k, z, span) -> float:
    if discard == "auto":
        lower = _lower(total, total_sq, counts, z)
        if lower.numel() <= top_k:
            return -math.inf
        return float(torch.topk(lower, top_k).values[-1])
    return float(discard) * span


def _epsilon_greedy(score, active, top_k, epsilon, gen):
    idx = torch.nonzero(active).flatten()
    if float(torch.rand((), generator=gen)) < epsilon:
        chosen = idx[torch.randperm(idx.numel(), generator=gen)[:top_k]]
    else:
        chosen = idx[torch.topk(score[idx], top_k).indices]
    out = torch.zeros_like(active)
    out[chosen] = True
    return out


def exact_shapley(value_fn: ValueFn, n_players: int) -> torch.Tensor:
    """Exact Shapley values by enumerating all 2^n coalitions (n <= 16), for tests and toys."""
    n = int(n_players)
    if not 1 <= n <= 16:
        raise ConfigError(f"exact Shapley values enumerate 2^n coalitions; n must be 1..16, got {n}")
    masks = ((torch.arange(2 ** n).unsqueeze(1) >> torch.arange(n)) & 1).bool()
    values = torch.as_tensor(value_fn(masks)).detach().to("cpu", torch.float64).flatten()
    weights = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    phi = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        bit = 1 << i
        for code in range(2 ** n):
            if not code & bit:
                size = bin(code).count("1")
                phi[i] += weights[size] * (values[code | bit] - values[code])
    return phi


__all__ = ["GREEDY_RANKS", "ShapleyEstimate", "ValueFn", "estimate_shapley", "exact_shapley"]
