"""ShapPruning: few-shot and data-free backdoor repair by Shapley estimation.

Guan, Tu, He, Tao, "Few-shot Backdoor Defense Using Shapley Estimation", CVPR 2022
(arXiv 2112.14889).

What the paper confirms: four stages -- trigger and data reverse, detection, Shapley estimation,
mitigation; it works with one image per class or with no data at all (data reverse synthesizes
inputs from the model); it accounts for interactions between neurons by estimating each neuron's
Shapley value for the backdoor behaviour; infected neurons are under 1% of all neurons; a
discarding threshold and an epsilon-greedy strategy speed up the estimation so that a repair
takes minutes. It builds on Neuron Shapley (Ghorbani & Zou, NeurIPS 2020: truncated Monte-Carlo
permutation sampling over filters, plus a bandit that stops sampling clearly unimportant ones).

What is OUR reconstruction (the paper does not publish these details):

1. Data reverse (data-free only, ``clean=None``): DeepInversion-style synthesis of
   ``synth_per_class`` images per class -- class confidence + matching every BatchNorm layer's
   running mean/var + total-variation and L2 priors (:func:`trojanprune.reverse.synthesize`).
   A model without BatchNorm falls back to confidence + priors with a ``RuntimeWarning``.
2. Trigger reverse: Neural-Cleanse mask + pattern for every class, all classes in one batched
   problem, adaptive cost schedule (:func:`trojanprune.reverse.reverse_triggers`). By default
   (``reverse="auto"``, ours) a feature-space reverse is consulted where Neural Cleanse's
   verdict is silent or ambiguous, and where no reverse nor the clean-label rule below names a
   target, a warp reverse (:func:`trojanprune.reverse.reverse_warps`, ours: one small smooth
   warp of the image plane per class) (see ``Options.reverse``).
3. Detection: MAD anomaly index of the mask L1 norms, threshold 2, low side; the flagged
   class with the smallest norm is the target. Where that flags nothing (and no feature-space
   flag is followed), OUR clean-label rule (``suspect_large_masks``, shared with ONP): a
   HIGH-side outlier whose own few clean images the model misclassifies is the target, and
   the game is played on its (large) pixel trigger. Where no reverse names a target either,
   OUR small-mask ratio rule (``small_mask_ratio``): a class whose pixel mask is at most a third
   of the median class's is the target. No target -> verdict "no backdoor detected" (naming
   the closest candidate: the class ``force`` would prune for, with its anomaly index) and the
   model is returned unpruned, unless ``force`` (then the class with the smallest mask is
   treated as the target).
4. Shapley estimation (:func:`trojanprune.shapley.estimate_shapley`): players are the channels
   of ``layers`` (default ``auto``: every conv group but the first third); a coalition is the
   set of channels kept; its value is the reversed trigger's effect on the few non-target
   images, stamped with a POOL of ``trigger_pool`` (3) reversed triggers of the target (the
   detection's and two more from other random starts, ours, so that channels answering one
   stand-in's particular pixels weigh less) -- by default the
   mean *hinge margin* ``max(0, logit_target - max other logit)`` (smooth, 0 once the trigger
   no longer wins, which makes truncation meaningful), or ``value="success"``, the fraction
   sent to the target. Truncated permutation sampling; the discarding threshold stops sampling
   channels whose upper confidence bound falls below the top-``top_k`` boundary; epsilon-greedy
   spends each later permutation on the current top ``top_k`` (prob. 1 - epsilon) or on random
   active channels (prob. epsilon). Every coalition is evaluated with the engine's
   :class:`~trojanprune.engine.MaskEvaluator` (one permutation = one batch of masks, prefix
   layers cached). ``details["shapley"]`` reports the evaluations spent and those plain
   permutation sampling would have spent for the same number of permutations.
5. Mitigation: walk down the Shapley ranking (the ``top_k`` best channels with a positive
   value), adding one channel at a time, within the budget (``budget`` x ALL prunable channels
   of the model, rounded up, so any positive budget allows at least one channel) and a clean
   guard on the few clean (or synthesized) images: a channel is skipped if, together with the
   ones already chosen, it costs more than ``acc_tolerance`` accuracy or more than
   ``margin_tolerance`` of the images' mean true-class margin (or, with the optional
   ``kl_tolerance``, ours and off by default, moves the model's class probabilities on those
   images and eight shifted copies of each by a mean KL divergence of more than that). The
   walk stops once the
   reversed trigger no longer works: it sends at most ``stop_rate`` of the few images to the
   target AND its *lift* is at most ``stop_lift``. The lift is
   ``(m_trig - m_clean) / -m_clean``, with ``m`` the mean target margin of the few non-target
   images with and without the trigger: the fraction of the distance to the target class that
   the trigger still closes (1 = the target ties). Why not just "flips no image": Neural
   Cleanse's trigger is the *smallest* mask that works, weaker than the attacker's, so it stops
   flipping images while the real trigger still works on a sizeable share (on our MNIST test
   model: ~20-30% ASR left); requiring it to close less than half of the gap leaves ~2-6%.
   When the trigger still works at the end, ``details["mitigation"]["reason"]`` says why
   (budget, candidates, guard vetoes). OURS (``recheck``, on by default): where the walk stopped
   with budget left, the target's trigger is reversed again on the pruned model, and while it
   is still a small-mask outlier, a new game and walk use the rest of the budget.

All choices are made on the defender's images (or synthesized ones) and the reversed trigger;
the true trigger and the test set are never seen.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import MaskEvaluator, apply_masks_permanently, discover_units, target_margin
from ..engine.inputs import parse_input_shape, probe_input
from ..errors import ConfigError, DataError, TrojanPruneError
from ..metrics import class_accuracies, predict
from ..reverse import (LARGE_MASK_ACCURACY_RATIO, FeatureTriggers, ReversedWarps, detect_outlier,
                       high_side_outliers, reverse_feature_triggers, reverse_triggers, reverse_warps,
                       synthesize, unrecognised)
from ..reverse.detect import small_mask_ratio_option, small_masks
from ..reverse.feature import default_layer
from ..shapley import GREEDY_RANKS, estimate_shapley
from ..utils import derive_seed
from . import register
from .base import CleanData, Defense, RepairResult, optional_number

_VALUES = ("margin", "success")
_KINDS = ("conv", "linear", "any")
_REVERSES = ("pixel", "auto", "feature", "warp")


@dataclass
class Options:
    """ShapPruning options (paper: Guan et al. CVPR 2022; defaults marked "ours" are our choices).

    Data reverse (data-free mode only):
        synth_per_class: images synthesized per class (2, ours).
        synth_steps: Adam steps of the synthesis (400, ours).
        input_shape: "C,H,W" of the model's input; only needed in data-free mode, where it is
            otherwise probed (first conv's input channels; the first of 32, 28, 64, ... pixels
            the model runs on) with a warning, since a wrong size gives wrong images.
    Trigger reverse and detection:
        reverse_steps: at most this many steps of the batched Neural Cleanse optimization (300,
            ours; Neural Cleanse early-stops too).
        reverse_lr: Adam learning rate (0.1, Neural Cleanse).
        init_cost: L1 cost of the mask once the schedule starts (1e-3, Neural Cleanse).
        cost_schedule: "adaptive" (Neural Cleanse's) or "fixed" (init_cost throughout).
        success_threshold: a reversed trigger "works" when it sends this fraction of the images
            (not of its class) to its class (0.9, ours; Neural Cleanse: 0.99 on plenty of data).
            With 9 images it still means all of them; with 18 synthesized ones it lets one
            unnaturally robust synthetic image not decide the mask size.
        anomaly_threshold: MAD anomaly index above which a small-mask class is flagged (2,
            Neural Cleanse).
        small_mask_ratio: a class whose reversed mask (pixel or feature space) is at most 1/this
            of the median class's is flagged too, whatever its MAD index (3.0, ours; None: Neural
            Cleanse's test alone). Why: where the clean classes' masks spread widely the MAD
            test misses a target whose mask is 3-9 times below the median (BENCHMARKS.md,
            "Stop 43"). The recheck's "still an outlier" test is the same detection.
        force: prune even when no backdoor is detected, treating the class with the smallest
            reversed mask as the target (False).
        reverse: "auto" (default, OURS), "pixel" (the paper's Neural-Cleanse-style reverse
            alone), "feature" (OURS: the feature-space reverse of
            :func:`trojanprune.reverse.reverse_feature_triggers` alone) or "warp" (OURS: the
            warp reverse of :func:`trojanprune.reverse.reverse_warps` alone, the game played
            on the target's reversed warp). "auto" runs the
            paper's reverse first; when its MAD test flags exactly one class, that is the
            verdict and nothing else runs. When it flags no class or several, the feature-space
            reverse is consulted on the same images, and its flag is followed (the game is
            played on its trigger, written into its layer) only where the two agree: it names
            one of Neural Cleanse's flags other than its pick, or Neural Cleanse flags nothing
            but its mask for that class is small too (below the median, anomaly index >= 1;
            see ``_follow_feature``). A lone feature flag is not followed. Why the default: Neural
            Cleanse models a patch, and on a warping trigger its verdict is a knife edge that
            moved with the order of floating-point sums: on the same WaNet model and 10 images
            it flagged the target, a wrong class, or nothing on different machines, while the
            feature reverse flagged the target both times it was run there (BENCHMARKS.md).
            Where Neural Cleanse is unambiguous, "auto" is the paper's method at its cost.
            Where neither of the two nor the clean-label rule (``suspect_large_masks``) names a
            target, "auto" runs the warp reverse (a universal warp of at most half a pixel per
            class; a class it sends most images to is flagged) and plays the game on the
            flagged class's warp (not in data-free mode, where the images are synthesized:
            ``reverse="warp"`` asks for it there). Why: on the resnet20 WaNet
            zoo model both other reverses are silent on the few images, while the target's
            half-pixel warp sends every image to it and the other classes' at most a few
            (BENCHMARKS.md, "Stop 38"). "MAD test" above is Neural Cleanse's alone: a class
            only ``small_mask_ratio`` flags is the target last, where none of the other reverses
            names one (on the MobileNet-like WaNet model the warp reverse's trigger repairs what
            that class's small pixel mask does not; BENCHMARKS.md, "Stop 43").
        feature_steps: Adam steps of the feature-space reverse (300, ours).
        suspect_large_masks: where the low-side test flags no class and no feature-space flag
            is followed, a class whose pixel mask is a HIGH-side MAD outlier (index > the
            anomaly threshold) and whose own few clean images the model misclassifies is the
            target (True, OURS; ONP's option of the same name). Why: a clean-label backdoor
            (SIG) poisons the target's own training images, so the model stops recognising
            clean images of it, and only an abnormally large patch reaches it: on the CIFAR-10
            SIG zoo models the target's mask is the largest from the 10 images (index 12.0 and
            7.2) and its one clean image is misclassified, while Neural Cleanse's low side flags
            nothing (BENCHMARKS.md). Few-shot only: synthesized images are made to be
            classified as their class, so data-free mode cannot see the misclassification.
        large_mask_accuracy_ratio: "misclassifies" means accuracy on the class's own images
            below this fraction of the median class's (0.5, ours, as ONP's); with one image
            per class, the class's one image is wrong while most classes' are right.
    Shapley estimation:
        trigger_pool: the game (and the mitigation's stop rule) is played on the few images
            stamped with this many reversed triggers of the target: the detection's and
            ``trigger_pool - 1`` more reversed for the target alone from other random starts
            (3, ours; 1 = the detection's trigger alone, the paper's setting). On the CIFAR-10
            zoo it changed 2 of the 6 pixel-trigger repairs measured against 1: resnet20 SIG
            for the better (DER 55.31 -> 66.27), vgg_small Blended for the worse (90.27 ->
            88.97); BENCHMARKS.md, "Stop 25". Five met issue 4's target on 4 of the 20
            vgg_small few-shot repairs against 8 with three, and slow the game ("Stop 44"). A
            pixel-space trigger only; a feature-space one is used alone.
        layers: unit groups whose channels are the players: "auto", "last:N", "first:N", "all",
            or comma-separated group names. "auto" (default, ours): every group but the first
            third by execution order, rounded down (6 conv groups -> the last 4, 12 -> the
            last 8, 3 -> the last 2, 2 -> both). Why not the first third: its channels answer a reversed pattern's
            pixels rather than the backdoor's feature, and removing them costs accuracy the
            few images do not show; with "all", first-layer channels rank high on the CIFAR-10
            vgg_small BadNets model and the repair loses 7.4 points (BENCHMARKS.md, "Which
            channels play"). Why not only the last two groups (the default until stop 25): the
            backdoor runs through a few middle channels, and within the 1% budget the last two
            groups cannot carry it off -- even an oracle that knows the trigger leaves 19.85%
            ASR with 5 of their channels on that model (BENCHMARKS.md, "Stop 25"). What
            "auto" gives up: a backdoor that lives in the first third. On the CIFAR-10
            vgg_small Blended model one second-layer channel carries it (pruned alone: ASR
            100% -> 2.15% at -0.10 points), and without it five channels leave 7.25% even when
            an oracle that knows the trigger picks them; "all" repairs that model on 5 seeds of
            5 (ASR 0.92-1.68%; issue 4's target met on 4), "auto" on none. But "all"
            met it on no BadNets or SIG repair (BENCHMARKS.md, "Stop 31"): ten images cannot
            tell that channel from the early channels a stand-in trigger leans on, so "auto"
            stays the default.
        kind: "conv" (default; the paper prunes filters), "linear" or "any" group kinds. A
            model without conv layers plays its hidden linear neurons under "conv" (ours;
            ``details["shapley"]["players_kind"]`` says so).
        value: "margin" (mean hinge margin of the target under the reversed trigger, ours) or
            "success" (fraction of the few images sent to the target).
        permutations: permutations sampled (100, ours).
        warmup: first permutations sampled in full, before the accelerations start (10, ours).
        truncation_tol: truncate a permutation once the value is this fraction of
            |v(all) - v(none)| from v(none) (0.05, ours; 0 disables truncation).
        discard_threshold: "auto" (stop sampling a channel whose upper confidence bound is below
            the top_k-th largest lower bound), a number r (threshold r * (v(all) - v(none))),
            or "off" ("auto", ours).
        greedy: epsilon-greedy choice of the channels each later permutation is spent on (True,
            the paper's acceleration). It halves the Shapley stage's evaluations, but its top 5
            kept only 2 of plain sampling's on two vgg_small models, where truncation and the
            discarding threshold kept all 5. Turned off, the repairs on the CIFAR-10 zoo got
            better on 2 models and worse on 3 (BENCHMARKS.md, "Stop 26").
        epsilon: probability of a random (exploring) choice instead of the current top (0.2, ours).
        greedy_rank: what "the current top" ranks by: "mean" (the mean marginal so far, ours)
            or "ucb" (its upper confidence bound, ours: a channel with few samples that may
            still belong to the top set is sampled too). On the CIFAR-10 vgg_small zoo over
            five seeds, "ucb" met issue 4's target on BadNets on 5 seeds of 5 ("mean": 3) but
            made SIG worse (mean DER 74.71 against 85.49), so "mean" stays the default
            (BENCHMARKS.md, "Stop 28").
        top_k: channels per greedy permutation and the "top" boundary of the discarding
            threshold (0 = auto: max(10, 2 x the pruning budget), ours).
        z: width of the confidence bounds in standard errors (2.0, ours).
    Mitigation:
        budget: at most this fraction of ALL prunable channels of the model is pruned (0.01,
            the paper: infected neurons are under 1%); rounded up, so any positive budget allows
            at least one channel. 0 (nothing may be pruned) is refused.
        stop_rate, stop_lift: the reversed trigger "no longer works" once it sends at most
            ``stop_rate`` of the few images to the target (0.0, ours) and closes at most
            ``stop_lift`` of their distance to the target (0.5, ours; see stage 5 above).
        acc_tolerance: clean guard: accuracy on the few clean (or synthesized) images may drop
            by at most this much (0.1, ours: one image in ten).
        margin_tolerance: clean guard: their mean true-class margin may drop by at most this
            fraction (0.2, ours; a finer signal than the accuracy of ten images).
        kl_tolerance: an optional third clean guard (ours; None = off, the default): the mean
            KL divergence (nats) of the pruned model's class probabilities from the unpruned
            model's, on the few clean images and eight shifted copies of each, may be at most
            this. Why it exists: ten images' accuracy and margin do not see a few points lost.
            On the CIFAR-10 resnet20 SIG model, the channels they let through cost 3.0 and then
            7.9 test points, while this KL rose to 0.10 and 0.19; no other repair on the
            CIFAR-10 zoo passed 0.074 (vgg_small SIG, -2.1 points). At 0.08 it keeps resnet20
            SIG within 2.2 points instead of 8.5. Why it is off: it trades ASR for accuracy,
            and DER judges the trade worse. Its scale is also the model's: on two unseen MNIST
            models it saved 1.4 and 2.6 points but left 79% and 58% ASR instead of 29% and 41%.
            Data-free (shifted synthesized images), it vetoed 12 of 14 candidates on the MNIST
            test model. Use it when accuracy comes first, with a value measured on a model like
            yours (the benchmark's walk mode shows the KL of each step; BENCHMARKS.md, "Stop 26").
        recheck: rounds of a second look after the walk (1, ours; 0 = off, the paper's
            single walk). Where the walk stopped because the reversed triggers no longer work, with
            budget left and a target Neural Cleanse flagged as a small-mask outlier, the target's
            trigger is reversed again (``trigger_pool`` starts) on the pruned model. If its
            smallest working mask is still a low-side outlier among the detection's masks of the
            other classes, the backdoor survives the pruning: a new game on the pruned model,
            played on the new triggers, and a new walk within the rest of the budget, under the
            same clean guard (measured against the unpruned model). Why: Neural Cleanse's trigger
            is the smallest that works, weaker than the attacker's, so it can stop working first.
            What it cannot see: a backdoor weakened below flipping 90% of the few images (on the
            MNIST test model one channel leaves 21% ASR, and the second reverse's mask is no
            outlier). ``details["recheck"]`` has each round's masks, index and walk. Why on: on
            the ten CIFAR-10 zoo repairs whose walk had stopped early it met issue 4's target on
            3 instead of 2 and raised the mean DER from 90.6 to 93.3 (resnet20 BadNets seed 0:
            7.82% -> 2.76% ASR; vgg_small BadNets seed 1: 20.49% -> 5.13%), by a rule written
            before the runs; the rest are unchanged by construction. Its cost: on resnet20 each
            unit is a residual group's channel, and the pruning it adds costs test accuracy the
            ten images do not see (BadNets seed 1: -10.5 -> -15.5 points; BENCHMARKS.md,
            "Stop 35").
    """

    synth_per_class: int = 2
    synth_steps: int = 400
    input_shape: str = ""
    reverse_steps: int = 300
    reverse_lr: float = 0.1
    init_cost: float = 1e-3
    cost_schedule: str = "adaptive"
    success_threshold: float = 0.9
    anomaly_threshold: float = 2.0
    small_mask_ratio: Any = 3.0
    force: bool = False
    reverse: str = "auto"
    feature_steps: int = 300
    suspect_large_masks: bool = True
    large_mask_accuracy_ratio: float = LARGE_MASK_ACCURACY_RATIO
    trigger_pool: int = 3
    layers: str = "auto"
    kind: str = "conv"
    value: str = "margin"
    permutations: int = 100
    warmup: int = 10
    truncation_tol: float = 0.05
    discard_threshold: str = "auto"
    greedy: bool = True
    epsilon: float = 0.2
    greedy_rank: str = "mean"
    top_k: int = 0
    z: float = 2.0
    budget: float = 0.01
    stop_rate: float = 0.0
    stop_lift: float = 0.5
    acc_tolerance: float = 0.1
    margin_tolerance: float = 0.2
    kl_tolerance: float | None = None
    recheck: int = 1

    def __post_init__(self):
        if not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
            raise ConfigError(f"budget must be a fraction of the prunable channels in (0, 1]; got "
                              f"{self.budget!r}, which allows nothing to be pruned" if
                              isinstance(self.budget, (int, float)) and self.budget <= 0 else
                              f"budget must be a fraction of the prunable channels in (0, 1], got "
                              f"{self.budget!r}")
        if self.reverse not in _REVERSES:
            raise ConfigError(f"reverse must be one of {_REVERSES}, got {self.reverse!r}")
        if isinstance(self.feature_steps, bool) or not isinstance(self.feature_steps, int) or self.feature_steps < 1:
            raise ConfigError(f"feature_steps must be an integer >= 1, got {self.feature_steps!r}")
        if self.greedy_rank not in GREEDY_RANKS:
            raise ConfigError(f"greedy_rank must be one of {GREEDY_RANKS}, got {self.greedy_rank!r}")
        if self.value not in _VALUES:
            raise ConfigError(f"value must be one of {_VALUES}, got {self.value!r}")
        if self.kind not in _KINDS:
            raise ConfigError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.cost_schedule not in ("adaptive", "fixed"):
            raise ConfigError(f"cost_schedule must be 'adaptive' or 'fixed', got {self.cost_schedule!r}")
        _discard(self.discard_threshold)
        if isinstance(self.recheck, bool) or not isinstance(self.recheck, int) or self.recheck < 0:
            raise ConfigError(f"recheck must be an integer >= 0 (0: off), got {self.recheck!r}")
        for name in ("synth_per_class", "synth_steps", "reverse_steps", "permutations"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if isinstance(self.trigger_pool, bool) or not isinstance(self.trigger_pool, int) or self.trigger_pool < 1:
            raise ConfigError(f"trigger_pool must be an integer >= 1 (1: the detection's trigger "
                              f"alone), got {self.trigger_pool!r}")
        if self.warmup < 0 or self.top_k < 0 or self.z < 0 or self.truncation_tol < 0:
            raise ConfigError("warmup, top_k, z and truncation_tol must be >= 0")
        if not 0 <= self.epsilon <= 1:
            raise ConfigError(f"epsilon must be in [0, 1], got {self.epsilon!r}")
        if not 0 <= self.stop_rate < 1 or not 0 <= self.acc_tolerance <= 1:
            raise ConfigError("stop_rate must be in [0, 1) and acc_tolerance in [0, 1]")
        if not 0 <= self.margin_tolerance <= 1 or self.stop_lift < 0:
            raise ConfigError("margin_tolerance must be in [0, 1] and stop_lift >= 0")
        self.kl_tolerance = optional_number(self.kl_tolerance, "kl_tolerance",
                                            none_words=("", "none", "off"))
        if self.kl_tolerance is not None and not self.kl_tolerance >= 0:
            raise ConfigError(f"kl_tolerance must be None (off) or >= 0 (nats), got "
                              f"{self.kl_tolerance!r}")
        if not 0 <= self.large_mask_accuracy_ratio <= 1:
            raise ConfigError(f"large_mask_accuracy_ratio must be in [0, 1], got "
                              f"{self.large_mask_accuracy_ratio!r}")
        if not 0 < self.success_threshold <= 1:
            raise ConfigError(f"success_threshold must be in (0, 1], got {self.success_threshold!r}")
        self.small_mask_ratio = small_mask_ratio_option(self.small_mask_ratio)
        if self.reverse_lr <= 0 or self.init_cost < 0 or self.anomaly_threshold <= 0:
            raise ConfigError("reverse_lr and anomaly_threshold must be positive, init_cost >= 0")
        if self.input_shape:
            parse_input_shape(self.input_shape)


@register
class ShapPruning(Defense):
    name = "shappruning"
    Options = Options
    needs_data = False
    min_images = 1  # the real minimum, one image per class, is checked in run()
    per_class_images = 1  # the paper's few-shot setting
    summary = ("ShapPruning (few-shot or data-free): reverse the trigger, detect, prune the "
               "channels with the largest Shapley value for the backdoor")

    def run(self, model: nn.Module, clean: CleanData | None) -> RepairResult:
        o = self.options
        seconds: dict[str, float] = {}
        evals: dict[str, int] = {}
        details: dict = {}
        images: dict[str, torch.Tensor] = {}

        # -- inputs: the few clean images, or synthesized ones ---------------------------
        start = time.perf_counter()
        if clean is not None:
            k = clean.num_classes
            _check_classes(k)
            if len(clean) < k:
                raise DataError(f"shappruning needs at least one clean image per class: got "
                                f"{len(clean)} images for a {k}-class model (or pass clean=None "
                                f"for the data-free mode)")
            x, y = clean.x, clean.y
            details["data"] = {"mode": "few-shot", "images": len(clean),
                               "classes_present": int(clean.y.unique().numel())}
        else:
            example, source = _example_input(model, o.input_shape, self.device)
            k = _probe_classes(model, example)
            _check_classes(k)
            synth = synthesize(model, k, tuple(example.shape[1:]), per_class=o.synth_per_class,
                               steps=o.synth_steps, seed=derive_seed(self.seed, "data reverse"),
                               device=self.device, progress=self.progress)
            x, y = synth.x, synth.y
            evals["data_reverse"] = synth.evaluations
            seconds["data_reverse"] = time.perf_counter() - start
            details["data"] = {"mode": "data-free", "input_shape": list(example.shape[1:]),
                               "input_shape_from": source, **synth.summary()}
            images["synthetic_images"] = _grid(synth.x[::o.synth_per_class])

        # the players and the budget, checked before any optimization
        all_units = discover_units(model, x[:1])
        kind = None if o.kind == "any" else o.kind
        if kind == "conv" and not any(g.kind == "conv" for g in all_units):
            kind = "linear"  # no filters to play: the hidden neurons are the players
        units = _players(all_units, o.layers, kind)
        budget = min(units.total, math.ceil(o.budget * all_units.total - 1e-9))
        if budget < 1:
            raise ConfigError(f"budget {o.budget} allows nothing to be pruned")

        # -- trigger reverse and detection ----------------------------------------------
        start = time.perf_counter()
        rev = self._pixel_reverse(model, x, y, k, "trigger reverse")
        seconds["trigger_reverse"] = time.perf_counter() - start
        evals["trigger_reverse"] = rev.evaluations
        details["reverse"] = rev.summary()
        images.update(_trigger_images(rev))
        details["trigger"] = _trigger_summary(rev)
        by_ratio = rev
        if o.reverse == "auto":
            # the reverses below are weighed against Neural Cleanse's own flags, as before the
            # small-mask ratio rule; a class that rule alone flags decides last (see below)
            rev = _neural_cleanse_alone(rev)
        if k < 3 and not o.force:
            # with two classes both mask norms are equally far from their median: MAD flags none
            details["detection_note"] = (
                f"the model has {k} classes: the anomaly index cannot single out one of fewer than "
                "3, so no class is ever flagged; pass force=True to prune for the class with the "
                "smaller reversed trigger")
            warnings.warn(f"ShapPruning: {details['detection_note']}", UserWarning, stacklevel=4)

        if o.reverse == "feature" or (o.reverse == "auto" and len(rev.flagged) != 1):
            start = time.perf_counter()
            layer = default_layer(all_units)  # written where the players can prune it
            feature = reverse_feature_triggers(
                model, units, x, y, k, layer=layer if layer in units else units.names[0],
                steps=o.feature_steps, seed=derive_seed(self.seed, "feature reverse"),
                progress=self.progress, anomaly_threshold=o.anomaly_threshold,
                small_mask_ratio=o.small_mask_ratio)
            seconds["feature_reverse"] = time.perf_counter() - start
            evals["feature_reverse"] = feature.evaluations
            details["feature_reverse"] = feature.summary()
            if o.reverse == "feature" or _follow_feature(rev, feature):
                rev = feature
                _set_aside_pixel_images(images)
                details["trigger"] = _trigger_summary(rev, space="feature", layer=feature.layer)
        elif o.reverse == "auto":
            details["feature_reverse"] = {"skipped": f"the pixel-space reverse flags one class "
                                          f"({rev.target}), so it decides"}
        if o.reverse != "warp" and clean is not None and o.suspect_large_masks and not (
                isinstance(rev, FeatureTriggers) or rev.flagged):
            rev = _clean_label_target(model, rev, x, y, k, o, details, evals)
            if rev.target is not None:  # the game is played on that class's trigger
                images.update(_trigger_images(rev))
                details["trigger"] = _trigger_summary(rev, source="large mask, clean-label rule")
        if o.reverse == "warp" or (o.reverse == "auto" and clean is not None
                                   and not isinstance(rev, FeatureTriggers) and rev.target is None):
            # last, as the most expensive reverse here: nothing else named a target. Not on
            # synthesized images (data-free): the test asks what a half-pixel warp does to
            # natural images, and it was not measured on synthesized ones
            start = time.perf_counter()
            warps = reverse_warps(model, x, y, k, seed=derive_seed(self.seed, "warp reverse"),
                                  progress=self.progress, device=self.device,
                                  anomaly_threshold=o.anomaly_threshold)
            seconds["warp_reverse"] = time.perf_counter() - start
            evals["warp_reverse"] = warps.evaluations
            details["warp_reverse"] = warps.summary()
            if o.reverse == "warp" or warps.target is not None:
                rev = warps
                _set_aside_pixel_images(images)
                images["trigger_warp_displacement"] = warps.displacement(warps.suspect, tuple(x.shape[-2:]))
                details["trigger"] = _trigger_summary(rev, space="warp")
        if o.reverse == "auto" and rev.target is None and by_ratio.target is not None:
            # No reverse named a target, but a pixel mask is at most 1/small_mask_ratio of the
            # median's: it decides. Why last: on the MobileNet-like WaNet model the ratio rule
            # flags the target's small pixel mask, whose game stops after 1 channel at 33% ASR,
            # while the warp reverse's trigger takes it to 0% (BENCHMARKS.md, "Stop 43").
            rev = by_ratio
            details["trigger"] = _trigger_summary(rev, source="small-mask ratio rule")
        details["trigger_space"] = ("feature" if isinstance(rev, FeatureTriggers)
                                    else "warp" if isinstance(rev, ReversedWarps) else "pixel")

        result = RepairResult(model=model, method=self.name, verdict=rev.verdict,
                              target=rev.target, details=details, total_units=all_units.total,
                              images=images)
        if rev.target is None and not o.force:
            # Name the closest candidate: a practitioner who suspects the model anyway can
            # weigh it and force the repair for that class.
            closest = rev.suspect
            details["mitigation"] = {
                "pruned": 0, "closest_class": closest,
                "reason": (f"no backdoor detected: no class is flagged; the closest is class "
                           f"{closest}, {rev.suspect_rule} (anomaly index "
                           f"{float(rev.anomaly_index[closest]):.2f}, threshold {rev.threshold:g}); "
                           f"model returned unpruned (pass force=True to prune for class "
                           f"{closest} anyway)")}
            return self._finish(result, evals, seconds)
        target = rev.suspect
        if rev.target is None:
            details["forced"] = (f"no backdoor detected; force=True: pruning for class {target}, "
                                 f"{rev.suspect_rule}")

        # -- Shapley estimation -------------------------------------------------------------
        top_k = o.top_k or max(10, 2 * budget)
        victims = y != target
        if not bool(victims.any()):
            raise DataError(f"every image is of the target class {target}; the reversed trigger "
                            "cannot be measured (pass images of the other classes)")
        if isinstance(rev, FeatureTriggers):  # the trigger is written into a layer, not stamped
            trig = _WrittenTrigger(MaskEvaluator(model, units, x[victims]), rev, target)
        else:
            stamped = rev.apply(x[victims], target)
            if o.trigger_pool > 1 and not isinstance(rev, ReversedWarps):  # a pool of patches
                stamped = torch.cat([stamped, self._trigger_pool(model, x, y, k, target, details,
                                                                 evals, seconds)])
            trig = MaskEvaluator(model, units, stamped)
        start = time.perf_counter()  # after the pool's reverses, which have their own entry
        value_fn = backdoor_value_fn(trig, target, o.value)
        est = self._shapley(value_fn, units.total, top_k, "shapley")
        seconds["shapley"] = time.perf_counter() - start
        evals["shapley"] = trig.evaluations
        values = est.values.float()
        details["shapley"] = {
            **est.summary(), "layers": [g.name for g in units], "players_kind": kind or "any",
            "top_k": top_k,
            "value": o.value, "images": trig.num_images,
            "values": {name: t for name, t in units.split(values).items()},
            "top": [[*units.unit_of(int(i)), round(float(values[i]), 6)] for i in est.ranking()[:top_k]],
        }

        # -- mitigation -----------------------------------------------------------------------
        start = time.perf_counter()
        candidates = [int(i) for i in est.ranking()[:top_k] if float(est.values[i]) > 0]
        used_before = trig.evaluations
        guard = MaskEvaluator(model, units, x, y)
        plain = MaskEvaluator(model, units, x[victims])  # the same images without the trigger
        fidelity = (MaskEvaluator(model, units, shifted_views(x))
                    if o.kl_tolerance is not None else None)
        chosen, mitigation = _mitigate(candidates, units.total, trig, plain, guard, fidelity,
                                       target, budget, o)
        evals["mitigation"] = (trig.evaluations - used_before + guard.evaluations
                               + plain.evaluations + (fidelity.evaluations if fidelity else 0))
        seconds["mitigation"] = time.perf_counter() - start
        details["mitigation"] = mitigation
        if o.recheck and not isinstance(rev, (FeatureTriggers, ReversedWarps)):
            start = time.perf_counter()
            evaluators = (plain, guard) + ((fidelity,) if fidelity else ())
            before = sum(e.evaluations for e in evaluators)
            first = len(chosen)
            chosen, rounds, spent = self._recheck(model, units, x, y, k, rev, chosen, mitigation,
                                                  budget, top_k, (plain, guard, fidelity))
            evals["recheck"] = spent + sum(e.evaluations for e in evaluators) - before
            seconds["recheck"] = time.perf_counter() - start
            details["recheck"] = rounds
            if rounds and "reason" in rounds[-1]:
                mitigation["reason"] += "; recheck: " + rounds[-1]["reason"]
            if len(chosen) > first:
                mitigation = rounds[-1]["mitigation"]
                details["mitigation"]["pruned_after_recheck"] = len(chosen)
        if mitigation.get("budget_ran_out"):  # what a Python caller would otherwise not see
            warnings.warn(f"ShapPruning: {mitigation['reason']}. The backdoor may survive; the "
                          f"option budget ({o.budget} of the {all_units.total} prunable channels) "
                          "allows more.", UserWarning, stacklevel=4)
        result.pruned = [units.unit_of(i) for i in chosen]
        result.model = apply_masks_permanently(model, units, result.pruned) if chosen else model
        result.target = target if rev.target is not None else None
        return self._finish(result, evals, seconds)

    def _recheck(self, model, units, x, y, k: int, rev, chosen: list[int], mitigation: dict,
                 budget: int, top_k: int, evaluators) -> tuple[list[int], list[dict], int]:
        """``recheck`` (ours): after a walk that stopped because the reversed triggers no longer
        work, reverse the target's trigger again on the pruned model. If the target still admits
        a trigger whose mask is a low-side outlier among the detection's masks of the other
        classes, the backdoor survives: a new game on the pruned model, with the new triggers,
        and a new walk within what is left of the budget. Returns (all channels chosen, one
        record per round, model evaluations of the reverses and games).

        Only where the detection flagged the target on the low side (a pixel trigger): a
        clean-label target's mask is large by nature, and a forced target was never an outlier.
        """
        o = self.options
        plain, guard, fidelity = evaluators
        target = rev.target
        rounds: list[dict] = []
        spent = 0
        if target is None or target not in rev.flagged:
            return chosen, [{"skipped": "the target was not flagged as a small-mask outlier"}], 0
        victims = x[y != target]
        while (len(rounds) < o.recheck and mitigation.get("trigger_stopped")
               and len(chosen) < budget):
            record: dict = {"pruned_before": len(chosen)}
            rounds.append(record)
            pruned = apply_masks_permanently(model, units, [units.unit_of(i) for i in chosen])
            again = self._pixel_reverse(pruned, x, y, k, f"recheck {len(rounds)}",
                                        classes=[target] * o.trigger_pool)
            spent += again.evaluations
            works = again.attack_success >= o.success_threshold - 1e-9
            record.update(mask_norms=[round(float(v), 3) for v in again.mask_norms],
                          attack_success=[round(float(v), 4) for v in again.attack_success])
            if not bool(works.any()):
                record["survives"] = False
                record["reason"] = "no reversed trigger of the target works on the pruned model"
                break
            norms = rev.mask_norms.clone().double()
            norms[target] = float(again.mask_norms[works].min())
            detection = detect_outlier(norms, rev.threshold, rev.small_mask_ratio)  # the detection's own test
            index = float(detection.anomaly_index[target])
            survives = target in detection.flagged
            record.update(anomaly_index=round(index, 3), survives=survives)
            if not survives:
                ratio = ("" if rev.small_mask_ratio is None else
                         f", and above 1/{rev.small_mask_ratio:g} of the median's")
                record["reason"] = (f"the target's smallest working mask ({float(norms[target]):.2f}) "
                                    f"is no longer an outlier (index {index:.2f} <= {rev.threshold}{ratio})")
                break
            stamped = torch.cat([again.apply(victims, i) for i in range(len(again.masks))])
            trig = MaskEvaluator(model, units, stamped)
            game = backdoor_value_fn(trig, target, o.value)

            def value_fn(keep: torch.Tensor, game=game, gone=list(chosen)) -> torch.Tensor:
                keep = keep.clone()
                keep[:, gone] = 0  # the channels already pruned stay pruned in every coalition
                return game(keep)

            est = self._shapley(value_fn, units.total, top_k, f"recheck {len(rounds)}")
            candidates = [int(i) for i in est.ranking()[:top_k]
                          if float(est.values[i]) > 0 and int(i) not in chosen]
            more, mitigation = _mitigate(candidates, units.total, trig, plain, guard, fidelity,
                                         target, budget - len(chosen), o, pruned_before=chosen)
            spent += trig.evaluations
            record.update(shapley_evaluations=est.evaluations, mitigation=mitigation,
                          pruned=[list(units.unit_of(i)) for i in more],
                          reason=f"round {len(rounds)}: {mitigation['reason']}")
            chosen = chosen + more
        return chosen, rounds, spent

    def _shapley(self, value_fn, players: int, top_k: int, seed_name: str):
        """Stage 4's estimate with this repair's options (the game and the recheck's games)."""
        o = self.options
        return estimate_shapley(
            value_fn, players, permutations=o.permutations, truncation_tol=o.truncation_tol,
            discard=_discard(o.discard_threshold), epsilon=o.epsilon if o.greedy else None,
            top_k=top_k, warmup=o.warmup, z=o.z, greedy_rank=o.greedy_rank,
            seed=derive_seed(self.seed, seed_name), progress=self.progress)

    def _pixel_reverse(self, model, x, y, k: int, seed_name: str, classes=None):
        """Neural Cleanse's reverse with this repair's options (every class, or ``classes``)."""
        o = self.options
        return reverse_triggers(model, x, y, k, steps=o.reverse_steps, lr=o.reverse_lr,
                                init_cost=o.init_cost, cost_schedule=o.cost_schedule,
                                success_threshold=o.success_threshold,
                                anomaly_threshold=o.anomaly_threshold, small_mask_ratio=o.small_mask_ratio,
                                classes=classes,
                                seed=derive_seed(self.seed, seed_name),
                                progress=self.progress, device=self.device)

    def _trigger_pool(self, model, x, y, k: int, target: int, details: dict, evals: dict,
                      seconds: dict) -> torch.Tensor:
        """The target's trigger reversed ``trigger_pool - 1`` more times from other random
        starts (ours); returns the non-target images stamped with each, to be pooled with the
        detection's. Why: a reversed trigger is one stand-in among many for the attacker's.
        Channels that answer its particular pixels (mostly early ones) change from start to
        start; the channels the backdoor itself runs through answer every stand-in. What it
        changes on the zoo, with and without it: BENCHMARKS.md, "Stop 25"."""
        o = self.options
        start = time.perf_counter()
        extra = self._pixel_reverse(model, x, y, k, "trigger pool",
                                    classes=[target] * (o.trigger_pool - 1))
        seconds["trigger_pool"] = time.perf_counter() - start
        evals["trigger_pool"] = extra.evaluations
        victims = x[y != target]
        details["trigger_pool"] = {
            "triggers": o.trigger_pool,
            "mask_norms": [round(float(v), 3) for v in extra.mask_norms],
            "attack_success": [round(float(v), 4) for v in extra.attack_success]}
        # apply() takes the trigger's index, which here is not its class
        return torch.cat([extra.apply(victims, i) for i in range(len(extra.masks))])

    def _finish(self, result: RepairResult, evals: dict, seconds: dict) -> RepairResult:
        result.evaluations = int(sum(evals.values()))
        details = result.details
        details["evaluations"] = dict(evals)
        if "shapley" in details:
            details["evaluations"]["shapley_plain"] = details["shapley"]["evaluations_plain"]
        details["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        return result


#: ``reverse="auto"``: where Neural Cleanse flags nothing, a feature-space flag is followed only
#: if Neural Cleanse's own mask for that class is small too: below the median, with an anomaly
#: index of at least this (half its flagging threshold; ours)
CORROBORATION_INDEX = 1.0


def _neural_cleanse_alone(rev):
    """``rev`` with the flags of Neural Cleanse's MAD test alone (the small-mask ratio rule off;
    its ``small_mask_ratio`` stays, for the recheck's test)."""
    if rev.small_mask_ratio is None or not rev.flagged:
        return rev
    by_mad = detect_outlier(rev.mask_norms, rev.threshold, None).flagged
    ratio_only = set(small_masks(rev.mask_norms, rev.small_mask_ratio)) - set(by_mad)
    flagged = [c for c in rev.flagged if c not in ratio_only]
    if flagged == list(rev.flagged):
        return rev
    target = min(flagged, key=lambda c: float(rev.mask_norms[c])) if flagged else None
    return dataclasses.replace(rev, flagged=flagged, target=target)


def _follow_feature(pixel, feature) -> bool:
    """``reverse="auto"``: is the feature-space reverse's flag followed instead of Neural
    Cleanse's verdict? Only where the two reverses agree. Neural Cleanse may be ambiguous: it
    flags several classes, and the feature reverse flags one of them that is not its pick.
    Or it may be silent (flags no class) but lean the same way: the flagged class's pixel mask
    is below the median with an anomaly index of at least :data:`CORROBORATION_INDEX`. Why
    not follow a lone feature flag: on an unseen MobileNet-like WaNet model
    (benchmarks/unseen_models.py) the feature reverse flagged a wrong class, whose pixel mask was
    exactly the median, and pruning for it cost 4 points of accuracy; on the vgg_small WaNet
    zoo model the flagged class was the target, at pixel index 1.8 (BENCHMARKS.md)."""
    c = feature.target
    if c is None:
        return False
    if pixel.flagged:
        return c in pixel.flagged and c != pixel.target
    norms = pixel.mask_norms
    return bool(norms[c] < norms.median()) and float(pixel.anomaly_index[c]) >= CORROBORATION_INDEX


def _clean_label_target(model, rev, x, y, k: int, o: Options, details: dict, evals: dict):
    """``suspect_large_masks``: where no small mask is flagged, the high-side outlier that the
    model misclassifies on its own clean images becomes the target (the largest such mask when
    several are); ``rev`` unchanged when there is none. Says what it saw in ``details``."""
    large = high_side_outliers(rev.mask_norms, rev.threshold)
    if not large:
        details["clean_label"] = {"large_masks": []}
        return rev
    accuracy = torch.tensor(class_accuracies(predict(model, x), y.cpu(), k)) / 100
    evals["clean_label"] = 1
    suspects = unrecognised(large, accuracy, o.large_mask_accuracy_ratio)
    details["clean_label"] = {"large_masks": large, "suspects": suspects,
                              "class_accuracy": [round(float(a), 4) for a in accuracy]}
    if not suspects:
        return rev
    target = max(suspects, key=lambda c: float(rev.mask_norms[c]))
    return dataclasses.replace(rev, target=target)


def _trigger_images(rev) -> dict[str, torch.Tensor]:
    """The pixel-space suspect's mask, pattern and stamp, for the report and the CLI."""
    k = rev.suspect
    return {"trigger_mask": rev.masks[k].clone(), "trigger_pattern": rev.patterns[k].clone(),
            "trigger_stamp": (rev.masks[k] * rev.patterns[k]).clone()}


def _set_aside_pixel_images(images: dict) -> None:
    """Another reverse's trigger is played: the pixel reverse's images (of another class, or of
    an unflagged one) are kept for the report, named as unused."""
    for key in ("trigger_mask", "trigger_pattern", "trigger_stamp"):
        images[f"unused_pixel_{key}"] = images.pop(key)


def _trigger_summary(rev, **extra) -> dict:
    """The trigger the game is played on: a pixel-space, feature-space or warp reverse's suspect."""
    k = rev.suspect
    size = {} if isinstance(rev, ReversedWarps) else {"mask_norm": float(rev.mask_norms[k])}
    return {"class": k, "flagged": rev.target is not None, **extra, **size,
            "attack_success": float(rev.attack_success[k])}


class _WrittenTrigger:
    """A MaskEvaluator on clean images whose logits carry the feature-space trigger of
    ``target`` (written into its layer before the masks act): the game's "stamped" images."""

    def __init__(self, evaluator: MaskEvaluator, features, target: int):
        self.evaluator, self.features, self.edit = evaluator, features, features.edit(target)

    @property
    def evaluations(self) -> int:
        return self.evaluator.evaluations

    @property
    def num_images(self) -> int:
        return self.evaluator.num_images

    def logits(self, masks) -> torch.Tensor:
        return self.evaluator.edited_logits(masks, self.features.module, self.edit, grad=False)


def shifted_views(x: torch.Tensor, shift: int | None = None) -> torch.Tensor:
    """The images and eight copies shifted by ``shift`` pixels (default: a tenth of the height,
    at least 1) along each axis and diagonal, borders replicated: (9 x N, C, H, W). No flips:
    they change what digits and traffic signs mean."""
    h, w = x.shape[-2:]
    s = shift if shift is not None else max(1, round(h / 10))
    padded = F.pad(x, (s, s, s, s), mode="replicate")
    return torch.cat([padded[..., s + dy:s + dy + h, s + dx:s + dx + w]
                      for dy in (0, -s, s) for dx in (0, -s, s)])


def mean_kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over images of KL(reference || softmax(logits)); ``reference``: log-probabilities."""
    return float((reference.exp() * (reference - F.log_softmax(logits, -1))).sum(-1).mean())


def _mitigate(candidates: list[int], total: int, trig: MaskEvaluator, plain: MaskEvaluator,
              guard: MaskEvaluator, fidelity: MaskEvaluator | None, target: int, budget: int,
              o: Options, pruned_before: list[int] = ()):
    """Walk down the Shapley ranking (see the module docstring, stage 5).

    ``pruned_before``: channels already pruned by an earlier walk (``recheck``), pruned in every
    measurement; the clean guard still compares with the unpruned model, so the losses of the
    rounds add up against one tolerance. ``budget`` counts this walk's channels only.

    Each step tries the chosen channels plus the next candidate: it is skipped if it breaks the
    clean guard (accuracy on the few images drops by more than ``acc_tolerance``, their mean
    true-class margin by more than ``margin_tolerance`` of its value, or, with ``fidelity``, the
    mean KL divergence of the predictions on its images -- the few images and shifted copies --
    from the unpruned model's exceeds ``kl_tolerance``), else kept; the walk stops when the reversed
    trigger no longer works (``works`` is False), at the budget, or when the candidates run out.
    """
    labels = guard.labels
    reference = (F.log_softmax(fidelity.logits(torch.ones(1, total))[0], -1)
                 if fidelity is not None else None)

    before = list(pruned_before)

    def clean_stats(mask: torch.Tensor) -> dict:
        lg = guard.logits(mask)[0]
        own = lg.gather(-1, labels.view(-1, 1)).squeeze(-1)
        rest = lg.scatter(-1, labels.view(-1, 1), float("-inf")).amax(-1)
        return {"clean_acc": float((lg.argmax(-1) == labels).float().mean()),
                "clean_margin": float((own - rest).mean())}

    def measure(dropped: list[int]) -> dict:
        mask = torch.ones(1, total)
        mask[0, before + dropped] = 0
        lt, lp = trig.logits(mask)[0], plain.logits(mask)[0]
        mt, mp = target_margin(lt, target).mean(), target_margin(lp, target).mean()
        out = {"trigger_rate": float((lt.argmax(-1) == target).float().mean()),
               # fraction of the clean images' distance to the target that the trigger closes
               "trigger_lift": float((mt - mp) / (-mp).clamp_min(1e-6)),
               **clean_stats(mask)}
        if fidelity is not None:
            out["clean_kl"] = mean_kl(reference, fidelity.logits(mask)[0])
        return out

    def works(m: dict) -> bool:
        return m["trigger_rate"] > o.stop_rate + 1e-9 or m["trigger_lift"] > o.stop_lift + 1e-9

    base = measure([])
    unpruned = clean_stats(torch.ones(1, total)) if before else base  # the guard's reference
    out = {"budget_channels": budget, "budget_fraction": o.budget, "candidates": len(candidates),
           "before": _rounded(base)}
    chosen: list[int] = []
    state = base
    walk = []
    if not works(base):
        out.update(pruned=0, after=_rounded(base), walk=walk,
                   reason="the reversed trigger does not work on the few images: nothing to prune")
        return chosen, out
    stopped = False
    for unit in candidates:
        if len(chosen) >= budget:
            break
        m = measure(chosen + [unit])
        acc_ok = m["clean_acc"] >= unpruned["clean_acc"] - o.acc_tolerance - 1e-9
        margin_ok = (unpruned["clean_margin"] <= 0
                     or m["clean_margin"] >= (1 - o.margin_tolerance) * unpruned["clean_margin"])
        kl_ok = fidelity is None or m["clean_kl"] <= o.kl_tolerance + 1e-9
        walk.append({"unit": unit, "kept": acc_ok and margin_ok and kl_ok, **_rounded(m)})
        if not (acc_ok and margin_ok and kl_ok):
            continue  # the clean guard vetoes this channel; try the next one
        chosen.append(unit)
        state = m
        if not works(m):
            stopped = True
            break
    if stopped:
        reason = (f"the reversed trigger stopped working after {len(chosen)} channels (rate "
                  f"{state['trigger_rate']:.3f} <= {o.stop_rate}, lift {state['trigger_lift']:.3f} "
                  f"<= {o.stop_lift})")
    else:
        why = "budget" if len(chosen) >= budget else "candidates"
        reason = (f"the reversed trigger still works (rate {state['trigger_rate']:.3f}, lift "
                  f"{state['trigger_lift']:.3f}) after {len(chosen)} channels: the {why} ran out "
                  f"(budget {budget} channels, {len(candidates)} candidates with positive Shapley "
                  f"value, {sum(not s['kept'] for s in walk)} vetoed by the clean guard)")
    out.update(pruned=len(chosen), after=_rounded(state), walk=walk, reason=reason,
               trigger_stopped=stopped, budget_ran_out=not stopped and len(chosen) >= budget)
    return chosen, out


def _rounded(m: dict) -> dict:
    return {k: round(v, 4) for k, v in m.items()}


def backdoor_value_fn(evaluator: MaskEvaluator, target: int, value: str = "margin"):
    """The Shapley game of stage 4: keep-masks (M, players) -> (M,) backdoor strength of the
    reversed trigger on ``evaluator``'s (stamped) images ("margin": mean hinge margin of
    ``target``; "success": fraction sent to ``target``)."""
    def fn(keep: torch.Tensor) -> torch.Tensor:
        logits = evaluator.logits(keep.float())
        if value == "success":
            return (logits.argmax(-1) == target).float().mean(1)
        return target_margin(logits, target).clamp_min(0).mean(1)
    return fn


def _check_classes(k: int) -> None:
    if k < 2:
        raise ConfigError(f"shappruning needs a classifier with at least 2 classes (the backdoor "
                          f"sends inputs to another class); this model has {k} output(s)")


def _players(all_units, layers: str, kind: str | None):
    """The game's players: ``layers`` of ``all_units`` ("auto": every group of the kind but the
    first third by execution order, rounded down; see ``Options.layers``)."""
    if str(layers).strip() == "auto":
        n = len(list(all_units.select("all", kind=kind).groups))
        return all_units.select(f"last:{n - n // 3}", kind=kind)
    return all_units.select(_layers(layers), kind=kind)


def _layers(text: str):
    text = str(text).strip()
    if text == "all" or ":" in text:
        return text
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ConfigError("layers is empty; use 'last:2', 'all' or group names")
    return names if len(names) > 1 else names[0]


def _discard(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip().lower()
    if text in ("off", "none", ""):
        return None
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"discard_threshold must be 'auto', 'off' or a number, got {value!r}") from None


def _example_input(model: nn.Module, input_shape, device) -> tuple[torch.Tensor, str]:
    x, source = probe_input(model, input_shape, device, "data-free shappruning")
    if source == "probed":
        warnings.warn(f"shappruning (data-free): input shape probed as {tuple(x.shape[1:])}; "
                      "synthesized images are only right at the size the model was trained "
                      "on: set input_shape=C,H,W if this is wrong", RuntimeWarning, stacklevel=3)
    return x, source


@torch.no_grad()
def _probe_classes(model: nn.Module, x: torch.Tensor) -> int:
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        out = model(x)
    except RuntimeError as exc:
        raise TrojanPruneError(f"the model cannot run on inputs of shape {tuple(x.shape[1:])}: "
                               f"{str(exc).splitlines()[0]}") from None
    finally:
        for m, flag in flags.items():
            m.training = flag
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(f"the model must return logits of shape (N, classes); got "
                          f"{getattr(out, 'shape', type(out).__name__)}")
    return int(out.shape[1])


def _grid(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> one (C, H, N*W) strip."""
    return torch.cat(list(x.detach().cpu()), dim=-1)
