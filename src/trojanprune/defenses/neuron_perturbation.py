"""Learned per-neuron masks and neuron perturbations, shared by ANP and RNP (and by other
defenses that want ANP as a backdoor probe: :func:`anp_mask_scores`).

Both papers put a mask ``m`` (and ANP also perturbations ``delta``, ``xi``) on the BatchNorm
layers: the BN computes ``w * (m + delta) * x_hat + b * (1 + xi)`` instead of ``w * x_hat + b``.
Here the same thing is done through the engine, for any model it supports, at each unit
group's hook points (the modules whose outputs the rest of the network reads, see
:class:`~trojanprune.engine.UnitGroup`). For a hook point with output ``y`` and a per-channel
bias ``b``::

    y' = (m + delta) * (y - b) + (1 + xi) * b      (perturbed)
    y' = m * (y - b) + b                           (not perturbed)

For a BatchNorm hook point ``y - b = w * x_hat``, so this is exactly the papers' BN. The
generalization is ours: at a conv/linear hook point without a following norm, ``y - b`` is
the weighted sum ``W x`` and ``b`` the layer's bias; a hook point without a per-channel bias
(affine-free norm, bias-free conv, PReLU) has ``b = 0`` and its whole output is scaled. A
residual group (channels tied by a skip connection) has one mask and one perturbation per
channel, applied at each of its hook points.

As in both papers the mask multiplies the weight part only; the bias is kept while masks are
learned. Pruning, however, goes through the engine (:func:`apply_masks_permanently`): a
pruned unit's channel is removed entirely, bias included (the official code of both papers only
zeroes the BN weight, leaving a constant channel; on the test fixture the two give clean
accuracies and ASRs within half a point of each other). Thresholds are chosen by evaluating
exactly that removal on held-out clean data (:func:`select_pruning`), so the choice is judged
on the network that is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import MaskEvaluator, Units
from ..engine.masks import hook_specs, scale_channels
from ..errors import ConfigError, DataError
from ..progress import progress_bar
from ..utils import derive_seed
from .base import CleanData, check_finite

# The thresholds the official ANP and RNP code sweep (pruning_max 0.90, pruning_step 0.05). The
# automatic choice walks down the masks instead and uses only the largest, 0.9, as its ceiling:
# a unit whose mask stayed above it was not singled out by the optimization.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 19))


# ---------------------------------------------------------------------------------------------
# masks and perturbations at hook points
# ---------------------------------------------------------------------------------------------

class NeuronMasks:
    """Per-unit mask ``m`` and perturbations ``delta`` (weight part) and ``xi`` (bias part),
    applied through forward hooks at the hook points of ``units`` (see the module docstring).

    ``mask``, ``weight_noise`` and ``bias_noise`` are flat ``(units.total,)`` leaf tensors that
    require grad (ones, zeros, zeros); optimizers update them in place. ``perturbed`` switches
    the perturbation on and off. ``remove()`` (or leaving the ``with`` block) restores the model.
    The model's own parameters are never touched.
    """

    def __init__(self, model: nn.Module, units: Units, device: torch.device | None = None):
        if device is None:
            device = next((t.device for t in list(model.parameters()) + list(model.buffers())),
                          torch.device("cpu"))
        self.units = units
        self.mask = torch.ones(units.total, device=device, requires_grad=True)
        self.weight_noise = torch.zeros(units.total, device=device, requires_grad=True)
        self.bias_noise = torch.zeros(units.total, device=device, requires_grad=True)
        self.perturbed = False
        self._specs = hook_specs(model, units)
        self._handles = [spec.module.register_forward_hook(self._make_hook(spec))
                         for spec in self._specs.values()]

    def reset_noise(self, eps: float, generator: torch.Generator) -> None:
        """Draw ``delta`` and ``xi`` uniformly from [-eps, eps] (ANP's random start)."""
        with torch.no_grad():
            for t in (self.weight_noise, self.bias_noise):
                u = torch.rand(t.shape, generator=generator)
                t.copy_((u * 2 - 1) * eps)

    def _coefficients(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        if self.perturbed:
            return (self.units.split(self.mask + self.weight_noise),
                    self.units.split(1 + self.bias_noise))
        return self.units.split(self.mask), None

    def _make_hook(self, spec):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return None
            channels = output.shape[spec.dim]
            weight_coeff, bias_coeff = self._coefficients()
            a = spec.multiplier(weight_coeff, channels)
            if a is None:
                return None
            a = a.to(output.device)
            out = scale_channels(output, a, spec.dim)
            bias = channel_bias(module, channels)
            if bias is not None:
                c = (spec.multiplier(bias_coeff, channels).to(output.device)
                     if bias_coeff is not None else torch.ones_like(a))
                out = out + _along(((c - a) * bias).to(out.dtype), out, spec.dim)
            return out
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "NeuronMasks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def channel_bias(module: nn.Module, channels: int) -> torch.Tensor | None:
    """The module's per-output-channel bias (detached), or None when it has none."""
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.numel() == channels:
        return bias.detach()
    return None


def _along(vec: torch.Tensor, out: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * out.dim()
    shape[dim % out.dim()] = -1
    return vec.view(shape)


class model_mode:  # noqa: N801 (used as a context manager, like a function)
    """Put a model in train or eval mode for a block and restore every module's flag after;
    with ``keep_buffers`` also every buffer (train-mode BatchNorm updates its running
    statistics), so that the model leaves the block exactly as it entered."""

    def __init__(self, model: nn.Module, train: bool, keep_buffers: bool = False):
        self.model, self.train, self.keep_buffers = model, train, keep_buffers

    def __enter__(self):
        self.flags = {m: m.training for m in self.model.modules()}
        self.buffers = ({name: b.detach().clone() for name, b in self.model.named_buffers()}
                        if self.keep_buffers else {})
        self.model.train(self.train)

    def __exit__(self, *exc):
        for m, flag in self.flags.items():
            m.training = flag
        if self.buffers:
            with torch.no_grad():
                for name, b in self.model.named_buffers():
                    b.copy_(self.buffers[name])


def logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DataError(f"the model must return a logits tensor, got {type(out).__name__}")


# ---------------------------------------------------------------------------------------------
# ANP's mask optimization (usable alone as a backdoor probe)
# ---------------------------------------------------------------------------------------------

@dataclass
class ANPHistory:
    """What happened during ANP's optimization (JSON-able via ``as_dict``)."""

    iterations: list[int] = field(default_factory=list)
    loss_nat: list[float] = field(default_factory=list)
    loss_rob: list[float] = field(default_factory=list)
    acc_nat: list[float] = field(default_factory=list)
    images: int = 0
    #: each unit's mask averaged over the iterations (after every step): the tie-break of
    #: :func:`pruning_order` among masks that all ended at the same value (usually 0)
    mask_mean: torch.Tensor | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"iteration": self.iterations, "loss_nat": self.loss_nat,
                "loss_rob": self.loss_rob, "batch_acc_nat": self.acc_nat}


def anp_mask_scores(model: nn.Module, units: Units, clean: CleanData, options=None, seed: int = 0,
                    progress: bool = False) -> tuple[torch.Tensor, int]:
    """ANP's optimized neuron masks: a flat ``(units.total,)`` CPU tensor of mask values in
    [0, 1] (LOW = the unit is suspected to carry the backdoor; see ``units.split`` for per-group
    views), and the evaluations spent (forward passes, counted in passes over ``clean``).

    ``options``: an :class:`trojanprune.defenses.anp.Options`, a mapping of some of its fields
    (the others keep the paper's defaults), or None. Only the optimization fields are used
    (eps, alpha, iterations, batch_size, lr, momentum, noise_steps, batch_stats). ``model`` is
    run in train mode (BatchNorm on batch statistics, as the official code; eval mode with
    ``batch_stats=False``) and left exactly as it was: weights, BatchNorm running statistics and
    train/eval flags are restored, its parameters get no gradients and the hooks are removed.
    Deterministic for a given ``seed``. NaN or infinity in a loss or a mask: ``DataError``.
    """
    scores, evaluations, _ = optimize_anp_masks(model, units, clean, _anp_options(options), seed,
                                                progress)
    return scores, evaluations


def _anp_options(options):
    from .anp import Options  # lazy: anp imports this module
    from .base import make_options

    if options is None:
        return Options()
    if isinstance(options, Mapping):
        return make_options(Options, dict(options), "anp")
    return options


def _train_batches(batches, batch_stats: bool):
    """Mini-batches, without the one-image batches that train-mode BatchNorm cannot take."""
    for x, y in batches:
        if len(x) > 1 or not batch_stats:
            yield x, y


def optimize_anp_masks(model: nn.Module, units: Units, clean: CleanData, o, seed: int,
                       progress: bool = False) -> tuple[torch.Tensor, int, ANPHistory]:
    """ANP (Wu & Wang 2021, Algorithm 1) on ``clean``; see :func:`anp_mask_scores`.

    Each iteration, on one mini-batch: draw delta, xi ~ U[-eps, eps]; take ``noise_steps``
    signed-gradient ascent steps of size eps / noise_steps on the loss, projected back onto
    [-eps, eps]; then one SGD step on m for ``alpha * L(m) + (1 - alpha) * L(m, delta, xi)``
    and clip m to [0, 1].
    """
    if len(clean) < 2:
        raise DataError(f"ANP needs at least 2 clean images to optimize its masks; got {len(clean)}")
    gen = torch.Generator().manual_seed(derive_seed(seed, "anp"))
    batches = _train_batches(clean.batches(o.batch_size, gen), o.batch_stats)
    history = ANPHistory()
    record_every = max(1, o.iterations // 20)
    with NeuronMasks(model, units) as nm, model_mode(model, train=o.batch_stats, keep_buffers=True), \
            progress_bar(enabled=progress) as bar:
        optimizer = torch.optim.SGD([nm.mask], lr=o.lr, momentum=o.momentum)
        task = bar.add_task("ANP: optimizing neuron masks", total=o.iterations)
        mask_sum = torch.zeros_like(nm.mask.detach())
        for it in range(o.iterations):
            x, y = next(batches)
            loss_rob = None
            if o.eps > 0:
                nm.reset_noise(o.eps, gen)
                nm.perturbed = True
                step = o.eps / o.noise_steps
                for _ in range(o.noise_steps):
                    loss = F.cross_entropy(logits_of(model(x)), y)
                    history.images += len(x)
                    check_finite(loss.detach(), "ANP's neuron perturbation loss")
                    grads = torch.autograd.grad(loss, [nm.weight_noise, nm.bias_noise],
                                                allow_unused=True)  # no biases: xi is unused
                    with torch.no_grad():  # ascent: maximize the loss
                        for noise, g in zip((nm.weight_noise, nm.bias_noise), grads):
                            if g is not None:
                                noise.add_(step * g.sign()).clamp_(-o.eps, o.eps)
                loss_rob = F.cross_entropy(logits_of(model(x)), y)
                history.images += len(x)
            nm.perturbed = False
            logits = logits_of(model(x))
            history.images += len(x)
            loss_nat = F.cross_entropy(logits, y)
            loss = o.alpha * loss_nat + ((1 - o.alpha) * loss_rob if loss_rob is not None else 0.0)
            check_finite(loss.detach(), "ANP's mask loss")
            (grad,) = torch.autograd.grad(loss, [nm.mask], allow_unused=True)
            nm.mask.grad = grad if grad is not None else torch.zeros_like(nm.mask)
            optimizer.step()
            with torch.no_grad():
                nm.mask.clamp_(0.0, 1.0)
            check_finite(nm.mask.detach(), "ANP's neuron masks")
            mask_sum += nm.mask.detach()
            if it % record_every == 0 or it == o.iterations - 1:
                history.iterations.append(it + 1)
                history.loss_nat.append(float(loss_nat.detach()))
                history.loss_rob.append(float(loss_rob.detach()) if loss_rob is not None else 0.0)
                history.acc_nat.append(float((logits.argmax(1) == y).float().mean()))
            bar.advance(task)
        scores = nm.mask.detach().cpu().clone()
        history.mask_mean = (mask_sum / o.iterations).cpu()
    return scores, math.ceil(history.images / len(clean)), history


# ---------------------------------------------------------------------------------------------
# choosing which units to prune from mask values
# ---------------------------------------------------------------------------------------------

def parse_optional_float(value, name: str) -> float | None:
    """Options that may be unset: None, "none"/"" (CLI strings) or a number."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "auto")):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {name} takes a number or 'none', got {value!r}") from None


def check_selection_options(o) -> None:
    """Validate the pruning-rule options shared by ANP and RNP (threshold, prune_ratio,
    acc_tolerance, holdout) and normalize the optional ones."""
    o.threshold = parse_optional_float(o.threshold, "threshold")
    o.prune_ratio = parse_optional_float(o.prune_ratio, "prune_ratio")
    if o.threshold is not None and o.prune_ratio is not None:
        raise ConfigError("give threshold or prune_ratio, not both (neither = choose the threshold "
                          "on held-out clean data)")
    if o.threshold is not None and not 0 <= o.threshold <= 1:
        raise ConfigError(f"threshold is a mask value in [0, 1], got {o.threshold}")
    if o.prune_ratio is not None and not 0 <= o.prune_ratio < 1:
        raise ConfigError(f"prune_ratio is a fraction in [0, 1), got {o.prune_ratio}")
    if not 0 <= o.acc_tolerance <= 1:
        raise ConfigError(f"acc_tolerance is a fraction in [0, 1] (0.02 = 2 points), "
                          f"got {o.acc_tolerance}")
    if not 0 <= o.holdout < 1:
        raise ConfigError(f"holdout must be in [0, 1), got {o.holdout}")
    if o.holdout == 0 and o.threshold is None and o.prune_ratio is None:
        raise ConfigError("choosing the threshold automatically needs held-out clean data: set "
                          "holdout > 0, or give a fixed threshold or prune_ratio")


def split_for_selection(clean: CleanData, o, seed: int,
                        purpose: str) -> tuple[CleanData, CleanData | None, bool]:
    """(images to learn masks on, held-out images to choose the threshold on or None, fallback).

    With a fixed threshold or prune_ratio no choice is made on data, so every image is used to
    learn the masks. When the held-out part would leave either side empty (a tiny clean set),
    both are the whole set and ``fallback`` is True.
    """
    if o.threshold is not None or o.prune_ratio is not None:
        return clean, None, False
    fit, held = clean.split(o.holdout, seed=derive_seed(seed, purpose))
    if len(fit) == 0 or len(held) == 0:
        return clean, clean, True
    return fit, held, False


def pruning_order(scores: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Unit indices from most to least suspect: ascending mask value; ties (many masks end at
    exactly 0 once clipped) broken by ``tiebreak`` (ascending; e.g. the mask's mean over the
    optimization, so a unit that collapsed early comes first), then by unit index."""
    scores = scores.detach().float().cpu()
    order = torch.arange(len(scores))
    if tiebreak is not None:
        order = torch.argsort(tiebreak.detach().float().cpu(), stable=True)
    return order[torch.argsort(scores[order], stable=True)]


def _prefix_sizes(limit: int) -> list[int]:
    """Prefix lengths 1..limit tried by the automatic rule: every one up to 64, then steps of
    about 1/32 of the prefix (the held-out accuracy moves slowly there, and each candidate is a
    full masked forward pass)."""
    sizes, k = [], 1
    while k <= limit:
        sizes.append(k)
        k += 1 if k < 64 else max(1, k // 32)
    return sizes


def select_pruning(model: nn.Module, units: Units, scores: torch.Tensor, held: CleanData | None,
                   *, threshold: float | None = None, prune_ratio: float | None = None,
                   acc_tolerance: float = 0.02, tiebreak: torch.Tensor | None = None,
                   thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                   ) -> tuple[torch.Tensor, list[tuple[str, int]], dict[str, Any], int]:
    """Which units to prune, from mask values ``scores`` (flat; low = suspect).

    Rules:
    - ``threshold``: prune the units whose mask is <= that threshold, as the official code of
      both papers (the ANP paper's default is 0.2);
    - ``prune_ratio``: the first ``prune_ratio`` of all units in :func:`pruning_order`;
    - neither (automatic, ours): walk down :func:`pruning_order` -- the official code's
      "prune by number" -- over the units whose mask fell to at most ``max(thresholds)``
      (0.9), and keep the LONGEST prefix such that it and every shorter one keep the accuracy
      on the held-out clean images ``held`` within ``acc_tolerance`` (a fraction) of the
      unpruned model's; nothing is pruned when already the first unit costs more. Why a walk
      and not a threshold sweep: on small networks the perturbation drives dozens of masks to
      exactly 0, clean units among them, so even the lowest threshold can cost too much while
      the few most suspect units cost nothing (measured on the CIFAR-10 ``vgg_small`` zoo: the
      threshold sweep pruned nothing on any model). Why stop at the first violation and not
      take the longest good prefix anywhere: past a drop, a later recovery on 100 images is
      noise, not evidence. Every prefix is evaluated in batched :class:`MaskEvaluator` calls
      with the units removed as the returned model removes them.

    Returns (flat bool tensor, True = prune; the pruned units as (group, channel) in pruning
    order; details; mask evaluations spent). When ``held`` is given the held-out curve is
    recorded for every rule.
    """
    scores = scores.detach().float().cpu()
    order = pruning_order(scores, tiebreak)
    details: dict[str, Any] = {}
    evaluations = 0
    sizes: list[int] = []
    curve_acc = None
    if held is not None:
        limit = int((scores <= max(thresholds) + 1e-9).sum())
        sizes = _prefix_sizes(limit)
        candidates = torch.ones(1 + len(sizes), units.total)
        for row, k in enumerate(sizes, start=1):
            candidates[row, order[:k]] = 0
        evaluator = MaskEvaluator(model, units, held.x, held.y)
        acc = torch.cat([evaluator.accuracy(chunk).cpu() for chunk in candidates.split(64)])
        evaluations += evaluator.evaluations
        base = float(acc[0])
        curve_acc = [float(a) for a in acc[1:]]
        details["holdout_curve"] = {
            "pruned": sizes,
            "mask_value": [round(float(scores[order[k - 1]]), 6) for k in sizes],
            "accuracy": curve_acc,
        }
        details["holdout_acc_unpruned"] = base

    prune = torch.zeros(units.total, dtype=torch.bool)
    if prune_ratio is not None:
        k = int(round(prune_ratio * units.total))
        prune[order[:k]] = True
        details.update(selection="prune_ratio", prune_ratio=prune_ratio, threshold=None,
                       reason=f"fixed prune_ratio={prune_ratio}: the {k} most suspect units")
    elif threshold is not None:
        prune = scores <= threshold
        details.update(selection="fixed threshold", threshold=threshold,
                       reason=f"fixed threshold={threshold}: units with mask <= {threshold}")
    else:
        if curve_acc is None:
            raise ConfigError("the automatic choice needs held-out clean data")
        base = details["holdout_acc_unpruned"]
        # compared in images, so that float rounding cannot turn "2 of 100" into 2.0000001 points
        n = len(held)
        allowed = math.floor(acc_tolerance * n + 1e-6)
        chosen = 0
        for k, a in zip(sizes, curve_acc):
            if round(base * n) - round(a * n) > allowed:
                break
            chosen = k
        prune[order[:chosen]] = True
        # the mask value of the last unit pruned: the effective threshold of this choice
        effective = round(float(scores[order[chosen - 1]]), 6) if chosen else None
        details.update(selection="held-out", threshold=effective,
                       reason=(f"longest prefix of the pruning order whose held-out accuracy, and "
                               f"that of every shorter prefix, stays within {acc_tolerance} of the "
                               f"unpruned model's ({base:.4f}): {chosen} of {len(sizes) and sizes[-1]} "
                               f"candidate units" if chosen else
                               f"already the most suspect unit costs more than {acc_tolerance} "
                               f"held-out accuracy (unpruned {base:.4f}); nothing pruned"))
    details["pruned_units"] = int(prune.sum())
    pruned = [units.unit_of(int(i)) for i in order if prune[i]]
    return prune, pruned, details, evaluations


def mask_values_by_group(units: Units, scores: torch.Tensor) -> dict[str, list[float]]:
    """{group name: [mask value per channel]} for ``details`` (rounded to 4 digits)."""
    return {name: [round(float(v), 4) for v in t] for name, t in units.split(scores.cpu()).items()}


def check_option_fields(o, positive: Sequence[str] = (), non_negative: Sequence[str] = (),
                        fractions: Sequence[str] = (), at_least_one: Sequence[str] = ()) -> None:
    """Range checks for numeric options, with messages naming the option."""
    for name in positive:
        if not getattr(o, name) > 0:
            raise ConfigError(f"option {name} must be > 0, got {getattr(o, name)}")
    for name in non_negative:
        if not getattr(o, name) >= 0:
            raise ConfigError(f"option {name} must be >= 0, got {getattr(o, name)}")
    for name in fractions:
        if not 0 <= getattr(o, name) <= 1:
            raise ConfigError(f"option {name} must be in [0, 1], got {getattr(o, name)}")
    for name in at_least_one:
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"option {name} must be an integer >= 1, got {value!r}")
