"""Warp reverse: for every class, one small smooth warp of the image plane that sends the images
there. OUR design (neither ONP nor ShapPruning publishes it); it follows Neural Cleanse's idea
with a different family of triggers.

Why: Neural Cleanse's mask and pattern (:mod:`.trigger`) model a patch, and the feature-space
reverse (:mod:`.feature`) models a few channels of one layer switched on. A warping backdoor
(WaNet, Nguyen & Tran 2021) is neither: on the CIFAR-10 ``resnet20`` WaNet zoo model Neural
Cleanse flags nothing, and the feature reverse flags classes whose written-in triggers a pruning
of a few last-layer channels disables while the real warp keeps working (ONP left 80% ASR;
BENCHMARKS.md, stops 28-37). A warp stand-in enters where the real trigger does, at the input,
so a pruning that disables it has to cut the path the real trigger takes.

For every class ``k`` a control field ``c_k`` of ``grid x grid`` displacements (x and y) is
upsampled bicubically to the image size, bounded by ``tanh`` and scaled so that no pixel moves
more than ``strength / 2`` pixels along either axis (``strength / W`` in ``grid_sample``'s
[-1, 1] coordinates), and the images are resampled bilinearly along it:

    max over c_k of  success of  warp(x, c_k)  at sending images not of class k to k
    (minimize CE(f(warp(x, c_k)), k) with Adam)

The budget is fixed rather than minimized (Neural Cleanse minimizes its mask's norm): a
universal warp of at most half a pixel that sends most images to one class is a shortcut the
model learned, not a natural feature; on the CIFAR-10 zoo the natural classes reach 0-9%
within it and a warping backdoor's target 100% (``benchmarks/warp_reverse.py``). Detection is
on each warp's *lift*: its success minus the share of the same images the model already sends
to the class unwarped (a model that sends most inputs to one class needs no warp for it). The
classes whose lift is a high-side MAD outlier (index > 2, the same test as Neural Cleanse's,
other side) AND at least ``min_success`` (0.5) are flagged; the MAD alone would flag a class at
10% among classes at 1-5%. The flagged class with the highest lift is the target. With fewer
than 3 classes nothing is flagged (the MAD cannot single out one of two).

Choices (ours): ``grid=4`` (WaNet's published control grid is 4x4; a finer warp is still
reachable in part by a 4x4 one), ``strength=1`` (half a pixel: WaNet's default warp moves
pixels by about a quarter of a pixel on average), 100 Adam steps at lr 0.1, about 256
(class, image) pairs per step drawn at random from the images not of the class, all classes in
one batched problem split into passes that fit in memory (:mod:`trojanprune.engine.memory`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..defenses.base import check_finite
from ..engine.layout import channels_last_copy
from ..engine.memory import images_per_pass
from ..errors import ConfigError, DataError
from ..metrics import predict
from ..progress import progress_bar
from ..utils import model_device
from .detect import ANOMALY_THRESHOLD, anomaly_index

#: a flagged class's warp must send at least this share of the images to it (see module doc)
MIN_SUCCESS = 0.5


def warp_images(x: torch.Tensor, control: torch.Tensor, strength: float) -> torch.Tensor:
    """``x`` (N, C, H, W) resampled along the warp of ``control`` (2, g, g) (see module doc)."""
    h, w = x.shape[-2:]
    bounded = torch.tanh(control.to(x.device, x.dtype))[None]
    flow = F.interpolate(bounded, size=(h, w), mode="bicubic", align_corners=True)[0]
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx + strength * flow[0] / w, gy + strength * flow[1] / h], -1)
    grid = grid.clamp(-1, 1)[None].expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


@dataclass
class ReversedWarps:
    """One reversed warp per class and the detection verdict over them."""

    controls: torch.Tensor        # (K, 2, g, g), unbounded (tanh bounds them)
    strength: float
    attack_success: torch.Tensor  # (K,) on the images not of class k
    anomaly_index: torch.Tensor   # (K,) MAD index of the lifts (high side suspicious)
    target: int | None
    evaluations: int
    steps: int
    flagged: list[int] = field(default_factory=list)
    threshold: float = ANOMALY_THRESHOLD
    min_success: float = MIN_SUCCESS
    base_rate: torch.Tensor | None = None  # (K,) the same images sent to k without a warp
    #: what :attr:`suspect` falls back to when no class is flagged, in words
    suspect_rule: ClassVar[str] = "the class whose reversed warp lifts its rate most"

    @property
    def lift(self) -> torch.Tensor:
        """(K,) each warp's success minus the unwarped rate on the same images."""
        return self.attack_success - (self.base_rate if self.base_rate is not None else 0)

    @property
    def num_classes(self) -> int:
        return int(self.controls.shape[0])

    @property
    def verdict(self) -> str:
        return "backdoor detected" if self.target is not None else "no backdoor detected"

    @property
    def suspect(self) -> int:
        """The flagged target, else the class whose warp lifts its rate most."""
        return self.target if self.target is not None else int(self.lift.argmax())

    def apply(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Images ``x`` (N, C, H, W) or (C, H, W) warped by class ``k``'s reversed warp."""
        if not 0 <= int(k) < self.num_classes:
            raise ConfigError(f"class {k} out of range 0..{self.num_classes - 1}")
        single = x.dim() == 3
        out = warp_images(x[None] if single else x, self.controls[int(k)], self.strength)
        return out[0] if single else out

    def displacement(self, k: int, size: tuple[int, int]) -> torch.Tensor:
        """(1, H, W) how far class ``k``'s warp moves each pixel, scaled to [0, 1] by the
        largest move the budget allows (an image for the report)."""
        flow = F.interpolate(torch.tanh(self.controls[int(k)])[None], size=size, mode="bicubic",
                             align_corners=True)[0]
        return (flow.norm(dim=0, keepdim=True) / 2 ** 0.5).clamp(0, 1)

    def summary(self) -> dict:
        return {"verdict": self.verdict, "target": self.target, "flagged": list(self.flagged),
                "threshold": self.threshold, "min_success": self.min_success,
                "strength": self.strength, "grid": int(self.controls.shape[-1]),
                "attack_success": [round(float(v), 4) for v in self.attack_success],
                **({"base_rate": [round(float(v), 4) for v in self.base_rate]}
                   if self.base_rate is not None else {}),
                "anomaly_index": [round(float(v), 3) for v in self.anomaly_index],
                "steps": self.steps, "evaluations": self.evaluations}


def detect_warp_targets(success: torch.Tensor, threshold: float = ANOMALY_THRESHOLD,
                        min_success: float = MIN_SUCCESS) -> tuple[torch.Tensor, list[int], int | None]:
    """(anomaly index, flagged classes, target) for per-class warp lifts (or success rates)."""
    success = torch.as_tensor(success, dtype=torch.float64).flatten()
    index = anomaly_index(success)
    if len(success) < 3:  # two values are equally far from their median: no outlier
        return index, [], None
    median = success.median()
    flagged = [k for k in range(len(success)) if float(success[k]) > float(median)
               and float(index[k]) > threshold and float(success[k]) >= min_success]
    target = max(flagged, key=lambda k: float(success[k])) if flagged else None
    return index, flagged, target


@torch.enable_grad()  # optimizes the warps: the caller's no_grad must not cut the graph
def reverse_warps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                  grid: int = 4, strength: float = 1.0, steps: int = 100, lr: float = 0.1,
                  pairs_per_step: int = 256, seed: int = 0, progress: bool = False, device=None,
                  anomaly_threshold: float = ANOMALY_THRESHOLD, min_success: float = MIN_SUCCESS,
                  pass_images: int | None = None) -> ReversedWarps:
    """Reverse a small smooth warp for every class of ``model`` from images ``x`` (labels ``y``).

    Args:
        model: classifier on [0, 1] images; not modified (its parameters get no gradients).
        x, y: (N, C, H, W) images and (N,) labels; each class needs images of other classes.
        num_classes: K, the number of candidate targets.
        grid: side of each class's control field.
        strength: the largest move along either axis, in half pixels (see module doc).
        steps, lr: Adam steps and learning rate on the control fields.
        pairs_per_step: (class, image) pairs per step, split evenly over the classes (at least
            two images per class, at most as many as the class has images of other classes).
        anomaly_threshold, min_success: the detection (see module doc).
        pass_images: at most this many images per forward/backward pass (None: as many as fit
            the memory budget, :mod:`trojanprune.engine.memory`).
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"the warp reverse needs a model with at least 2 classes, got {num_classes}")
    if grid < 2 or not strength > 0 or steps < 1 or not lr > 0 or pairs_per_step < 1 or (
            pass_images is not None and pass_images < 1):
        raise ConfigError("reverse_warps: grid must be at least 2 and strength, steps, lr, "
                          "pairs_per_step and pass_images positive")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or len(x) == 0:
        raise DataError("reverse_warps needs a non-empty image batch (N, C, H, W)")
    if y is None or len(y) != len(x):
        raise DataError("reverse_warps needs one label per image")
    device = torch.device(device) if device is not None else model_device(model)
    x = x.detach().to(device, torch.float32)
    y = y.detach().to(device, torch.long)
    pools = [torch.nonzero(y != k).flatten() for k in range(num_classes)]
    if any(len(p) == 0 for p in pools):
        raise DataError("reverse_warps needs, for every class, images of some other class")
    model = channels_last_copy(model, x[:8])
    per_pass = pass_images or images_per_pass(model, x)
    # no more draws per class than it has images (ten few-shot images: 9 a class, not 12)
    per_class = max(2, min(pairs_per_step // num_classes, min(len(p) for p in pools)))
    gen = torch.Generator().manual_seed(int(seed))
    controls = (0.01 * torch.randn(num_classes, 2, grid, grid, generator=gen)).to(device)
    controls.requires_grad_(True)
    opt = torch.optim.Adam([controls], lr=lr)
    labels = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("warp reverse", total=steps)
            for _ in range(steps):
                picks = torch.cat([p[torch.randint(len(p), (per_class,), generator=gen).to(device)]
                                   for p in pools])
                grad = torch.zeros_like(controls)
                for s in range(0, len(picks), per_pass):
                    part = slice(s, s + per_pass)
                    warped = torch.cat([warp_images(x[picks[part]][labels[part] == k], controls[k], strength)
                                        for k in labels[part].unique().tolist()])
                    # sum of per-class mean CEs, so every class weighs the same in every pass split
                    loss = F.cross_entropy(model(warped), labels[part], reduction="sum") / per_class
                    check_finite(loss.detach(), "warp reverse")
                    grad += torch.autograd.grad(loss, controls)[0]
                    del warped, loss
                controls.grad = grad
                opt.step()
                bar.advance(task)
        with torch.no_grad():
            success, base = torch.zeros(num_classes), torch.zeros(num_classes)
            plain = predict(model, x).to(device)
            for k, pool in enumerate(pools):
                hits = 0
                for s in range(0, len(pool), 256):
                    warped = warp_images(x[pool[s:s + 256]], controls[k], strength)
                    hits += int((model(warped).argmax(-1) == k).sum())
                success[k] = hits / len(pool)
                base[k] = float((plain[pool] == k).float().mean())
    finally:
        for module, flag in flags.items():
            module.training = flag
        controls.grad = None
    index, flagged, target = detect_warp_targets(success - base, anomaly_threshold, min_success)
    return ReversedWarps(controls=controls.detach().cpu(), strength=float(strength),
                         attack_success=success, anomaly_index=index, target=target,
                         evaluations=num_classes * (steps + 1) + 1, steps=steps, flagged=flagged,
                         threshold=float(anomaly_threshold), min_success=float(min_success),
                         base_rate=base)


__all__ = ["MIN_SUCCESS", "ReversedWarps", "detect_warp_targets", "reverse_warps", "warp_images"]
