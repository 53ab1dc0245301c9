"""Trigger reverse: a Neural-Cleanse-style mask and pattern for every class, all at once.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
IEEE S&P 2019. For each candidate target class ``k`` find the smallest mask ``m_k`` (1 x H x W,
in [0, 1]) and a pattern ``p_k`` (C x H x W, in [0, 1]) such that stamping
``(1 - m_k) * x + m_k * p_k`` sends the images to ``k``:

    min  CE(f((1 - m_k) x + m_k p_k), k) + lambda_k * |m_k|_1

The class whose mask is abnormally small (MAD anomaly index > 2, low side; see
:mod:`trojanprune.reverse.detect`) is the backdoor target. ShapPruning (Guan et al., CVPR 2022)
uses this as its "trigger reverse" stage, from one image per class or from synthesized images.

What follows Neural Cleanse (paper and its public code): the tanh parameterisation of mask and
pattern (``m = tanh(w) / 2 + 1/2``), random uniform initialisation, Adam with lr 0.1 and betas
(0.5, 0.9), the adaptive cost schedule (cost 0 until the attack succeeds on >= 99% of the images
for ``patience`` checks, then ``init_cost``; multiplied by 1.5 after ``patience`` successful
checks in a row, divided by 1.5**1.5 after ``patience`` failed ones), keeping the smallest mask
that still reaches the success threshold, early stopping once the cost has gone both up and down
and the best norm has not improved by 1% for a while, and the MAD detection with threshold 2.

Our choices (documented as ours): every class is optimized *in one batched problem* (the images
are stacked K times, one mask and pattern per class, a per-class cost vector), so a few-shot
reverse of all classes costs one forward/backward pass of K x B images per step; a "check" of the
cost schedule is one optimization step on the current batch (Neural Cleanse checks once per epoch
of mini-batches, and with one image per class the whole set is one batch); images of class ``k``
itself are left out of class ``k``'s loss and success rate; ``cost_schedule="fixed"`` keeps
``init_cost`` throughout (no schedule) when a reproducible, schedule-free objective is wanted.
The batched problem stops early only once every class has settled, so a class that settles
early goes on improving its mask meanwhile; ``per_class_stop=True`` freezes each class when it
settles, as Neural Cleanse's separate per-class runs do, and leaves its pairs out of the later
steps (cheaper). It is off by default here, in ShapPruning and in ONP (its
``reverse_per_class_stop``): a class frozen early keeps a larger mask than one optimized to the
end, and on two of the eight CIFAR-10 grid models the MAD test then flagged more classes
(BENCHMARKS.md, "Stop 42").
With many classes a step's K x B images are split into passes that fit in memory, and their
gradients are added up (:mod:`trojanprune.engine.memory`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..defenses.base import check_finite
from ..errors import ConfigError, DataError
from ..progress import progress_bar
from ..engine.layout import channels_last_copy
from ..engine.memory import images_per_pass
from ..utils import model_device
from .detect import (ANOMALY_THRESHOLD, SMALL_MASK_RATIO, SMALLEST_MASK_RULE, check_small_mask_ratio,
                     detect_outlier)

COST_SCHEDULES = ("adaptive", "fixed")


@dataclass
class ReversedTriggers:
    """One reversed trigger per class and the detection verdict over them.

    ``attack_success[k]`` is measured on the images whose label is not ``k``. ``evaluations``
    counts trigger evaluations: each optimization step evaluates K candidate triggers (one per
    class) on the current image batch, and the final check K more on all images.
    """

    masks: torch.Tensor           # (K, 1, H, W) in [0, 1]
    patterns: torch.Tensor        # (K, C, H, W) in [0, 1]
    mask_norms: torch.Tensor      # (K,) L1 norms
    attack_success: torch.Tensor  # (K,) fraction of the images (not of class k) sent to k
    anomaly_index: torch.Tensor   # (K,) MAD anomaly index (low side: small norms are suspicious)
    target: int | None            # flagged class, None when no class is an outlier
    evaluations: int
    flagged: list[int] = field(default_factory=list)  # every low-side outlier (target: smallest)
    threshold: float = ANOMALY_THRESHOLD
    steps: int = 0                # optimization steps actually run (early stopping)
    costs: torch.Tensor | None = None  # (K,) final L1 cost of each class
    small_mask_ratio: float | None = SMALL_MASK_RATIO  # the detection's ratio rule (None: off)
    #: what :attr:`suspect` falls back to when no class is flagged, in words
    suspect_rule: ClassVar[str] = SMALLEST_MASK_RULE

    @property
    def num_classes(self) -> int:
        return int(self.masks.shape[0])

    @property
    def verdict(self) -> str:
        return "backdoor detected" if self.target is not None else "no backdoor detected"

    @property
    def suspect(self) -> int:
        """The flagged target, else the class with the smallest mask (used when forcing)."""
        return self.target if self.target is not None else int(self.mask_norms.argmin())

    def apply(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """``(1 - m_k) x + m_k p_k`` for images ``x`` of shape (N, C, H, W) or (C, H, W)."""
        if not 0 <= int(k) < self.num_classes:
            raise ConfigError(f"class {k} out of range 0..{self.num_classes - 1}")
        m = self.masks[int(k)].to(x.device, x.dtype)
        p = self.patterns[int(k)].to(x.device, x.dtype)
        return (1 - m) * x + m * p

    def summary(self) -> dict:
        """A JSON-able summary (no images)."""
        return {"verdict": self.verdict, "target": self.target, "flagged": list(self.flagged),
                "threshold": self.threshold, "small_mask_ratio": self.small_mask_ratio,
                "mask_norms": [round(float(v), 3) for v in self.mask_norms],
                "anomaly_index": [round(float(v), 3) for v in self.anomaly_index],
                "attack_success": [round(float(v), 4) for v in self.attack_success],
                "steps": self.steps, "evaluations": self.evaluations}


@torch.enable_grad()  # optimizes inputs: the caller's no_grad must not cut the graph
def reverse_triggers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                     steps: int = 300, lr: float = 0.1, init_cost: float = 1e-3, seed: int = 0,
                     progress: bool = False, device=None, cost_schedule: str = "adaptive",
                     success_threshold: float = 0.99, patience: int = 5,
                     early_stop_patience: int = 50, batch_size: int = 32,
                     anomaly_threshold: float = ANOMALY_THRESHOLD,
                     small_mask_ratio: float | None = SMALL_MASK_RATIO,
                     pass_images: int | None = None,
                     classes=None, per_class_stop: bool = False) -> ReversedTriggers:
    """Reverse a trigger for every class of ``model`` from images ``x`` (labels ``y``).

    Args:
        model: classifier on [0, 1] images; not modified (its parameters get no gradients).
        x, y: (N, C, H, W) images in [0, 1] and (N,) labels; one per class is enough.
        num_classes: K, the number of candidate targets.
        steps: at most this many optimization steps (fewer with early stopping).
        lr: Adam learning rate on the tanh parameters (Neural Cleanse: 0.1).
        init_cost: the L1 cost once the schedule starts (Neural Cleanse: 1e-3); the fixed
            cost with ``cost_schedule="fixed"``.
        seed: initialisation and mini-batch order.
        batch_size: images per class per step; all of them when there are this few or fewer.
        success_threshold, patience, early_stop_patience: the schedule (see module docstring);
            ``early_stop_patience=0`` disables early stopping.
        anomaly_threshold: MAD anomaly index above which a small-norm class is flagged.
        small_mask_ratio: a class whose norm is at most 1/this of the median's is flagged too
            (ours, :data:`~.detect.SMALL_MASK_RATIO`; None: Neural Cleanse's test alone).
        pass_images: at most this many stamped images per forward/backward pass; a step's
            (class, image) pairs are split into passes whose gradients are added up (the same
            gradient). None: as many as fit the memory budget (:mod:`trojanprune.engine.memory`),
            so that a model with many classes does not run out of memory.
        classes: the candidate target of each trigger to reverse (default: every class once).
            A class may repeat: each copy starts from its own random initialisation, which is
            how ShapPruning gets several stand-ins for one target (``trigger_pool``, ours).
            Given, the result's i-th trigger is for ``classes[i]`` and no detection is run
            (``target`` None, nothing flagged).
        per_class_stop: freeze each class once it meets the early-stopping rule (its best mask
            is kept and its pairs are no longer run), as Neural Cleanse's per-class runs stop;
            False (default): every class runs until all have settled.
    """
    if cost_schedule not in COST_SCHEDULES:
        raise ConfigError(f"cost_schedule must be one of {COST_SCHEDULES}, got {cost_schedule!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"trigger reverse needs a model with at least 2 classes, got {num_classes}")
    if steps < 1 or lr <= 0 or init_cost < 0 or batch_size < 1 or patience < 1 or (
            pass_images is not None and pass_images < 1):
        raise ConfigError("reverse_triggers: steps, lr, batch_size, patience and pass_images must "
                          "be positive and init_cost non-negative")
    small_mask_ratio = check_small_mask_ratio(small_mask_ratio)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or len(x) == 0:
        raise DataError("reverse_triggers needs a non-empty image batch (N, C, H, W)")
    if y is None or len(y) != len(x):
        raise DataError("reverse_triggers needs one label per image")
    device = torch.device(device) if device is not None else model_device(model)
    x = x.detach().to(device, torch.float32)
    y = y.detach().to(device, torch.long)
    model = channels_last_copy(model, x[:8])  # same function, faster on CPU (engine/layout.py)
    per_pass = pass_images or images_per_pass(model, x)
    n, c, h, w = x.shape
    if classes is None:
        classes = torch.arange(num_classes, device=device)
    else:
        classes = torch.as_tensor(list(classes), dtype=torch.long, device=device)
        if classes.numel() == 0 or bool(((classes < 0) | (classes >= num_classes)).any()):
            raise ConfigError(f"classes must be a non-empty list of classes in 0..{num_classes - 1}")
    k = len(classes)
    gen = torch.Generator().manual_seed(int(seed))

    def init(shape):
        u = torch.rand(shape, generator=gen).clamp(0.01, 0.99)
        return torch.atanh((u - 0.5) * 2).to(device).requires_grad_(True)

    mask_w = init((k, 1, h, w))
    pattern_w = init((k, c, h, w))
    opt = torch.optim.Adam([mask_w, pattern_w], lr=lr, betas=(0.5, 0.9))

    adaptive = cost_schedule == "adaptive"
    cost = torch.zeros(k, device=device) if adaptive else torch.full((k,), float(init_cost), device=device)
    cost_set = torch.zeros(k, dtype=torch.bool, device=device) if adaptive else torch.ones(k, dtype=torch.bool, device=device)
    zeros = lambda: torch.zeros(k, dtype=torch.long, device=device)  # noqa: E731
    set_count, up_count, down_count, stale = zeros(), zeros(), zeros(), zeros()
    went_up = torch.zeros(k, dtype=torch.bool, device=device)
    went_down = torch.zeros(k, dtype=torch.bool, device=device)
    frozen = torch.zeros(k, dtype=torch.bool, device=device)  # settled, with per_class_stop
    best_norm = torch.full((k,), float("inf"), device=device)
    best_mask = torch.zeros(k, 1, h, w, device=device)
    best_pattern = torch.zeros(k, c, h, w, device=device)
    evaluations = 0
    flags = {m: m.training for m in model.modules()}
    model.eval()
    run = 0
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("trigger reverse", total=steps)
            for run in range(1, steps + 1):
                if n > batch_size:
                    idx = torch.randperm(n, generator=gen)[:batch_size].to(device)
                    xb, yb = x[idx], y[idx]
                else:
                    xb, yb = x, y
                # only (class, image) pairs where the image is not of the class: an image
                # already of class k says nothing about k's trigger, so it is not run at all
                pair_k, pair_i = (yb.unsqueeze(0) != classes.unsqueeze(1)).nonzero(as_tuple=True)
                live = ~frozen[pair_k]
                pair_k, pair_i = pair_k[live], pair_i[live]
                count = torch.bincount(pair_k, minlength=k).float().clamp_min(1)
                mask = torch.tanh(mask_w) / 2 + 0.5
                pattern = torch.tanh(pattern_w) / 2 + 0.5
                grads, hits = None, []
                with torch.enable_grad():
                    for s in range(0, len(pair_k), per_pass):
                        pk, pi = pair_k[s:s + per_pass], pair_i[s:s + per_pass]
                        stamped = (1 - mask[pk]) * xb[pi] + (mask * pattern)[pk]
                        logits = model(stamped)
                        ce = F.cross_entropy(logits, classes[pk], reduction="none")
                        ce_k = torch.zeros(k, device=device).index_add(0, pk, ce) / count
                        if s == 0:  # the L1 term once per step, with the first pass
                            l1 = mask.sum((1, 2, 3))
                            loss = (ce_k + cost * l1).sum()
                        else:
                            loss = ce_k.sum()
                        check_finite(loss.detach(), "trigger reverse")
                        part = torch.autograd.grad(loss, [mask_w, pattern_w],
                                                   retain_graph=s + per_pass < len(pair_k))
                        grads = part if grads is None else [a + b for a, b in zip(grads, part)]
                        hits.append((logits.detach().argmax(-1) == classes[pk]).float())
                        # a retained graph lives as long as a tensor refers to it: free this
                        # pass's activations before the next pass runs
                        del stamped, logits, ce, ce_k, loss
                evaluations += k - int(frozen.sum())
                with torch.no_grad():
                    hit = torch.cat(hits)
                    success = torch.zeros(k, device=device).index_add(0, pair_k, hit) / count
                    ok = (success >= success_threshold) & ~frozen
                    norms = l1.detach()
                    better = ok & (norms < best_norm)
                    improved = ok & (norms < best_norm * 0.99)
                    stale = torch.where(improved, 0, stale + 1)
                    best_norm = torch.where(better, norms, best_norm)
                    best_mask[better] = mask.detach()[better]
                    best_pattern[better] = pattern.detach()[better]
                    if adaptive:
                        # Neural Cleanse: start the cost once the attack succeeds ``patience`` times.
                        set_count = torch.where(~cost_set & ok, set_count + 1, 0)
                        start = ~cost_set & (set_count >= patience)
                        cost = torch.where(start, torch.full_like(cost, init_cost), cost)
                        cost_set = cost_set | start
                        live = cost_set & ~start & ~frozen  # a frozen class keeps its cost
                        up_count = torch.where(live & ok, up_count + 1, 0)
                        down_count = torch.where(live & ~ok, down_count + 1, 0)
                        up = up_count >= patience
                        down = down_count >= patience
                        cost = torch.where(up, cost * 1.5, torch.where(down, cost / 1.5 ** 1.5, cost))
                        went_up |= up
                        went_down |= down
                        up_count = torch.where(up, 0, up_count)
                        down_count = torch.where(down, 0, down_count)
                for param, grad in zip((mask_w, pattern_w), grads):
                    param.grad = grad
                opt.step()
                bar.advance(task)
                if early_stop_patience > 0:
                    settled = torch.isfinite(best_norm) & (stale >= early_stop_patience)
                    if adaptive:
                        settled &= went_up & went_down
                    if bool(settled.all()):
                        break
                    if per_class_stop:
                        frozen |= settled
        with torch.no_grad():
            never = ~torch.isfinite(best_norm)  # never reached the threshold: keep the last one
            if bool(never.any()):
                mask = torch.tanh(mask_w) / 2 + 0.5
                pattern = torch.tanh(pattern_w) / 2 + 0.5
                best_mask[never] = mask[never]
                best_pattern[never] = pattern[never]
                best_norm = torch.where(never, mask.sum((1, 2, 3)), best_norm)
            success = _success(model, x, y, best_mask, best_pattern, classes.tolist())
            evaluations += k
    finally:
        for module, flag in flags.items():
            module.training = flag
        mask_w.grad = pattern_w.grad = None
    if k == num_classes and bool((classes.cpu() == torch.arange(k)).all()):
        detection = detect_outlier(best_norm.cpu(), anomaly_threshold, small_mask_ratio)
        index, target, flagged = detection.anomaly_index, detection.target, detection.flagged
    else:  # not one trigger per class: the MAD test over classes does not apply
        index, target, flagged = torch.full((k,), float("nan")), None, []
    return ReversedTriggers(
        masks=best_mask.cpu(), patterns=best_pattern.cpu(), mask_norms=best_norm.cpu(),
        attack_success=success.cpu(), anomaly_index=index,
        target=target, evaluations=evaluations, flagged=flagged,
        threshold=anomaly_threshold, steps=run, costs=cost.cpu(), small_mask_ratio=small_mask_ratio)


def _success(model, x, y, masks, patterns, classes, chunk: int = 256) -> torch.Tensor:
    """(K,) fraction of the images not of class ``classes[j]`` that the j-th trigger sends there."""
    k = masks.shape[0]
    out = torch.zeros(k)
    for j, cls in enumerate(classes):
        keep = y != cls
        if not bool(keep.any()):
            continue
        xs = x[keep]
        hits = 0
        for s in range(0, len(xs), chunk):
            stamped = (1 - masks[j]) * xs[s:s + chunk] + masks[j] * patterns[j]
            hits += int((model(stamped).argmax(-1) == cls).sum())
        out[j] = hits / len(xs)
    return out


__all__ = ["COST_SCHEDULES", "ReversedTriggers", "reverse_triggers"]
