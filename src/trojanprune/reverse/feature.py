"""Feature-space trigger reverse: for every class, the fewest channels of one hidden layer that,
set to learned values, send the images to that class. OUR design (neither ONP nor ShapPruning
publishes it); it follows Neural Cleanse's idea one layer down.

Why: Neural Cleanse's pixel-space mask and pattern (:mod:`.trigger`) model a *patch*. Full-image
triggers such as WaNet's warp or SIG's sinusoid cannot be written as a small patch, and on the
CIFAR-10 ``vgg_small`` zoo the pixel reverse flags a wrong class for both (BENCHMARKS.md). Inside
the network, however, every trigger ends up switching on a few channels that the backdoor owns,
whatever its shape in pixel space. So for each class ``k`` we learn a channel mask
``m_k in [0, 1]^C`` and values ``v_k >= 0`` at the output of one hook point (a layer's
BatchNorm, where pruning masks act):

    a' = (1 - m_k) * a + m_k * v_k          (broadcast over the spatial dimensions)
    min  CE(f_suffix(a'), k) + cost * |m_k|_1

The backdoor target needs only its few backdoor channels, a natural class needs many, so its
mask norm is a low-side MAD outlier (:func:`~.detect.detect_outlier`, the same test as Neural
Cleanse). Measured on the zoo models (penultimate conv layer, 10 images per class from ONP's fit
half, cost 0.02, 300 steps; BENCHMARKS.md, "ONP's backdoor probes"): the target is flagged on
BadNets (index 8.4) and WaNet (norm 0.8 vs a median of 5.5), where Neural Cleanse flags a wrong
class. It is not a reliable detector on its own: on Blended those images flag class 8 (index
7.2, a false positive) while ShapPruning's one image per class flags nothing; on SIG it flags
the target and class 8 about equally. So it is never used alone by default: ONP's
``suspects`` probe (the default) and ``auto`` probe combine it with the pixel-space reverse, and
ShapPruning's ``reverse="auto"`` (the default) consults it only where Neural Cleanse flags no
class or several, and follows it only where Neural Cleanse's own mask sizes agree.

Choices (ours): all classes in one batched problem through the engine's
:meth:`~trojanprune.engine.MaskEvaluator.edited_logits` (prefix reuse: only the layers from the
injection point on run per step); a fixed cost (no schedule); sigmoid/softplus parameterisation
with values scaled by each channel's largest clean activation; images of class ``k`` left out
of class ``k``'s loss and success rate; the default layer is the conv group three quarters of
the way through the network (the penultimate conv of ``vgg_small``): deep enough that the
backdoor has its own channels, early enough that a few layers still follow. With many
classes a step is split into passes of whole classes that fit in memory, and their gradients
are added up (:mod:`trojanprune.engine.memory`); with more than ``batch_size`` images (100),
a step uses one of several fixed batches, so that its cost grows with K, not K squared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..defenses.base import check_finite
from ..engine import MaskEvaluator, Units
from ..engine.layout import channels_last_copy
from ..engine.memory import images_per_pass
from ..engine.units import channel_dim
from ..errors import ConfigError, DataError
from ..progress import progress_bar
from .detect import (ANOMALY_THRESHOLD, SMALL_MASK_RATIO, SMALLEST_MASK_RULE, Detection, anomaly_index,
                     check_small_mask_ratio, detect_outlier)


@dataclass
class FeatureTriggers:
    """One feature-space trigger per class at one layer, and the detection verdict."""

    layer: str                    # unit group name
    module: str                   # the hook point the trigger is written into
    channel_dim: int
    masks: torch.Tensor           # (K, C) in [0, 1]
    values: torch.Tensor          # (K, C) >= 0
    mask_norms: torch.Tensor      # (K,)
    attack_success: torch.Tensor  # (K,) on the images not of class k
    anomaly_index: torch.Tensor   # (K,)
    target: int | None
    evaluations: int
    steps: int
    flagged: list[int] = field(default_factory=list)
    threshold: float = ANOMALY_THRESHOLD
    rectify: bool = True
    small_mask_ratio: float | None = SMALL_MASK_RATIO  # the detection's ratio rule (None: off)
    # the module channels that carry the group's channels, in group order; None = all of them
    # (they differ after a concatenation: a DenseNet layer's 8 channels are 16-23 of the
    # BatchNorm that reads the concatenated tensor)
    channels: tuple[int, ...] | None = None
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
        """The flagged target, else the class with the smallest mask."""
        return self.target if self.target is not None else int(self.mask_norms.argmin())

    def edit(self, classes):
        """An ``edit`` for :meth:`MaskEvaluator.edited_logits`: mask j writes the trigger of
        ``classes[j]`` (an int applies one class's trigger under every mask)."""
        return writer(self.masks, self.values, self.channel_dim, self.rectify, classes, self.channels)

    def summary(self) -> dict:
        return {"verdict": self.verdict, "target": self.target, "flagged": list(self.flagged),
                "layer": self.layer, "threshold": self.threshold, "small_mask_ratio": self.small_mask_ratio,
                "mask_norms": [round(float(v), 3) for v in self.mask_norms],
                "anomaly_index": [round(float(v), 3) for v in self.anomaly_index],
                "attack_success": [round(float(v), 4) for v in self.attack_success],
                "steps": self.steps, "evaluations": self.evaluations}


def write(out: torch.Tensor, m: torch.Tensor, v: torch.Tensor, dim: int,
          rectify: bool = True, channels=None) -> torch.Tensor:
    """``(1 - m) * relu(out) + m * v`` for ``out`` (J, b, ...) and per-channel ``m``, ``v``
    (J, C) or (C,); ``dim`` is the channel dimension of the module's output (without the J
    axis). ``rectify=False``: ``(1 - m) * out + m * v``. ``channels``: the C module channels
    written, in order (None: all of them); the others are left as they are.

    Why rectify: hook points are BatchNorm outputs, and in most CNNs a ReLU follows. Mixing the
    rectified value is injecting after the ReLU, where a channel that is off is switched on by
    ``m * v`` alone; mixed before the ReLU, a strongly negative pre-activation must first be
    overcome, which blurs the difference between the few backdoor channels and the rest.
    A one-off check during development on the SIG zoo model (10 images per class, 300 steps;
    not a committed benchmark): rectified, the target's norm was an outlier (3.6 vs a median of
    4.7, index 2.4); unrectified it was not (5.1 vs 4.9).
    In a ReLU network ``m = 0`` changes nothing either way. Where no ReLU follows (GELU, SiLU,
    a transformer's residual stream) rectifying alone changes the model, so
    :func:`reverse_feature_triggers` rectifies only where it does not (:func:`relu_follows`).
    """
    axis = _axis(out, dim)
    if channels is not None:
        index = torch.as_tensor(channels, dtype=torch.long, device=out.device)
        part = write(out.index_select(axis, index), m, v, dim, rectify)
        return out.index_copy(axis, index, part)
    if m.dim() == 1:
        m, v = m.expand(out.shape[0], -1), v.expand(out.shape[0], -1)
    shape = [out.shape[0]] + [1] * (out.dim() - 1)
    shape[axis] = out.shape[axis]
    m, v = m.reshape(shape), v.reshape(shape)
    return (1 - m) * (out.clamp_min(0) if rectify else out) + m * v


def writer(masks: torch.Tensor, values: torch.Tensor, dim: int, rectify: bool, classes=None,
           channels=None):
    """An ``edit`` for :meth:`MaskEvaluator.edited_logits` that writes class triggers
    (``masks``, ``values``: (K, C)) into ``channels`` (see :func:`write`): mask j writes
    ``classes[j]``'s, one class's under every mask for an int, class j's when ``classes`` is
    None."""
    def fn(out: torch.Tensor, j0: int, j1: int) -> torch.Tensor:
        idx = slice(j0, j1) if classes is None else classes if isinstance(classes, int) else classes[j0:j1]
        m, v = masks[idx].to(out.device, out.dtype), values[idx].to(out.device, out.dtype)
        return write(out, m, v, dim, rectify, channels)
    return fn


def relu_follows(evaluator: MaskEvaluator, total: int, module: str, dim: int, channels=None,
                 tolerance: float = 1e-4) -> bool:
    """Whether rectifying ``module``'s output (at ``channels``, None = all) leaves the model's
    logits on the evaluator's images unchanged, i.e. a ReLU (or ReLU6, or a max-pool of a
    ReLU) already follows it on every path. Measured rather than read from the module types,
    so functional activations and any model are covered. ``tolerance``: relative to the
    largest logit."""
    def rectified(out: torch.Tensor, j0: int, j1: int) -> torch.Tensor:
        zero = out.new_zeros(len(channels) if channels is not None else out.shape[_axis(out, dim)])
        return write(out, zero, zero, dim, True, channels)  # mask 0: relu(out) alone

    ones = torch.ones(total)
    plain = evaluator.logits(ones)
    edited = evaluator.edited_logits(ones, module, rectified, grad=False)
    return float((edited - plain).abs().max()) <= tolerance * (float(plain.abs().max()) + 1e-12)


def _axis(out: torch.Tensor, dim: int) -> int:
    """The channel axis of an edit's ``out``, which has the mask axis in front."""
    return dim + 1 if dim >= 0 else out.dim() + dim


def _conv_groups(units: Units) -> list:
    """The conv unit groups in execution order; linear-only models: every group."""
    return [g for g in units if g.kind == "conv"] or list(units)


def default_layer(units: Units) -> str:
    """The conv group three quarters of the way through (execution order); linear-only
    models: the first linear group."""
    convs = _conv_groups(units)
    return convs[min(len(convs) - 1, round(0.75 * (len(convs) - 1)))].name


def last_conv_layer(units: Units) -> str:
    """The conv group whose producing conv runs last (the features the classifier head reads,
    or nearly); linear-only models: the last group."""
    return max(_conv_groups(units), key=lambda g: g.depth).name


#: a feature trigger "works" when it sends at least this fraction of the other classes' images
#: to its class; only working triggers' sizes are compared
WORKING_SUCCESS = 0.5


def detect_working(norms: torch.Tensor, success: torch.Tensor,
                   threshold: float = ANOMALY_THRESHOLD,
                   small_mask_ratio: float | None = SMALL_MASK_RATIO) -> Detection:
    """Neural Cleanse's MAD test on the mask norms of the triggers that work (ours).

    A class whose trigger does not work (success < :data:`WORKING_SUCCESS`) was not reached
    with the mask it ended with, so its norm is no trigger size: it counts as at least the
    largest norm found, and is never flagged. When fewer than half of the classes' triggers
    work, there is no typical size to compare with and nothing is flagged. Why: on an MLP
    (benchmarks/unseen_models.py) the reverse at its last hidden layer reached 2 of 10 classes,
    whose marginally smaller norms (0.91, 0.94 against 0.96-0.99) the plain test flagged (index
    7.3, 4.1) while the real target was another class. On the CIFAR-10 zoo every class's
    feature trigger works (success 1.0), so there this is the plain test.
    """
    norms = torch.as_tensor(norms, dtype=torch.float64).flatten()
    working = torch.as_tensor(success).flatten() >= WORKING_SUCCESS
    if 2 * int(working.sum()) < len(norms):
        return Detection(anomaly_index(norms), [], None, float(threshold))
    return detect_outlier(torch.where(working, norms, norms.max()), threshold, small_mask_ratio)


@torch.enable_grad()  # optimizes inputs: the caller's no_grad must not cut the graph
def reverse_feature_triggers(model: nn.Module, units: Units, x: torch.Tensor, y: torch.Tensor,
                             num_classes: int, *, layer: str | None = None, steps: int = 300,
                             lr: float = 0.1, cost: float = 0.02, seed: int = 0,
                             progress: bool = False, rectify: bool | str = "auto",
                             anomaly_threshold: float = ANOMALY_THRESHOLD,
                             small_mask_ratio: float | None = SMALL_MASK_RATIO,
                             pass_images: int | None = None, batch_size: int = 100) -> FeatureTriggers:
    """Reverse a feature-space trigger for every class (see the module docstring).

    Args:
        model: the classifier (not modified); units: its prunable units (``layer`` is one of
            them, default :func:`default_layer`).
        x, y: images in [0, 1] and labels (10 per class is what the measurements above used;
            one per class also found WaNet's target).
        batch_size: images per step. With this many or fewer, every step uses all of them (10
            per class of 10 classes: the measurements above); with more, the images are dealt
            into fixed batches of at most this many (image i to batch i mod B, so that each
            batch holds every class) and the steps go round them. A step then costs K x
            ``batch_size`` images, not K x N: with N = 10 per class of K classes it would grow
            as K squared (ours; measured on GTSRB's 43 classes, BENCHMARKS.md).
        steps, lr, cost: Adam steps and learning rate, the L1 cost on the channel mask.
        rectify: mix after the layer's ReLU (see :func:`write`); "auto" (default): only where
            a ReLU follows the layer (:func:`relu_follows`), so that writing nothing leaves any
            model as it is.
        anomaly_threshold, small_mask_ratio: the detection (:func:`detect_working`).
        pass_images: at most this many images (classes x images) per forward/backward pass;
            a step's classes are split into passes whose gradients are added up (the same
            gradient; at least one class per pass). None: as many as fit the memory budget
            (:mod:`trojanprune.engine.memory`), so that many classes do not run out of memory.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"trigger reverse needs a model with at least 2 classes, got {num_classes}")
    if steps < 1 or lr <= 0 or cost < 0 or batch_size < 1 or (
            pass_images is not None and pass_images < 1):
        raise ConfigError("reverse_feature_triggers: steps, lr, batch_size and pass_images must be "
                          "positive, cost >= 0")
    small_mask_ratio = check_small_mask_ratio(small_mask_ratio)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or len(x) == 0 or y is None or len(y) != len(x):
        raise DataError("reverse_feature_triggers needs a non-empty image batch and one label per image")
    layer = default_layer(units) if layer is None else layer
    if layer not in units:
        raise ConfigError(f"feature layer {layer!r} is not a unit group; choose one of "
                          f"{', '.join(units.names[:8])}{' ...' if len(units) > 8 else ''}")
    group = units[layer]
    module = group.hook_points[-1]
    dim = channel_dim(model.get_submodule(module))
    model = channels_last_copy(model, x[:8])  # same function, faster on CPU (engine/layout.py)
    evaluator = MaskEvaluator(model, units, x)
    y = y.to(evaluator.device)
    k = num_classes
    classes = torch.arange(k, device=evaluator.device)
    weight = (y.unsqueeze(0) != classes.unsqueeze(1)).float()  # (K, N)
    if bool((weight.sum(1) == 0).any()):
        raise DataError("reverse_feature_triggers needs images of at least two classes")

    # Scale of each channel: its largest clean activation, so a value of 1 means "as strongly
    # as it ever fires on clean data" whatever the layer's units.
    peak = torch.zeros((), device=evaluator.device)
    width = 0

    def record(out, j0, j1):
        nonlocal peak, width
        axis = _axis(out, dim)
        width = out.shape[axis]
        per_channel = out.clamp_min(0).movedim(axis, -1).reshape(-1, width).amax(0)
        peak = torch.maximum(peak, per_channel)
        return out

    evaluator.edited_logits(torch.ones(units.total), module, record, grad=False)
    # Only the group's own channels are written; after a concatenation the hook point carries
    # other groups' channels too, which the trigger must leave alone.
    channels = tuple(group.channels_at(module))
    if channels == tuple(range(width)):
        channels = None
    else:
        peak = peak[list(channels)]
    scale = peak.clamp_min(1e-6 * float(peak.max()) + 1e-12)
    if rectify == "auto":
        rectify = relu_follows(evaluator, units.total, module, dim, channels)
    elif not isinstance(rectify, bool):
        raise ConfigError(f"rectify must be true, false or 'auto', got {rectify!r}")
    c = scale.numel()
    gen = torch.Generator().manual_seed(int(seed))
    init = torch.full((k, c), -2.0) + 0.1 * torch.randn(k, c, generator=gen)  # masks start near 0.12
    mask_w = init.to(scale.device).requires_grad_(True)
    value_w = torch.zeros(k, c, device=scale.device).requires_grad_(True)
    opt = torch.optim.Adam([mask_w, value_w], lr=lr)
    ones = torch.ones(k, units.total, device=scale.device)
    # the step batches, each with its own evaluator (its prefix activations cached once)
    batch_count = -(-len(x) // batch_size)
    parts = ([slice(None)] if batch_count == 1
             else [slice(b, None, batch_count) for b in range(batch_count)])
    batches = [evaluator] if batch_count == 1 else [MaskEvaluator(model, units, x[p]) for p in parts]
    # whole classes per pass (a class's loss is a mean over the batch's images)
    largest = max(ev.num_images for ev in batches)
    per_pass = max(1, (pass_images or images_per_pass(model, evaluator.images)) // largest)

    def current():
        return torch.sigmoid(mask_w), F.softplus(value_w) * scale * 2

    run = 0
    with progress_bar(progress) as bar:
        task = bar.add_task("feature trigger reverse", total=steps)
        for run in range(1, steps + 1):
            m, v = current()
            grads = None
            batch = batches[(run - 1) % batch_count]
            step_weight = weight[:, parts[(run - 1) % batch_count]]
            n = batch.num_images
            for c0 in range(0, k, per_pass):
                c1 = min(k, c0 + per_pass)
                logits = batch.edited_logits(ones[c0:c1], module,
                                             writer(m[c0:c1], v[c0:c1], dim, rectify, None, channels))
                ce = F.cross_entropy(logits.reshape((c1 - c0) * n, -1),
                                     classes[c0:c1].repeat_interleave(n), reduction="none").reshape(c1 - c0, -1)
                w = step_weight[c0:c1]
                # clamp: a batch may hold no image outside a class (that class then adds nothing)
                loss = ((ce * w).sum(1) / w.sum(1).clamp_min(1) + cost * m[c0:c1].sum(1)).sum()
                check_finite(loss.detach(), "feature trigger reverse")
                part = torch.autograd.grad(loss, [mask_w, value_w], retain_graph=c1 < k)
                grads = part if grads is None else [a + b for a, b in zip(grads, part)]
                del logits, ce, loss  # frees this pass's retained graph before the next pass
            for param, grad in zip((mask_w, value_w), grads):
                param.grad = grad
            opt.step()
            bar.advance(task)
    with torch.no_grad():
        m, v = current()
        logits = evaluator.edited_logits(ones, module, writer(m, v, dim, rectify, None, channels), grad=False)
        success = ((logits.argmax(-1) == classes.unsqueeze(1)).float() * weight).sum(1) / weight.sum(1)
        norms = m.sum(1)
    detection = detect_working(norms.cpu(), success.cpu(), anomaly_threshold, small_mask_ratio)
    return FeatureTriggers(layer=layer, module=module, channel_dim=dim, masks=m.detach().cpu(),
                           values=v.detach().cpu(), mask_norms=norms.cpu(),
                           attack_success=success.cpu(), anomaly_index=detection.anomaly_index,
                           target=detection.target, steps=run,
                           evaluations=evaluator.evaluations + sum(
                               ev.evaluations for ev in batches if ev is not evaluator),
                           flagged=detection.flagged, threshold=detection.threshold,
                           rectify=rectify, channels=channels, small_mask_ratio=small_mask_ratio)


__all__ = ["FeatureTriggers", "WORKING_SUCCESS", "default_layer", "detect_working", "last_conv_layer",
           "reverse_feature_triggers", "write", "writer"]
