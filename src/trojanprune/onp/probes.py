"""Trigger-free backdoor probes: ONP's backdoor signal, pluggable.

The ONP paper (Li, Yu, Yi, arXiv 2405.17746) does not publish its reward's backdoor signal;
everything in this module is OUR design. The defender does not know the trigger, so a probe
builds a stand-in for it from the model and the clean images, then provides:

- :meth:`Probe.signal`: per-channel backdoor-sensitivity columns (flat ``(units.total, P)``),
  which become node features of the graphs (:mod:`.graphs`);
- :meth:`Probe.score`: a backdoor score in [0, 1] for a batch of candidate prunings (keep
  masks ``(M, units.total)``, 1 = keep), evaluated through the engine's
  :class:`~trojanprune.engine.MaskEvaluator` (batched; evaluations counted). Higher = the
  backdoor still works. It enters the reward as ``- backdoor_weight * score``.

Probes work on the two halves of the clean set: ``fit`` (to reverse triggers, unlearn, compute
signals) and ``held`` (the held-out half on which candidate prunings are scored, the same images
the reward's clean accuracy uses). The true trigger is never used.

Built in:

``reversed-trigger``: Neural-Cleanse trigger reverse shared with ShapPruning
    (:func:`trojanprune.reverse.reverse_triggers`) on the fit half. The presumed target is
    ``target`` if the user gives one, else the class flagged by the MAD anomaly index, else
    (no class flagged) the class with the smallest reversed mask. Score: the reversed
    trigger's success rate on the held-out images not of the target class, stamped with it,
    counted with a safety margin: a stamped image still counts as backdoored while the target
    logit is within ``score_margin`` (2.0) of the top logit, i.e. while the target keeps at
    least about e^-2 = 1/7 of the top class's probability. Why: a reversed trigger is a
    minimal, weaker stand-in for the real one (on the test fixture it is a few of the real
    patch's pixels), so a pruning that merely tips it below the decision boundary often leaves
    the real trigger working. Calibration (pruning the top-k channels of the activation-shift
    signal, reversed-trigger score vs the true trigger's ASR): on the MNIST test fixture, the
    plain rate gives 0.18 / 0.04 where the true ASR is 0.78 / 0.35, a margin of 2.4 logits
    gives 0.62 / 0.33; on the CIFAR-10 vgg_small BadNets zoo model the plain rate gives
    0.34 / 0.02 for a true 0.44 / 0.08, a margin of 1.9 gives 0.66 / 0.26, while a margin of
    7.6 (that model's median unpruned margin) stays above 0.99 after the backdoor is gone.
    ``score_margin=0`` gives the plain success rate. Signal: (1) the change of each channel's
    mean activation when the fit images are stamped, in units of its clean standard deviation
    (Neural Cleanse's own pruning criterion, normalized); (2) a first-order (Taylor) estimate of
    how much removing the channel lowers the target margin on stamped images.
``feature-trigger``: the same idea one layer down (:func:`trojanprune.reverse.reverse_feature_triggers`):
    per class, a channel mask and values written into a hidden layer; score = that trigger's
    success under each pruning (see :class:`FeatureTriggerProbe`). On the CIFAR-10 zoo it finds
    BadNets' and WaNet's targets (Neural Cleanse misses WaNet's) but flags a wrong class on
    Blended and SIG.
``auto``: both reverses; the feature-space probe when it flags a class the pixel-space reverse
    does not name, else the reversed-trigger probe (:class:`AutoProbe`).
``reversed-warp``: as ``reversed-trigger`` with a small smooth warp of the image plane
    (:func:`trojanprune.reverse.reverse_warps`, ours) as the stand-in (:class:`ReversedWarpProbe`).
``suspects`` (default): the pixel-space, warp and feature-space reverses (the feature one at
    two layers), no vote: every class any of them flags is a suspect (pixel space: both sides
    of the median), each with its own trigger, and the score is the mean of the suspects'
    scores, so the reward decides which triggers a cheap pruning can disable
    (:class:`SuspectsProbe`). The only probe that brings all four backdoors of the CIFAR-10
    vgg_small zoo down (ASR 0-4.7%; BENCHMARKS.md), and with the warp suspects (stop 38) all
    four of resnet20 too.
``anp``: Signal: ``1 - m`` for ANP's optimized neuron masks ``m`` (Wu & Wang, NeurIPS 2021;
    :func:`trojanprune.defenses.neuron_perturbation.anp_mask_scores` on the fit half; low mask
    = sensitive to adversarial neuron perturbation = suspect). Score: the share of the excess
    suspicion (each unit's ``1 - m`` above the network's median, normalized to sum 1) that a
    pruning keeps; pruning every suspect scores 0. No forward pass: we first scored prunings
    by the collapse of the network into one class under a fixed adversarial perturbation, but
    on the test fixture the perturbation collapsed it into a class that is not the target and
    no pruning changed that.
``unlearn``: RNP-style (Li et al., ICML 2023): a copy of the model is unlearned on the fit half
    (gradient ascent until clean accuracy <= ``unlearn_threshold``, 0.2) and masks that recover
    its clean accuracy are learned (:func:`trojanprune.defenses.rnp.unlearn`,
    :func:`~trojanprune.defenses.rnp.recover_masks`). Signal: ``1 - m`` for the recovered masks
    (RNP's criterion: the channels the recovery switches off). Score: as ``anp``, the share of
    excess suspicion kept. (The unlearned model collapses into the target class, but hard
    pruning lowers that collapse about as much for random channels as for the backdoor ones,
    so it is no score.) ``target`` is reported as the unlearned model's most predicted class.

A new probe: subclass :class:`Probe` and decorate it with :func:`register_probe`; ONP then
accepts ``probe="<name>"``.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from ..defenses.base import CleanData
from ..engine import ChannelMasks, MaskEvaluator, Units, target_margin
from ..errors import ConfigError, DataError
from ..metrics import class_accuracies, predict
from ..registry import Registry
from ..reverse.detect import SMALL_MASK_RATIO
from ..utils import derive_seed
from .graphs import channel_activations

#: how the ``suspects`` probe averages its suspects' scores (Options.suspect_weights)
SUSPECT_WEIGHTS = ("equal", "anomaly")
#: how the ``suspects`` probe groups its suspects (Options.suspect_combine)
SUSPECT_COMBINES = ("trigger", "class")
#: SuspectsProbe.answered: a suspect class is answered by a pruning when one of its stand-in
#: triggers lost at least this share of its unpruned score under it (ours; see ONP's
#: Options.refine_focus)
ANSWERED_SHARE = 0.5

PROBES: Registry = Registry("probe")


def register_probe(cls):
    """Class decorator: make a :class:`Probe` subclass available as ``probe=cls.name``."""
    PROBES.register(cls.name)(cls)
    return cls


def available_probes() -> list[str]:
    return PROBES.available()


def create_probe(name: str, model: nn.Module, units: Units, fit: CleanData, held: CleanData,
                 options: Any, seed: int = 0, progress: bool = False) -> "Probe":
    """Build and prepare the probe ``name`` (see :class:`Probe` for the arguments)."""
    return PROBES.get(name)(model, units, fit, held, options, seed=seed, progress=progress)


class Probe:
    """A trigger-free backdoor probe (base class).

    Args:
        model: the (private copy of the) model under repair; a probe must not modify it.
        units: its prunable units; masks and signals are flat over ``units.total``.
        fit: clean images for the probe's own work (trigger reverse, unlearning, signals).
        held: held-out clean images on which :meth:`score` judges candidate prunings.
        options: ONP's :class:`~trojanprune.defenses.onp.Options` (a probe reads the fields it
            needs, e.g. ``target``, ``reverse_steps``).
        seed: seeds every random choice of the probe.
        progress: show progress bars.

    Subclasses do their preparation in ``__init__`` and set :attr:`target`,
    :attr:`signal_names`; they implement :meth:`signal` and :meth:`score` and add the
    forward passes they spend outside their evaluators to :attr:`setup_evaluations`.
    """

    name: ClassVar[str]
    signal_names: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, units: Units, fit: CleanData, held: CleanData,
                 options: Any, seed: int = 0, progress: bool = False):
        self.model, self.units, self.fit, self.held = model, units, fit, held
        self.options, self.seed, self.progress = options, seed, progress
        self.target: int | None = None
        self.setup_evaluations = 0
        self.images: dict[str, torch.Tensor] = {}
        self._evaluators: list[MaskEvaluator] = []

    def signal(self) -> torch.Tensor:
        """(units.total, P) per-channel backdoor sensitivity (higher = more suspect)."""
        raise NotImplementedError

    def score(self, masks: torch.Tensor) -> torch.Tensor:
        """(M,) backdoor score in [0, 1] of each keep mask in ``masks`` (M, units.total)."""
        raise NotImplementedError

    @property
    def evaluations(self) -> int:
        """Forward passes over the probe's image sets, setup included."""
        return self.setup_evaluations + sum(ev.evaluations for ev in self._evaluators)

    def details(self) -> dict[str, Any]:
        """JSON-able facts about the probe (target, how it was chosen, ...)."""
        return {"probe": self.name, "target": self.target}

    # -- helpers for subclasses ----------------------------------------------------------
    def _evaluator(self, model: nn.Module, images: torch.Tensor) -> MaskEvaluator:
        ev = MaskEvaluator(model, self.units, images)
        self._evaluators.append(ev)
        return ev

    def _user_target(self) -> int | None:
        target = getattr(self.options, "target", None)
        if target is None:
            return None
        if not 0 <= int(target) < self.fit.num_classes:
            raise ConfigError(f"target must be a class in 0..{self.fit.num_classes - 1}, got {target}")
        return int(target)

    def _presume_target(self, reversed_, space: str) -> None:
        """Set :attr:`target` and :attr:`target_source` from a trigger reverse: the user's
        ``target``, else the class its anomaly index flags, else its best guess (``suspect``,
        as its ``suspect_rule`` says)."""
        user = self._user_target()
        if user is not None:
            self.target, self.target_source = user, "given by the user (option target)"
        elif reversed_.target is not None:
            self.target, self.target_source = reversed_.target, f"flagged by the MAD anomaly index{space}"
        else:
            self.target = int(reversed_.suspect)
            self.target_source = (f"no class flagged by the anomaly index{space}: "
                                  f"{reversed_.suspect_rule} (set option target to choose)")

    def _margin_score(self, logits: torch.Tensor) -> torch.Tensor:
        """(M,) share of images still counted as backdoored: the target logit within
        ``score_margin`` of the top one (see the module docstring)."""
        return (target_margin(logits, self.target) > -self.score_margin).float().mean(1)

    def _off_target(self, data: CleanData, target: int, what: str) -> torch.Tensor:
        x = data.x[data.y != target]
        if len(x) == 0:
            raise DataError(f"the {what} clean images are all of class {target} (the presumed "
                            "target); the backdoor probe needs images of other classes")
        return x


# ------------------------------------------------------------------------------------------
# shared signal computations
# ------------------------------------------------------------------------------------------

def margin_taylor(model: nn.Module, units: Units, images: torch.Tensor, target: int,
                  batch_size: int = 128) -> torch.Tensor:
    """(total,) first-order estimate of how much removing each unit LOWERS the mean target
    margin (target logit - best other logit) on ``images``: ``dmargin/dm`` at mask 1 (removing
    unit i moves its mask from 1 to 0, changing the margin by about ``-dmargin/dm_i``)."""
    mask = torch.ones(units.total, device=images.device, requires_grad=True)
    grad = torch.zeros(units.total, device=images.device)
    with ChannelMasks(model, units, mask), torch.enable_grad():
        for start in range(0, len(images), batch_size):
            margin = target_margin(model(images[start:start + batch_size]), target).sum() / len(images)
            grad += torch.autograd.grad(margin, mask)[0]
    return grad.detach().float().cpu()


def activation_shift(model: nn.Module, units: Units, clean: torch.Tensor,
                     stamped: torch.Tensor) -> torch.Tensor:
    """(total,) mean activation change from ``clean`` to ``stamped`` images (same images,
    paired), in units of the channel's standard deviation on clean images."""
    mean_c, std_c, _ = channel_activations(model, units, clean)
    mean_s, _, _ = channel_activations(model, units, stamped)
    return (mean_s - mean_c) / (std_c + 1e-3 * std_c.mean() + 1e-8)


# ------------------------------------------------------------------------------------------
# built-in probes
# ------------------------------------------------------------------------------------------

def pixel_reverse(model: nn.Module, fit: CleanData, options: Any, seed: int, progress: bool,
                  **extra):
    """Neural Cleanse's pixel-space reverse on the fit half, with ONP's reverse options (and
    ``extra`` keyword arguments of :func:`trojanprune.reverse.reverse_triggers`, which win).
    Options without ``reverse_per_class_stop`` get the batched stop."""
    from ..reverse import reverse_triggers

    kwargs = dict(extra)
    kwargs.setdefault("per_class_stop", bool(getattr(options, "reverse_per_class_stop", False)))
    kwargs.setdefault("small_mask_ratio", getattr(options, "small_mask_ratio", SMALL_MASK_RATIO))
    if getattr(options, "reverse_steps", None) is not None:
        kwargs["steps"] = int(options.reverse_steps)
    if getattr(options, "reverse_batch_size", None) is not None:
        kwargs["batch_size"] = int(options.reverse_batch_size)
    return reverse_triggers(model, fit.x, fit.y, fit.num_classes,
                            seed=derive_seed(seed, "onp-reverse"), progress=progress, **kwargs)


def warp_reverse(model: nn.Module, fit: CleanData, options: Any, seed: int, progress: bool):
    """The warp reverse (:mod:`trojanprune.reverse.warp`) on the fit half, with ONP's options."""
    from ..reverse import reverse_warps

    return reverse_warps(model, fit.x, fit.y, fit.num_classes,
                         steps=int(getattr(options, "warp_steps", 100)),
                         strength=float(getattr(options, "warp_strength", 1.0)),
                         seed=derive_seed(seed, "onp-warp"), progress=progress)


def feature_reverse(model: nn.Module, units: Units, fit: CleanData, options: Any, seed: int,
                    progress: bool, layer: str | None = None):
    """The feature-space reverse on ``feature_per_class`` fit images per class, at ``layer``
    (None: the ``feature_layer`` option, else the reverse's default layer)."""
    from ..reverse import reverse_feature_triggers

    x, y = per_class_subset(fit, int(getattr(options, "feature_per_class", 10)))
    layer = getattr(options, "feature_layer", None) if layer is None else layer
    return reverse_feature_triggers(
        model, units, x, y, fit.num_classes, layer=layer,
        steps=int(getattr(options, "feature_steps", 300)),
        small_mask_ratio=getattr(options, "small_mask_ratio", SMALL_MASK_RATIO),
        seed=derive_seed(seed, "onp-feature"), progress=progress)


@register_probe
class ReversedTriggerProbe(Probe):
    """Backdoor score = success rate of the Neural-Cleanse-reversed trigger (see module doc)."""

    name = "reversed-trigger"
    signal_names = ("trigger_act_shift", "trigger_taylor")

    def __init__(self, model, units, fit, held, options, seed=0, progress=False, *,
                 reversed_=None, target: int | None = None):
        """``reversed_`` and ``target``: a reverse already run (its cost counted elsewhere) and
        the class to probe, as the ``suspects`` probe passes them; None = run and presume."""
        super().__init__(model, units, fit, held, options, seed, progress)
        if reversed_ is None:
            reversed_ = self._reverse()
            self.setup_evaluations += reversed_.evaluations
        self.reversed = reversed_
        if target is None:
            self._presume_target(self.reversed, self.space)
        else:
            self.target, self.target_source = int(target), "a suspect of the suspects probe"
        t = self.target
        stamped_held = self.reversed.apply(self._off_target(held, t, "held-out"), t)
        self._score_ev = self._evaluator(model, stamped_held)
        fit_x = self._off_target(fit, t, "fit")
        stamped_fit = self.reversed.apply(fit_x, t)
        self._signal = torch.stack([activation_shift(model, units, fit_x, stamped_fit),
                                    margin_taylor(model, units, stamped_fit, t)], 1)
        self.setup_evaluations += 3  # two activation passes and one gradient pass over the fit images
        self.images = self._report_images(t)
        self.score_margin = float(getattr(options, "score_margin", 2.0))

    space = ""  # how _presume_target names the reverse's space

    def _reverse(self):
        return pixel_reverse(self.model, self.fit, self.options, self.seed, self.progress)

    def _report_images(self, t: int) -> dict[str, torch.Tensor]:
        return {"reversed_trigger_mask": self.reversed.masks[t].clamp(0, 1),
                "reversed_trigger_pattern": (self.reversed.masks[t] * self.reversed.patterns[t]).clamp(0, 1)}

    def signal(self) -> torch.Tensor:
        return self._signal

    def score(self, masks: torch.Tensor) -> torch.Tensor:
        return self._margin_score(self._score_ev.logits(masks))

    def details(self) -> dict[str, Any]:
        return {"probe": self.name, "target": self.target, "target_source": self.target_source,
                "score_margin": round(self.score_margin, 4), "reverse": self.reversed.summary()}


@register_probe
class ReversedWarpProbe(ReversedTriggerProbe):
    """Backdoor score = success of the reversed warp (OUR design; :mod:`trojanprune.reverse.warp`).

    As ``reversed-trigger`` with a small smooth warp of the image plane as the stand-in instead
    of Neural Cleanse's patch: the presumed target is the class the warp reverse flags (a warp
    of at most half a pixel that sends most fit images there), else the user's ``target``,
    else the class whose warp lifts its rate most; the score is the warp's success (with the same
    margin) on the held-out images not of the target; the signal is the activation shift and
    the Taylor estimate on the warped fit images.
    """

    name = "reversed-warp"
    space = " (warp)"

    def _reverse(self):
        return warp_reverse(self.model, self.fit, self.options, self.seed, self.progress)

    def _report_images(self, t: int) -> dict[str, torch.Tensor]:
        return {"reversed_warp_displacement": self.reversed.displacement(t, tuple(self.fit.x.shape[-2:]))}

    def details(self) -> dict[str, Any]:
        return {"probe": self.name, "target": self.target, "target_source": self.target_source,
                "score_margin": round(self.score_margin, 4), "warp_reverse": self.reversed.summary()}


def per_class_subset(data: CleanData, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of each class (the clean set's order is already seeded)."""
    keep = torch.cat([torch.nonzero(data.y == c).flatten()[:per_class] for c in range(data.num_classes)])
    keep = keep.sort().values
    return data.x[keep], data.y[keep]


@register_probe
class FeatureTriggerProbe(Probe):
    """Backdoor score = success of the feature-space reversed trigger (OUR design).

    :func:`trojanprune.reverse.reverse_feature_triggers` on ``feature_per_class`` fit images per
    class finds, for every class, the fewest channels of one hidden layer that send the images
    there; the MAD outlier is the presumed target (else the user's ``target``, else the smallest
    mask). Score: the share of held-out off-target images on which that written-in trigger
    still wins (target logit within ``score_margin`` of the top), under each candidate pruning.
    The trigger is written into the layer's output before the pruning masks act, so pruning its
    channels removes it, as it removes a real trigger's activation; prunings in earlier layers
    do not change it (it is written downstream of them). Signal: the target's feature mask
    (non-zero only at that layer) and a first-order estimate of how much removing each unit
    lowers the trigger's target margin on the fit images.
    """

    name = "feature-trigger"
    signal_names = ("feature_trigger_mask", "feature_trigger_taylor")

    def __init__(self, model, units, fit, held, options, seed=0, progress=False, *,
                 features=None, target: int | None = None):
        """``features`` and ``target``: as ``reversed_`` and ``target`` of
        :class:`ReversedTriggerProbe`."""
        super().__init__(model, units, fit, held, options, seed, progress)
        if features is None:
            features = feature_reverse(model, units, fit, options, seed, progress)
            self.setup_evaluations += features.evaluations
        self.features = features
        if target is None:
            self._presume_target(self.features, " (feature space)")
        else:
            self.target, self.target_source = int(target), "a suspect of the suspects probe"
        self.score_margin = float(getattr(options, "score_margin", 2.0))
        self._score_ev = self._evaluator(model, self._off_target(held, self.target, "held-out"))
        self._held_rows = held.y != self.target  # the rows of all held-out images it scores
        #: writes this probe's trigger into its layer (an ``edit`` for MaskEvaluator.edited_logits)
        self.edit = self.features.edit(self.target)
        fit_x = self._off_target(fit, self.target, "fit")
        start = units.offset(self.features.layer)
        mask_column = torch.zeros(units.total)
        mask_column[start:start + units[self.features.layer].size] = self.features.masks[self.target]
        self._signal = torch.stack([mask_column, self._taylor(fit_x)], 1)
        self.setup_evaluations += 1  # one gradient pass over the fit images

    def _taylor(self, images: torch.Tensor) -> torch.Tensor:
        module = self.model.get_submodule(self.features.module)
        handle = module.register_forward_hook(
            lambda mod, inputs, out: self.edit(out[None], 0, 1)[0], prepend=True)
        try:
            return margin_taylor(self.model, self.units, images, self.target)
        finally:
            handle.remove()

    def signal(self) -> torch.Tensor:
        return self._signal

    def score(self, masks: torch.Tensor) -> torch.Tensor:
        return self._margin_score(
            self._score_ev.edited_logits(masks, self.features.module, self.edit, grad=False))

    def score_held_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """:meth:`score` from (M, B, K) logits of ALL the held-out images with this trigger
        written in (:meth:`SuspectsProbe.score` computes them for several triggers at once)."""
        return self._margin_score(logits[:, self._held_rows.to(logits.device)])

    def details(self) -> dict[str, Any]:
        return {"probe": self.name, "target": self.target, "target_source": self.target_source,
                "score_margin": round(self.score_margin, 4), "feature_reverse": self.features.summary()}


@register_probe
class AutoProbe(Probe):
    """Both trigger reverses, then the probe whose reverse is trusted (OUR rule).

    The pixel-space reverse (Neural Cleanse) models a patch; the feature-space reverse models
    "a few channels switched on", which every trigger becomes inside the network. Rule: when the
    feature-space reverse flags a class (MAD index > 2) that differs from the pixel-space
    target, the ``feature-trigger`` probe is used; otherwise (the two agree, or feature space
    flags nothing) the ``reversed-trigger`` probe. A user ``target`` skips the vote and uses the
    reversed-trigger probe. Costs both reverses. Measured on the CIFAR-10 vgg_small zoo
    (BENCHMARKS.md): right on BadNets (both agree) and WaNet (the feature reverse overrules
    Neural Cleanse's wrong class 1, and ONP then removes the backdoor), wrong on Blended (the
    feature reverse flags class 8, a false positive, and overrules the correct pixel flag) and
    SIG (it flags the target and class 8 and picks 8); ``suspects`` keeps both.
    """

    name = "auto"

    def __init__(self, model, units, fit, held, options, seed=0, progress=False):
        super().__init__(model, units, fit, held, options, seed, progress)
        pixel = ReversedTriggerProbe(model, units, fit, held, options, seed, progress)
        self.inner: Probe = pixel
        self.parts: list[Probe] = [pixel]  # every probe built, so its work is counted
        self.vote = {"pixel_target": pixel.target, "pixel_flagged": pixel.reversed.target is not None,
                     "feature_target": None, "chosen": "reversed-trigger"}
        if self._user_target() is None:
            feature = FeatureTriggerProbe(model, units, fit, held, options, seed, progress)
            self.parts.append(feature)
            self.vote["feature_target"] = feature.features.target
            if feature.features.target is not None and feature.features.target != pixel.target:
                self.inner = feature
                self.vote["chosen"] = "feature-trigger"
        self.target = self.inner.target
        self.signal_names = self.inner.signal_names
        self.images = self.inner.images

    @property
    def evaluations(self) -> int:
        return sum(part.evaluations for part in self.parts)

    def signal(self) -> torch.Tensor:
        return self.inner.signal()

    def score(self, masks: torch.Tensor) -> torch.Tensor:
        return self.inner.score(masks)

    def details(self) -> dict[str, Any]:
        return {**self.inner.details(), "probe": self.name, "vote": self.vote}


@register_probe
class SuspectsProbe(Probe):
    """Every class either trigger reverse flags is a suspect; the reward decides (OUR design).

    ``auto`` has to bet on one reverse, and on the CIFAR-10 zoo each reverse is wrong on some
    attack (Neural Cleanse flags a wrong class on WaNet and SIG, the feature-space reverse a
    wrong one on Blended and SIG), while the true target was always among the classes the two
    flag together. So this probe does not vote: it runs both reverses and keeps one trigger per
    flagged (space, class) pair: the pixel trigger of each class the MAD index flags in pixel
    space, low side (Neural Cleanse) or high side (``suspect_large_masks``: a class that only
    an abnormally large patch reaches AND that the model hardly recognises on its own clean fit
    images, as clean-label SIG's target on the CIFAR-10 zoo: 0% against a median class's
    84-88%; a naturally hard class, MNIST's 1 and 7 on the test fixture, keeps its accuracy), the
    feature trigger of each class it flags (low side) in feature space, at the three-quarter
    layer and (``suspect_last_layer``) at the last conv group, where resnet20's WaNet target
    shows and the three-quarter layer shows nothing. When Neural Cleanse flags no small mask,
    the class with the smallest pixel mask is a suspect too when nothing else is suspected (as
    ``reversed-trigger``'s fallback) or when a feature-space reverse flags the same class: a
    sub-threshold guess counts only with an independent reverse behind it. Why: the MAD index
    misses a real patch trigger when the other classes' masks are widely spread; on a GELU
    ResNet with a 4x4 checkerboard patch (benchmarks/unseen_models.py) the target's mask was 4x
    smaller than any other class's (5.0 against 20-162) at index 1.7, the feature reverses
    flagged it too, and without the guess ONP left 84% ASR (45% with it). Uncorroborated, the
    guess is a false suspect that dilutes the score: on the resnet20 WaNet zoo model (smallest
    mask: class 6; the feature reverse flags 0, 2, 8) it raised ONP's ASR from 79% to 97%
    (BENCHMARKS.md). ``suspect_warps``: every class the warp reverse flags is a suspect too,
    its reversed warp the stand-in; on the resnet20 WaNet zoo model it is the one reverse that
    names the target with a stand-in a pruning cannot disable without cutting the real
    trigger's path (BENCHMARKS.md, "Stop 38"). A user ``target``: that class's trigger in
    every space and layer.
    Score: the MEAN of the suspects' scores (each as in its own probe), so the agent is paid
    for every trigger it disables; the max would hide the progress on the
    real trigger behind a false suspect that no cheap pruning disables. With
    ``suspect_weights="anomaly"`` the mean is weighted by each suspect's MAD anomaly index in
    its own reverse, so a marginal false suspect (index just above 2) does not dilute a strong
    one (index 8-30 on the zoo's targets). A false suspect's
    natural-feature trigger costs clean accuracy to disable, which the reward weighs. Signal:
    per channel, the largest value over the suspects of each of the two probes' signals
    (4 columns: the pixel and warp suspects share the input-space two; zero where a space has
    no suspect). Costs the four reverses and one scoring pass per pixel or warp suspect; the
    feature suspects of one layer share one pass up to that layer (:meth:`score_and_held_logits`).
    """

    name = "suspects"
    signal_names = ReversedTriggerProbe.signal_names + FeatureTriggerProbe.signal_names

    def __init__(self, model, units, fit, held, options, seed=0, progress=False):
        from ..reverse import high_side_outliers
        from ..reverse.feature import default_layer, last_conv_layer

        super().__init__(model, units, fit, held, options, seed, progress)
        # Every reverse runs once here; each suspect's probe reuses them.
        self.reversed = pixel_reverse(model, fit, options, seed, progress)
        first = getattr(options, "feature_layer", None) or default_layer(units)
        layers = [first]
        if getattr(options, "suspect_last_layer", True):
            last = last_conv_layer(units)
            if last != first:
                layers.append(last)
        self.feature_reverses = [feature_reverse(model, units, fit, options, seed, progress, layer)
                                 for layer in layers]
        self.features = self.feature_reverses[0]
        self.warps = (warp_reverse(model, fit, options, seed, progress)
                      if getattr(options, "suspect_warps", True) else None)
        self.setup_evaluations += self.reversed.evaluations + sum(
            f.evaluations for f in self.feature_reverses) + (self.warps.evaluations if self.warps else 0)
        self.class_accuracy: torch.Tensor | None = None  # on the fit images, when a large mask needs it
        self.large_masks = (self._unrecognised(high_side_outliers(self.reversed.mask_norms,
                                                                  self.reversed.threshold))
                            if getattr(options, "suspect_large_masks", True) else [])
        user = self._user_target()
        flagged = user is None  # the suspects are the classes the MAD index flagged
        if user is not None:
            pixel_classes = [user]
            feature_pairs = [(f, user) for f in self.feature_reverses]
            warp_classes = [user] if self.warps else []
        else:
            pixel_classes = list(self.reversed.flagged) + [c for c in self.large_masks
                                                           if c not in self.reversed.flagged]
            feature_pairs = [(f, c) for f in self.feature_reverses for c in f.flagged]
            warp_classes = list(self.warps.flagged) if self.warps else []
            if not pixel_classes and not feature_pairs and not warp_classes:
                flagged = False
        feature_classes = [c for _, c in feature_pairs]
        # Neural Cleanse's target (its smallest flagged mask) when a feature-space reverse
        # flags it too
        nc_target = self.reversed.target
        self.agreed = ([nc_target] if user is None and nc_target is not None
                       and nc_target in feature_classes
                       and getattr(options, "pixel_when_agreed", False) else [])
        if self.agreed:
            # Both spaces name the target: its pixel trigger alone is the stand-in, and the
            # other suspects go (see Options.pixel_when_agreed for why).
            pixel_classes, feature_pairs, warp_classes = list(self.agreed), [], []
        smallest = int(self.reversed.mask_norms.argmin())
        if user is None and not self.reversed.flagged and (not flagged or smallest in feature_classes):
            # Neural Cleanse flags no small mask: its best guess, the smallest mask's class, is a
            # suspect when nothing else is, or when a feature reverse flags the same class (see
            # the class docstring for why)
            pixel_classes = [smallest] + [c for c in pixel_classes if c != smallest]
        self.pixel = [ReversedTriggerProbe(model, units, fit, held, options, seed, progress,
                                           reversed_=self.reversed, target=c) for c in pixel_classes]
        self.warp = [ReversedWarpProbe(model, units, fit, held, options, seed, progress,
                                       reversed_=self.warps, target=c) for c in warp_classes]
        self.feature = [FeatureTriggerProbe(model, units, fit, held, options, seed, progress,
                                            features=f, target=c) for f, c in feature_pairs]
        # the feature suspects are scored together on all the held-out images (see score)
        self._held_ev = self._evaluator(model, held.x) if self.feature else None
        self.parts: list[Probe] = self.pixel + self.warp + self.feature
        self.suspects = ([("pixel", p.target, None) for p in self.pixel]
                         + [("warp", p.target, None) for p in self.warp]
                         + [("feature", p.target, p.features.layer) for p in self.feature])
        # Each suspect's evidence: its MAD anomaly index in its own reverse. Equal weights when
        # the suspects were not chosen by the index (a user target, or the fallback class).
        evidence = ([float(self.reversed.anomaly_index[c]) for c in pixel_classes]
                    + [float(self.warps.anomaly_index[c]) for c in warp_classes]
                    + [float(f.anomaly_index[c]) for f, c in feature_pairs])
        by_index = flagged and getattr(options, "suspect_weights", SUSPECT_WEIGHTS[0]) == "anomaly"
        weights = torch.tensor(evidence if by_index else [1.0] * len(self.parts))
        self.weights = weights / weights.sum()
        self.combine = getattr(options, "suspect_combine", SUSPECT_COMBINES[0])
        self._group_by_class()
        # Reported target (informative; the score uses every suspect): the class both spaces
        # flag, or the only suspect class; None when the suspects are different classes.
        # Large-mask suspects are weaker evidence (a naturally hard class is one too), so they
        # do not count here unless nothing else is suspected.
        # A warp suspect is input-space evidence, as a pixel one.
        small = ([c for c in pixel_classes if c not in self.large_masks] or pixel_classes) + warp_classes
        both = [c for c in dict.fromkeys(small) if c in feature_classes]
        classes = set(small) | set(feature_classes)
        self.target = both[0] if both else (classes.pop() if len(classes) == 1 else None)
        self.images = {f"{name}_class{p.target}": image for p in self.pixel + self.warp
                       for name, image in p.images.items()}
        # the warp stand-ins' signals share the pixel ones' columns (both are input-space
        # triggers: activation shift and Taylor estimate on stamped or warped images)
        self._signal = torch.cat([self._strongest(self.pixel + self.warp, len(ReversedTriggerProbe.signal_names)),
                                  self._strongest(self.feature, len(FeatureTriggerProbe.signal_names))], 1)

    def _unrecognised(self, classes: list[int]) -> list[int]:
        """The large-mask classes the model hardly recognises on their own clean fit images
        (accuracy below ``large_mask_accuracy_ratio`` x the median class's): a clean-label
        backdoor displaced that class's natural features, a naturally hard class still keeps them."""
        if not classes:
            return []
        from ..reverse import LARGE_MASK_ACCURACY_RATIO, unrecognised

        self.setup_evaluations += 1
        acc = torch.tensor(class_accuracies(predict(self.model, self.fit.x), self.fit.y.cpu(),
                                            self.fit.num_classes)) / 100
        self.class_accuracy = acc
        return unrecognised(classes, acc, getattr(self.options, "large_mask_accuracy_ratio",
                                                  LARGE_MASK_ACCURACY_RATIO))

    def answered(self, keep: torch.Tensor, share: float = ANSWERED_SHARE,
                 per_trigger: bool = False) -> "SuspectsProbe | None":
        """This probe restricted to the suspect classes that the pruning ``keep`` (a keep mask)
        has answered: a class is answered when one of its stand-in triggers lost at least
        ``share`` of its unpruned score under ``keep`` (OUR design; ONP's
        ``Options.refine_focus``). A backdoor is a shortcut that a few channels carry, so the
        class whose stand-in a small pruning disables is the one the pruning found; a false
        suspect's stand-in is a natural feature, which the same pruning hardly moves.
        ``per_trigger`` (``refine_focus="answered-triggers"``): of an answered class's
        feature-space stand-ins, keep only those the pruning answered itself; its input-space
        ones (pixel, warp) are kept whatever they lost. A feature trigger is written into the
        channels its reverse chose, so one the pruning hardly moved says only that the pruning
        missed those channels, not that the backdoor runs there; an input-space trigger enters
        where the real one does, and one the pruning only dented is still the backdoor's
        best stand-in (vgg_small BadNets seed 1: the choice halved both feature stand-ins and
        cut the pixel one by a third; refining on the feature ones alone left 3.60% ASR at
        -2.72 points, with the pixel one 3.47% at -2.00; BENCHMARKS.md, "Stop 45"). None when
        the pruning answered no suspect class or left nothing out (nothing to restrict).
        The view shares the parts' evaluators, so its evaluations count in this probe's."""
        masks = torch.stack([torch.ones_like(keep), keep]).float()
        scores = self._part_scores(masks, {})  # (parts, 2)
        unpruned, pruned = scores[:, 0], scores[:, 1]
        lost = torch.where(unpruned > 0, (unpruned - pruned) / unpruned.clamp_min(1e-12),
                           torch.zeros_like(unpruned))
        classes = [p.target for p in self.parts]
        hit = [i for i, share_lost in enumerate(lost.tolist()) if share_lost >= share]
        chosen = sorted({classes[i] for i in hit})
        if per_trigger:
            kept = [i for i, c in enumerate(classes)
                    if i in hit or (c in chosen and self.suspects[i][0] != "feature")]
            if not kept or len(kept) == len(classes):
                return None
        else:
            if not chosen or len(chosen) == len(set(classes)):
                return None
            kept = [i for i, c in enumerate(classes) if c in chosen]
        view = copy.copy(self)
        view.parts = [self.parts[i] for i in kept]
        view.suspects = [self.suspects[i] for i in kept]
        view.weights = self.weights[kept] / self.weights[kept].sum()
        view._group_by_class()
        view.answered_classes = chosen
        view.lost_share = [round(float(v), 4) for v in lost]
        return view

    def _group_by_class(self) -> None:
        """For ``suspect_combine="class"``: each suspect class's parts (a boolean index over
        :attr:`parts`) and their summed weight, fixed once from the parts and weights."""
        classes = torch.tensor([p.target for p in self.parts])
        self._class_groups = [(classes == c, float(self.weights[classes == c].sum()))
                              for c in classes.unique()]

    def _strongest(self, probes: list[Probe], columns: int) -> torch.Tensor:
        if not probes:
            return torch.zeros(self.units.total, columns)
        return torch.stack([p.signal() for p in probes]).amax(0)

    @property
    def evaluations(self) -> int:
        return super().evaluations + sum(p.evaluations for p in self.parts)

    def signal(self) -> torch.Tensor:
        return self._signal

    def score(self, masks: torch.Tensor) -> torch.Tensor:
        return self.score_and_held_logits(masks, plain=False)[0]

    def score_and_held_logits(self, masks: torch.Tensor,
                              plain: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`score`, and (``plain``) the plain (M, B, K) logits of the held-out images
        under the masks when they come at no extra cost (None otherwise).

        The feature suspects written into one layer are scored in one pass of all the
        held-out images (:meth:`~trojanprune.engine.MaskEvaluator.branch_logits`): the network
        up to that layer runs once per mask for all of them, and the plain logits, which
        ONP's reward needs for its held-out accuracy, are one more branch. The same numbers
        as scoring each suspect on its own images. On resnet20 with three feature suspects at
        the last conv group this is most of the masked evaluation's work (BENCHMARKS.md,
        "Stop 40")."""
        if not plain:
            return self._combine(self._part_scores(masks, {})), None
        held_logits, score_rows = self.staged_score(masks)
        return score_rows(torch.ones(len(masks), dtype=torch.bool))[1], held_logits

    def staged_score(self, masks: torch.Tensor):
        """``(held_logits, score_rows)``: the plain held-out logits under ``masks`` (None when
        the probe has no feature suspect to compute them with), and a function giving
        :meth:`score` of the masks ``rows`` (boolean) asks for. The first layer's feature
        suspects are scored for every mask with the plain logits, the other suspects only
        for the rows asked: ONP's refinement keeps only the prunings whose held-out accuracy
        is within its guard, so it asks for those alone.

        ``score_rows(rows, screen=None)`` scores the other suspects one stage at a time (each
        further layer's feature suspects in one shared pass, then each input-space suspect)
        and, with a ``screen``, before each stage keeps only the masks for which
        ``screen(indices, lower)`` is true, ``lower`` being the score with the suspects not
        yet scored counted as 0: a lower bound of the score, since every suspect's score is at
        least 0 and the combination grows with each of them. It returns ``(indices, scores)``
        of the masks kept to the end, scored in full (the same numbers as :meth:`score` of
        those masks): a screen that rejects only masks whose lower bound already disqualifies
        them changes no decision about the others."""
        groups = self._feature_groups()
        known: dict[int, torch.Tensor] = {}
        held_logits = None
        first: list[int] = []
        if groups:
            module, first = next(iter(groups.items()))
            out = self._held_ev.branch_logits(masks, module, [self.parts[i].edit for i in first] + [None])
            known = {i: self.parts[i].score_held_logits(logits) for i, logits in zip(first, out)}
            held_logits = out[-1]

        def score_rows(rows: torch.Tensor, screen=None):
            index = torch.as_tensor(rows, dtype=torch.bool).cpu().nonzero().flatten()
            scores = {i: s.float().cpu()[index] for i, s in known.items()}
            stages = [parts for parts in groups.values() if parts is not first]
            stages += [[i] for i, p in enumerate(self.parts) if not isinstance(p, FeatureTriggerProbe)]
            for stage in stages:
                if screen is not None and len(index):
                    kept = screen(index, self._combine(self._with_zeros(scores, len(index))))
                    index = index[kept]
                    scores = {i: s[kept] for i, s in scores.items()}
                new = (self._score_parts(masks[index.to(masks.device)], stage) if len(index)
                       else {i: torch.zeros(0) for i in stage})
                scores.update({i: s.float().cpu() for i, s in new.items()})
            return index, self._combine(self._with_zeros(scores, len(index)))

        return held_logits, score_rows

    def _feature_groups(self) -> dict[str, list[int]]:
        """The indices of the feature suspects in :attr:`parts`, by the module they write to."""
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(self.parts):
            if isinstance(p, FeatureTriggerProbe):
                groups.setdefault(p.features.module, []).append(i)
        return groups

    def _score_parts(self, masks: torch.Tensor, parts: list[int]) -> dict[int, torch.Tensor]:
        """The scores of ``masks`` by the suspects ``parts`` (indices into :attr:`parts`);
        the feature suspects of one layer share one pass."""
        scores: dict[int, torch.Tensor] = {}
        for module, group in self._feature_groups().items():
            todo = [i for i in group if i in parts]
            if todo:
                out = self._held_ev.branch_logits(masks, module, [self.parts[i].edit for i in todo])
                scores.update({i: self.parts[i].score_held_logits(logits) for i, logits in zip(todo, out)})
        scores.update({i: self.parts[i].score(masks) for i in parts if i not in scores})
        return scores

    def _part_scores(self, masks: torch.Tensor, known: dict[int, torch.Tensor]) -> torch.Tensor:
        """(parts, M) every suspect's score of ``masks``; ``known``: scores already computed,
        by part index."""
        scores = dict(known)
        scores.update(self._score_parts(masks, [i for i in range(len(self.parts)) if i not in known]))
        return self._with_zeros(scores, len(masks))

    def _with_zeros(self, scores: dict[int, torch.Tensor], m: int) -> torch.Tensor:
        """(parts, m) from the scores known by part index; 0 for the others."""
        return torch.stack([scores[i].float().cpu() if i in scores else torch.zeros(m)
                            for i in range(len(self.parts))])

    def _combine(self, scores: torch.Tensor) -> torch.Tensor:
        """(M,) backdoor score from the (parts, M) suspects' scores."""
        if self.combine == "class":
            # one term per suspect class: the largest score of its triggers, weighed by the
            # sum of their weights (its backdoor is gone only once no stand-in works)
            return torch.stack([scores[parts].amax(0) * weight
                                for parts, weight in self._class_groups]).sum(0)
        return (self.weights[:, None] * scores).sum(0)

    def details(self) -> dict[str, Any]:
        return {"probe": self.name, "target": self.target,
                "combine": self.combine,
                "pixel_when_agreed": list(self.agreed),
                "suspects": [{"space": space, "class": c, "weight": round(float(w), 4),
                              **({"layer": layer} if layer else {})}
                             for (space, c, layer), w in zip(self.suspects, self.weights)],
                "large_mask_suspects": list(self.large_masks),
                **({"fit_class_accuracy": [round(float(a), 4) for a in self.class_accuracy]}
                   if self.class_accuracy is not None else {}),
                "score": "weighted mean of the suspects' trigger scores",
                "reverse": self.reversed.summary(), "feature_reverse": self.features.summary(),
                **({"warp_reverse": self.warps.summary()} if self.warps else {}),
                **({"feature_reverse_last": self.feature_reverses[1].summary()}
                   if len(self.feature_reverses) > 1 else {})}


def suspicion_weights(suspicion: torch.Tensor) -> torch.Tensor:
    """(total,) non-negative weights summing to 1: each unit's suspicion in excess of the
    network's median unit (most units are not suspect at all)."""
    excess = (suspicion.float() - suspicion.float().median()).clamp_min(0)
    total = excess.sum()
    if not total > 0:
        return torch.zeros_like(excess)
    return excess / total


class _MaskSuspicionProbe(Probe):
    """Shared by the ``anp`` and ``unlearn`` probes: a learned neuron mask ``m`` per unit (low =
    suspect), signal ``1 - m``, score = the share of the excess suspicion the pruning keeps."""

    def _set_suspicion(self, masks: torch.Tensor) -> None:
        self.mask_values = masks.detach().float().cpu()
        self._signal = (1 - self.mask_values)[:, None]
        self._weights = suspicion_weights(1 - self.mask_values)

    def signal(self) -> torch.Tensor:
        return self._signal

    def score(self, masks: torch.Tensor) -> torch.Tensor:
        keep = torch.as_tensor(masks, dtype=torch.float32).cpu().clamp(0, 1)
        if keep.dim() == 1:
            keep = keep[None]
        if not bool(self._weights.sum() > 0):
            return torch.zeros(keep.shape[0])
        return keep @ self._weights

    def _suspects(self, n: int = 10) -> list[list]:
        order = torch.argsort(self.mask_values, stable=True)[:n]
        return [[*self.units.unit_of(int(i)), round(float(self.mask_values[i]), 4)] for i in order]


@register_probe
class ANPProbe(_MaskSuspicionProbe):
    """Signal: ANP's neuron masks; score: the share of their suspicion a pruning keeps."""

    name = "anp"
    signal_names = ("anp_suspicion",)

    def __init__(self, model, units, fit, held, options, seed=0, progress=False):
        super().__init__(model, units, fit, held, options, seed, progress)
        from ..defenses.neuron_perturbation import anp_mask_scores

        anp_options = {"eps": float(getattr(options, "anp_eps", 0.4)),
                       "iterations": int(getattr(options, "anp_iterations", 2000))}
        masks, spent = anp_mask_scores(model, units, fit, anp_options,
                                       seed=derive_seed(seed, "onp-anp"), progress=progress)
        self.setup_evaluations += spent
        self.target = self._user_target()
        self._set_suspicion(masks)

    def details(self) -> dict[str, Any]:
        return {"probe": self.name, "target": self.target,
                "most_suspect_units": self._suspects()}


@register_probe
class UnlearnProbe(_MaskSuspicionProbe):
    """Signal: RNP's recovered masks on the unlearned model; score: the share of their
    suspicion a pruning keeps."""

    name = "unlearn"
    signal_names = ("rnp_suspicion",)

    def __init__(self, model, units, fit, held, options, seed=0, progress=False):
        super().__init__(model, units, fit, held, options, seed, progress)
        from ..defenses.base import make_options
        from ..defenses.rnp import Options as RNPOptions
        from ..defenses.rnp import recover_masks, unlearn

        rnp = make_options(RNPOptions, {
            "unlearn_lr": float(getattr(options, "unlearn_lr", 0.01)),
            "clean_threshold": float(getattr(options, "unlearn_threshold", 0.2)),
            "unlearn_epochs": int(getattr(options, "unlearn_epochs", 20)),
            "recover_epochs": int(getattr(options, "recover_epochs", 20)),
        }, "rnp")
        gen = torch.Generator().manual_seed(derive_seed(seed, "onp-unlearn"))
        unlearned, self.unlearn_info = unlearn(model, fit, rnp, gen, progress)
        masks, self.recover_info = recover_masks(unlearned, units, fit, rnp, gen, progress)
        with torch.no_grad():
            pred = torch.cat([unlearned(fit.x[s:s + 256]).argmax(1) for s in range(0, len(fit), 256)])
        del unlearned
        self.setup_evaluations += self.unlearn_info["epochs"] + rnp.recover_epochs + 1
        counts = torch.bincount(pred.cpu(), minlength=fit.num_classes)
        self.collapse = [round(float(c) / len(fit), 4) for c in counts]
        user = self._user_target()
        # Informative only (the score does not use it): the unlearned model's favourite class.
        self.target = user if user is not None else int(counts.argmax())
        self._set_suspicion(masks)

    def details(self) -> dict[str, Any]:
        return {"probe": self.name, "target": self.target,
                "target_source": "the class the unlearned model predicts most (informative)",
                "unlearned_predicted_fraction": self.collapse,
                "unlearn": {k: self.unlearn_info[k] for k in ("epochs", "reached_threshold")},
                "recover_epochs": self.recover_info["epochs"],
                "most_suspect_units": self._suspects()}


__all__ = ["PROBES", "ANPProbe", "AutoProbe", "FeatureTriggerProbe", "Probe",
           "ReversedTriggerProbe", "SuspectsProbe", "UnlearnProbe", "feature_reverse",
           "per_class_subset", "pixel_reverse", "activation_shift", "available_probes", "create_probe",
           "margin_taylor", "register_probe",
           "suspicion_weights"]
