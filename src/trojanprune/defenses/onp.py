"""ONP: Optimized Neuron Pruning (Li, Yu, Yi, "Rethinking Pruning for Backdoor Mitigation: An
Optimization Perspective", arXiv 2405.17746, 2024).

Pruning as an optimization problem solved by a learned policy instead of a hand-made rule on one
neuron's local property: the network is modelled as graphs, a GNN-based reinforcement-learning
agent embeds them and learns which neurons to prune.

Confirmed by the paper (followed here):
- one graph per layer, built from neuron connectivity: a node per neuron (conv channel), its
  connection strength the L1 norm of its weights, edges between neurons whose weights' cosine
  similarity exceeds a per-layer threshold tuned so that dormant neurons are not linked; node
  features include the neuron's average activation on clean data (:mod:`trojanprune.onp.graphs`);
- GNN-based RL agents learn the pruning policy (:mod:`trojanprune.onp.agent`);
- residual connections are handled by group-based pruning: channels tied by a skip connection
  are one node and are pruned together (the engine's unit groups);
- a small clean set is enough (the usual protocol: 500 images, 1% of CIFAR-10), and clean
  accuracy stays nearly unchanged.

Ours (the paper does not publish them):
- the graphs' details: the other node features (activation spread, BatchNorm scale and shift,
  a Taylor estimate of the clean-loss cost of removal, the probe's signal, depth), how the
  threshold is chosen (a quantile or a neighbour count, then raised above every dormant
  channel's similarity) and what "dormant" means (see :mod:`trojanprune.onp.graphs`);
- the GNN: a 2-layer GCN from PyTorch Geometric shared by all layers (GAT as an option), with
  the layer depth among the node features; an MLP on node features as an ablation;
- the agent: PPO actor-critic; an episode is one whole pruning (a keep/prune Bernoulli per
  channel), warm-started from the probe's signal (see :mod:`trojanprune.onp.agent`);
- the reward: clean accuracy on the held-out half of the clean set, minus ``backdoor_weight``
  (1.0) x the backdoor score, minus ``prune_cost`` (0.1) x the fraction of channels pruned,
  minus ``acc_penalty`` (10) x the accuracy lost beyond ``acc_tolerance`` (2 points; the
  constraint of the final choice, shown to the agent);
- the backdoor score: a trigger-free probe (:mod:`trojanprune.onp.probes`), by default
  ``probe="suspects"``: trigger reverses, Neural Cleanse's in pixel space (shared with
  ShapPruning) and ours in feature space (the fewest channels of a hidden layer that send
  images to a class) at two layers (three quarters of the way through and the last conv
  group); every class a MAD anomaly index flags is a suspect (the low side, as Neural Cleanse,
  and in pixel space also the high side: a class a patch can hardly reach), and the score is
  the mean over the suspects of their trigger's success rate on the held-out images, counted
  with a 2-logit safety margin (a reversed trigger is weaker than the real one). No single
  reverse is right on every attack of our zoo; the suspects cover them together. Other
  probes: one reverse alone (``"reversed-trigger"``, ``"feature-trigger"``), a vote between
  them (``"auto"``), or ANP's or RNP's neuron masks (``"anp"`` / ``"unlearn"``). If no class
  is flagged, the class with the smallest reversed pixel-space mask is the presumed target
  (``target`` overrides it);
- the final choice: among every pruning the agent tried, the trained policy's greedy pruning
  and its top-k prunings (k up to ``max_prune_fraction`` of the channels), the one with the
  highest reward whose held-out clean accuracy is within ``acc_tolerance`` of the unpruned
  model's, and (``confirm_on_all``) whose accuracy on all the clean images is too (the
  unpruned model itself when none is); then (``refine_steps=6``, the default; 0 = off) greedy
  steps on the same reward, each pruning one more channel of a pool (the policy's and the
  probe signals' top channels) within the same guards, the backdoor score counting only the
  suspect classes the choice answered, and of their feature-space stand-ins only those it
  answered itself (``refine_focus="answered-triggers"``, the default); then
  (``give_back="score"``, the default) pruned channels are returned one at a time while a
  return raises the reward without raising the backdoor score (every suspect counted);
  applied with the engine's ``apply_masks_permanently``.

Every choice is made on the defender's clean data; the true trigger is never used.

ONP gives no "no backdoor" verdict (the paper's method mitigates a model known to be
backdoored): it prunes for its suspects, the presumed target when no reverse flags a class. On
models without a backdoor that costs up to the accuracy guard (0.1-3.45 test points on the seven
MNIST architectures of ``benchmarks/unseen_models.py --clean``, BENCHMARKS.md "Stop 43");
ShapPruning is the defense that says whether a model is backdoored.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine import (MaskEvaluator, apply_masks_permanently, discover_units, sharing_agreeing_masks,
                      soft_accuracy, top1_accuracy)
from ..errors import ConfigError, DataError
from ..progress import log, progress_bar
from ..reverse import LARGE_MASK_ACCURACY_RATIO
from ..reverse.detect import small_mask_ratio_option
from ..utils import derive_seed
from . import register
from .base import CleanData, Defense, RepairResult, optional_number

#: the clean-set size the method is meant for (BackdoorBench: 1% of CIFAR-10)
RECOMMENDED_IMAGES = 500
#: below this, ONP refuses to run
MIN_IMAGES = 50
#: each half of the clean split must hold at least this many images
MIN_SPLIT_IMAGES = 10
#: Options.give_back's rules
GIVE_BACK_RULES = ("off", "score", "reward")
#: Options.refine_focus's values
REFINE_FOCUSES = ("all", "answered", "answered-triggers")
#: Options.accuracy's values: what "clean accuracy" means in the reward, the guards and the choice
ACCURACY_MEASURES = ("top1", "soft")


@dataclass
class Options:
    """ONP options. The paper publishes none of these values: every default is ours.

    Backdoor probe (trigger-free; :mod:`trojanprune.onp.probes`):
    probe: "suspects" (default: both trigger reverses, pixel and feature space, and the
        trigger of every class either flags is scored), "reversed-trigger" (the pixel-space
        reverse alone, Neural Cleanse's, shared with ShapPruning), "feature-trigger", "auto"
        (both reverses, then the trusted one), "anp" or "unlearn" (or a registered probe's
        name). Why "suspects": on the CIFAR-10 vgg_small zoo it is the only probe that brings
        all four backdoors down (ASR 0-4.7%), and on resnet20 three of four (WaNet stays at 79%)
        (BENCHMARKS.md, "ONP's backdoor probes" and "ONP on resnet20").
    target: the presumed backdoor target class; None (default) = the probe decides (the classes
        the MAD anomaly index flags; none flagged: the smallest reversed pixel-space mask).
    small_mask_ratio: a class whose reversed mask (pixel or feature space) is at most 1/this of
        the median class's is flagged too, whatever its MAD index (3.0, ours; None: Neural
        Cleanse's test alone). Why: where the clean classes' masks spread widely the MAD test
        misses a target whose mask is 3-9 times below the median (BENCHMARKS.md, "Stop 43").
    reverse_steps, reverse_batch_size: trigger-reverse steps and images per class per step
        (None = the reverse's defaults, Neural Cleanse's: 300 and 32).
    reverse_per_class_stop: the pixel reverse freezes each class once it meets Neural Cleanse's
        early-stopping rule, as Neural Cleanse's separate per-class runs stop (False, the
        default: the batched problem runs every class until all have settled, as ShapPruning's
        does). Why it is off: it is faster (vgg_small WaNet and SIG repaired in 531 and 533 s
        alone on 2 cores instead of 589 and 577-615), but a class frozen early keeps a larger
        mask than one optimized to the end, so the norms the MAD test compares are no longer
        alike: on the eight grid models it flagged more classes on two (vgg_small BadNets 0, 1,
        4, 9 instead of 0; resnet20 SIG 5, 6, 9 instead of 9), and the grid cells run with it met
        issue 5's two bounds on 2 of 8 instead of 5 (BENCHMARKS.md, "Stop 42").
    score_margin: reversed-trigger probe: a stamped image counts as backdoored while the target
        logit is within this many logits of the top one (2.0; 0 = the plain success rate; see
        :mod:`trojanprune.onp.probes` for the calibration behind it).
    feature_per_class, feature_steps, feature_layer: feature-trigger probe: fit images per
        class for the feature-space reverse (10), its Adam steps (300), the unit group it writes
        into (None = three quarters of the way through the conv groups).
    suspect_large_masks: suspects probe: a class whose reversed pixel-space mask is a HIGH-side
        MAD outlier (index > 2) is a suspect too (True). Why: a class the model reaches only
        through a full-image backdoor (clean-label SIG: the target's own test accuracy is 0 on
        both CIFAR-10 zoo archs) needs an abnormally large patch; SIG's target had the largest
        mask on both archs (MAD index 5.4 and 8.7) and the low side flagged wrong classes.
        Known weakness: a natural class a patch hardly reaches is flagged too (MNIST's 1 and 7
        on the test fixture, where on one seed of four ONP then leaves the backdoor;
        BENCHMARKS.md), hence the accuracy condition below. Set False to drop this source.
    large_mask_accuracy_ratio: a large-mask class is a suspect only when the model's accuracy
        on its clean fit images is below this fraction of the median class's (0.5). Why: a
        clean-label backdoor that poisons the target's training images makes the model stop
        recognising the clean ones (SIG's target: 0% on the fit images of both CIFAR-10 zoo
        models, median class 84-88%), while a naturally hard class keeps its accuracy (MNIST's
        1 and 7 on the fixture; CIFAR-10's hardest class, dog, 48-68%). A clean-label attack
        that poisons only part of the target's images may keep it above the bar; the source
        then adds nothing (the plain Neural Cleanse sources still run).
    suspect_last_layer: suspects probe: a second feature-space reverse at the last conv group
        (by execution order of its conv), its flagged classes suspects too (True). Why: on the
        CIFAR-10 resnet20 WaNet model the three-quarter layer flags nothing, the last one flags
        the target (index 26.6) and two other classes. Both suspect sources stem from the
        resnet20 zoo's failures (BENCHMARKS.md); they add suspects, none is removed.
    suspect_weights: suspects probe: how the suspects' trigger scores are averaged: "equal"
        (default, the plain mean) or "anomaly" (weighted by each suspect's MAD anomaly index in
        its own reverse; a user ``target`` or the no-flag fallback keeps equal weights). Why
        "anomaly" exists: on vgg_small BadNets a last-layer false suspect (class 8, index 2.04)
        weighs as much as the target's triggers (indices 4.7-32.7) in the plain mean.
    suspect_combine: suspects probe: "trigger" (default: the mean runs over the suspects'
        triggers, so a class suspected by three reverses weighs three times) or "class"
        (ours: one term per suspect class, the LARGEST score of its triggers, weighed by their
        summed weights: a class's backdoor counts as gone only once none of its stand-in
        triggers works). Why "class" exists: a feature-space trigger is written into the few
        channels of its layer that reverse found, so pruning those channels disables it
        whether or not the real backdoor runs through them; on the resnet20 BadNets model,
        seed 1, all three suspects were class 0 (pixel, and feature at two layers), the chosen
        pruning was two channels in each feature trigger's layer, the score fell to 0.48, and
        the real trigger kept 89.87%. With "class" that repair
        keeps 80.41% (no pruning within the tolerance disables the pixel trigger); of four
        repairs rerun, two got better and two worse (vgg_small BadNets seed 1: 5.69 -> 10.29%),
        so "trigger" stays the default (BENCHMARKS.md, "Stop 28").
    pixel_when_agreed: suspects probe (ours): when Neural Cleanse's target (the flagged class
        with the smallest pixel mask) is flagged by a feature-space reverse too, that class's
        pixel trigger alone is the stand-in and every other suspect is dropped (False). Only
        the target, not any class both flag: on vgg_small Blended (seed 2) the pixel reverse
        flags 0, 2 and 9 and a feature reverse flags 2, a false suspect. Why: a feature
        trigger is written into channels its reverse chose, and pruning them disables it
        whether or not the real backdoor runs there; a pixel trigger enters where the real
        one does. On the resnet20 BadNets model (seed 1; ``benchmarks/probe_parts.py``) the
        oracle's 4-channel fix (true ASR 1.9%) leaves both class-0 feature triggers at 1.00
        and the pixel one at 0.27, while the chosen, gamed pruning (true ASR 89.8%) scores
        0.37 and 0.13 on them and 0.93 on the pixel one. Not the default: the agent then still
        misses (resnet20 BadNets seed 1 93.48%, vgg_small BadNets seed 1 31.44%; BENCHMARKS.md,
        "Stop 29").
    suspect_warps: suspects probe (ours): a third reverse, one small smooth warp of the image
        plane per class (:mod:`trojanprune.reverse.warp`); each class it flags (a warp of at
        most half a pixel that sends at least half of the fit images there, a high-side MAD
        outlier) is a suspect, its warp the stand-in (True). Why: a warping trigger is
        neither a patch nor a few channels of one layer; on the resnet20 WaNet zoo model
        Neural Cleanse flags nothing and the feature triggers were disabled by prunings that
        left 80% ASR, while the reversed warp sends 100% of the images to the target and the
        other classes' warps at most 9%, and a pruning that disables it cuts the real
        trigger's path (BENCHMARKS.md, "Stop 38"). Costs ``warp_steps`` forward/backward
        passes of about 256 images.
    warp_steps, warp_strength: the warp reverse's Adam steps (100) and its bound in half
        pixels (1.0: no pixel moves more than half a pixel along either axis).
    anp_eps, anp_iterations: ANP probe (ANP's 0.4 and 2000).
    unlearn_lr, unlearn_threshold, unlearn_epochs, recover_epochs: unlearn probe (RNP's 0.01,
        0.2, 20, 20).

    Data and reward:
    holdout: fraction of the clean set held out for the reward and the final choice (0.5);
        the rest feeds the probe and the graph features.
    backdoor_weight: lambda, the weight of the backdoor score in the reward (1.0).
    prune_cost: c, the reward's cost of pruning every channel (0.1: pruning 1% of the channels
        costs as much as 0.1 point of accuracy; it breaks ties towards smaller prunings).
    acc_penalty: mu, an extra cost per unit of held-out accuracy lost BEYOND acc_tolerance
        (10: each point below the tolerance costs 11 points of reward instead of 1). It shows
        the agent the constraint the final choice enforces anyway; without it (0) the agent,
        for which removing the backdoor is worth up to lambda = 100 points of accuracy, spends
        its episodes on prunings the final choice must reject (on the test fixture with the
        reversed-trigger probe, 4 of 204 candidates were admissible and ASR stayed at 18%).

    Agent (:mod:`trojanprune.onp.agent`):
    episodes: prunings the agent tries (192); must be >= 1.
    episodes_per_update: episodes per PPO batch, scored in one batched evaluation (16).
    update_epochs, lr, clip: PPO epochs per batch (8), Adam learning rate (0.01), ratio clip (0.2).
    encoder: "gnn" (default) or "mlp" (ablation: the same agent without the graph).
    conv: "gcn" (default) or "gat".
    hidden, gnn_layers: embedding width (32) and graph-convolution layers (2).
    init_prune: initial prune probability of an average channel (0.02).
    prior: initial weight of the probe's signal in the actor's logits (1.0; 0 = cold start).

    Graphs (:mod:`trojanprune.onp.graphs`):
    edge_rule: "quantile" (default) or "neighbours"; edge_quantile (0.9: about the top 10% most
        similar pairs of a layer are linked); edge_neighbours (4); dormant_ratio: a channel
        whose mean clean activation is at most this fraction of its layer's mean is dormant
        (0.05); the threshold is raised so dormant channels stay unlinked.
    layers: which unit groups may be pruned: "all" (default), "last:N", "first:N" or a name.

    Final choice:
    acc_tolerance: the chosen pruning's held-out accuracy may be at most this FRACTION below
        the unpruned model's (0.02 = 2 points, as this toolkit's ANP and RNP; with 250 held-out
        images accuracy moves in 0.4-point steps). The defender's images understate the test
        drop: on the eight seed-0 grid cells the final pruning's test drop was above its drop
        on the 500 clean images on all eight, by 0.72 points on average, and the paired
        standard error of that drop is about one point (BENCHMARKS.md, "Stop 46"). A tighter
        guard buys accuracy with backdoors: at 0.01 the mean test drop fell from 2.07 to 1.33
        points and issue 5's target was met on 5 cells instead of 4, but resnet20 Blended kept
        17.58% ASR and BadNets 3.97%, and the mean DER fell from 96.99 to 96.09; 0.015 lost
        the same two (5.71% and 5.96%). Hence 0.02, with 0.01 a choice for a defender who
        values accuracy over the last percents of ASR.
    accuracy: what "accuracy" means in the reward, in ``acc_tolerance``'s guard and in
        ``confirm_on_all``'s (ours): "top1" (default: the fraction of images classified as
        their label) or "soft" (the mean softmax probability of the label; it moves with every
        image, not only with those that flip, so the best of ~200 candidates is less often
        the luckiest). On stop 36's 15 ONP prunings (BENCHMARKS.md, "Stop 37") the held-out
        top-1 drop of the chosen pruning averaged 0.3 points against a 2.2-point test drop
        (correlation 0.23); the held-out soft drop averaged 2.2 (correlation 0.64). Not the
        default: on the eight seed-0 grid cells "soft" met issue 5's target on 3 against
        top-1's 5, mean DER 90.25 against 92.12 (a rule committed before the runs); its
        choice is the best of ~200 candidates too, and lucky on the soft measure as well.
        With "soft", the result's accuracy fields (``held_out_acc``, ``all_clean_acc``, the
        episodes' ``acc``) hold the soft accuracy.
    max_prune_fraction: the largest top-k pruning of the trained policy that is tried (0.1).
    refine_steps: after the final choice, at most this many greedy steps on the same reward
        (ours; 6, the default since stop 33; 0 = off): each step tries pruning one more
        channel of a pool and keeps the one that raises the reward most while the held-out
        accuracy (and, with ``confirm_on_all``, the accuracy on all the clean images) stays within
        ``acc_tolerance``; it stops when none does. Why: the agent's search is one sample of
        a noisy process; on the resnet20 BadNets model (seed 1) greedy steps on the
        pixel-trigger probe's reward reach 5.9% true ASR in three channels, the oracle's own
        first three. Measured with 6 steps (BENCHMARKS.md, "Stop 29"): of the agent's choices
        it took resnet20 BadNets seeds 1 and 2 from 89.87 and 4.48% to 1.80 and 0.67%,
        vgg_small BadNets seed 1 from 34.60 to 2.16% and Blended seed 2 from 42.02 to 5.74%,
        at 0.8-2.1 more test points; but where the backdoor is already gone and false
        suspects remain it spends the accuracy guard on their stand-ins: vgg_small WaNet seed 0 kept 0.67% ASR and lost 4.09 points
        instead of 1.55 (the 250 held-out images do not see it). Over 19 zoo repairs (stop 30)
        it raises the mean DER from 90.37 to 94.41 but meets issue 5's target on 6 instead of
        7: it spends 1.2-3.4 more test points on four repairs that were already clean. The
        held-out half, on which the candidates are chosen, understates the test drop by 1.6
        points on average; guarding the steps on the fit half too did not stop it (vgg_small
        WaNet seed 1: -3.33 points); alone it was therefore off by default. Followed by the
        give-back step (``give_back="score"``), which returns what the steps no longer need,
        the 19 replayed repairs meet the target on 9 instead of 8 (the give-back step alone),
        mean DER 94.46 instead of 90.49 (stop 32); hence the default. End to end through the
        CLI on vgg_small BadNets seed 1 (the costliest refinement of the 19) the repair took
        347 s on 2 threads: 1.91% ASR at -1.71 points (BENCHMARKS.md, "Stop 33"). Its cost
        stays: on the eight seed-0 grid cells it meets the target on 4, the give-back step
        alone on 5 (vgg_small Blended and WaNet, already repaired, lose 1.2 and 2.5 more
        test points). With the refinement scoring only the answered suspects
        (``refine_focus``, stop 34), the replay of those cells meets it on 5.
    refine_pool: the channels a refinement step tries: the trained policy's top
        ``refine_pool`` by prune probability and each probe signal column's top
        ``refine_pool`` (16), so a step costs at most (1 + signal columns) x 16 evaluations.
    confirm_on_all: the chosen pruning must ALSO keep accuracy within ``acc_tolerance`` on all
        the clean images, fit half included (True; candidates are tried in order of reward
        until one passes, the unpruned model always does). Why: the choice is the best of ~200
        candidates on the same 250 held-out images, so its held-out accuracy is biased upward
        (the winner's curse); the fit half takes no part in the reward, and twice the images
        halve the variance. On the CIFAR-10 WaNet zoo model the pruning chosen without it
        was 1.6 points below the unpruned model on the held-out half and 3.7 on the test
        split; with it, 1.8 on the test split (BENCHMARKS.md).
    give_back: after the final choice (and the refinement), return pruned channels one at a
        time (ours): "score" (default: return the channel whose return raises the reward most,
        among those that leave the probe's backdoor score no higher; repeat, trying again only
        the channels that qualified at the step before, until none does), "reward" (the same
        without the score condition) or "off". Why: the agent's choice can
        carry channels that cost accuracy and hold no backdoor; on the vgg_small BadNets zoo
        model three of a 12-channel pruning each cost about 1 test point and left the ASR where
        it was (BENCHMARKS.md, "Stop 31"). Replayed on the agent's choices of 19 zoo repairs
        (stop 32) "score" returned channels on 8 and met issue 5's target on 8 instead of 7
        (resnet20 BadNets seed 0: 1.43% at -2.32 points became 1.34% at -1.47), mean DER
        90.37 -> 90.49; "reward" did as well (90.56, 8) but may trade the probe's score for
        held-out accuracy, which the held-out half overstates (the winner's curse, stop 30):
        the returns' own test gains are small and sometimes negative (vgg_small BadNets seed 1:
        three channels returned, test drop 1.61 -> 2.46 points while the ASR fell 34.6 -> 30.3%).
    refine_focus: which suspects the refinement's backdoor score counts (ours):
        "answered-triggers" (default since stop 45: the stand-ins of the classes the final
        choice answered, as "answered", less their feature-space stand-ins that the choice did
        not itself answer; every suspect when nothing is left out), "answered" (stops 34-44:
        every stand-in of a class one of whose stand-ins lost at least half of its unpruned
        score under the chosen pruning; every suspect when it answered none or all of the
        suspect classes) or "all" (every suspect, as the agent's reward). Why
        "answered-triggers": a feature trigger is written into the channels its reverse chose,
        so one the choice hardly moved says only that the choice missed those channels, and
        chasing it spends accuracy; a pixel or warp stand-in enters where the real trigger
        does, so it stays even when the choice only dented it (refining without vgg_small
        BadNets seed 1's pixel stand-in, cut by a third, left 3.60% ASR at -2.72 points, with it
        3.47% at -2.00). On resnet20 WaNet (seed 0, one thread) the choice took the warp
        stand-in down by 97% and class 0's feature stand-in by 2%; scoring that feature
        stand-in too, the refinement pruned four more channels for it and the repair lost 2.26
        test points at 0.67% ASR; without it, 1.68 points at 0.81% (issue 5's target met). By a
        rule written before the runs, on the two seed-0 grid cells where the two can differ
        (the WaNet ones; on vgg_small WaNet they agreed on this machine): target met on 1
        against 0, mean DER 95.34 against 95.23. The rule was for the variant without the
        input-space exception, added after a replay showed the BadNets case above; it decides
        the same on both cells (BENCHMARKS.md, "Stop 45"). The give-back step always counts
        every suspect, so a return never revives any stand-in. Why focus at all (stop 34): a backdoor is a
        shortcut a few channels carry, so the class whose stand-in the agent's small pruning
        disabled is the one it found; a false suspect's stand-in is a natural feature the same
        pruning hardly moves, and chasing it spends accuracy. On vgg_small WaNet seed 0 the
        choice disabled class 0's feature-space stand-in (1.00 -> 0.03) and left the pixel
        stand-ins of the false suspects 1 and 9 at 0.96 and 0.95; the refinement on every
        suspect took them to 0.34 and 0.80 and the test drop from 1.55 to 4.09 points at the
        same ASR; on the answered class alone, 2.60. Replayed from the agent's choices of the
        same 19 zoo repairs as stop 32, by a rule committed before the replay: issue 5's target
        met on 11 instead of 9, mean DER 94.56 instead of 94.46 (vgg_small Blended seed 0 and
        SIG seed 1 newly met; Blended seed 2, not met either way, 5.74% -> 9.01% ASR)
        (BENCHMARKS.md, "Stop 34").
    """

    probe: str = "suspects"
    target: Any = None
    reverse_steps: Any = None
    reverse_batch_size: Any = None
    small_mask_ratio: Any = 3.0
    reverse_per_class_stop: bool = False
    score_margin: float = 2.0
    feature_per_class: int = 10
    feature_steps: int = 300
    feature_layer: Any = None
    suspect_large_masks: bool = True
    suspect_last_layer: bool = True
    large_mask_accuracy_ratio: float = LARGE_MASK_ACCURACY_RATIO
    suspect_weights: str = "equal"
    suspect_combine: str = "trigger"
    pixel_when_agreed: bool = False
    suspect_warps: bool = True
    warp_steps: int = 100
    warp_strength: float = 1.0
    anp_eps: float = 0.4
    anp_iterations: int = 2000
    unlearn_lr: float = 0.01
    unlearn_threshold: float = 0.2
    unlearn_epochs: int = 20
    recover_epochs: int = 20
    holdout: float = 0.5
    backdoor_weight: float = 1.0
    prune_cost: float = 0.1
    acc_penalty: float = 10.0
    episodes: int = 192
    episodes_per_update: int = 16
    update_epochs: int = 8
    lr: float = 0.01
    clip: float = 0.2
    encoder: str = "gnn"
    conv: str = "gcn"
    hidden: int = 32
    gnn_layers: int = 2
    init_prune: float = 0.02
    prior: float = 1.0
    edge_rule: str = "quantile"
    edge_quantile: float = 0.9
    edge_neighbours: int = 4
    dormant_ratio: float = 0.05
    layers: str = "all"
    acc_tolerance: float = 0.02
    max_prune_fraction: float = 0.1
    refine_steps: int = 6
    refine_pool: int = 16
    confirm_on_all: bool = True
    give_back: str = "score"
    refine_focus: str = "answered-triggers"
    accuracy: str = "top1"

    def __post_init__(self):
        from ..onp.agent import CONVS, ENCODERS
        from ..onp.graphs import EDGE_RULES
        from ..onp.probes import SUSPECT_COMBINES, SUSPECT_WEIGHTS, available_probes

        for name in ("target", "reverse_steps", "reverse_batch_size"):
            setattr(self, name, optional_number(getattr(self, name), name, integer=True,
                                                none_words=("", "auto", "none")))
        self.small_mask_ratio = small_mask_ratio_option(self.small_mask_ratio)
        for name in ("reverse_per_class_stop", "confirm_on_all", "suspect_large_masks", "suspect_last_layer",
                     "pixel_when_agreed", "suspect_warps"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.warp_steps, bool) or not isinstance(self.warp_steps, int) or self.warp_steps < 1:
            raise ConfigError(f"warp_steps must be an integer >= 1, got {self.warp_steps!r}")
        if isinstance(self.warp_strength, bool) or not isinstance(self.warp_strength, (int, float)) \
                or not self.warp_strength > 0:
            raise ConfigError(f"warp_strength must be a positive number (half pixels), got {self.warp_strength!r}")
        if self.refine_focus not in REFINE_FOCUSES:
            raise ConfigError(f"refine_focus must be one of {', '.join(REFINE_FOCUSES)}; got {self.refine_focus!r}")
        if self.accuracy not in ACCURACY_MEASURES:
            raise ConfigError(f"accuracy must be one of {', '.join(ACCURACY_MEASURES)}; got {self.accuracy!r}")
        if self.give_back not in GIVE_BACK_RULES:
            raise ConfigError(f"give_back must be one of {', '.join(GIVE_BACK_RULES)}; got {self.give_back!r}")
        if self.suspect_combine not in SUSPECT_COMBINES:
            raise ConfigError(f"suspect_combine must be one of {', '.join(SUSPECT_COMBINES)}; "
                              f"got {self.suspect_combine!r}")
        if self.suspect_weights not in SUSPECT_WEIGHTS:
            raise ConfigError(f"suspect_weights must be one of {', '.join(SUSPECT_WEIGHTS)}; "
                              f"got {self.suspect_weights!r}")
        if self.probe not in available_probes():
            raise ConfigError(f"unknown probe {self.probe!r}; probes: {', '.join(available_probes())}")
        if isinstance(self.episodes, bool) or not isinstance(self.episodes, int) or self.episodes < 1:
            raise ConfigError(f"episodes must be an integer >= 1 (the agent needs at least one "
                              f"episode to propose a pruning); got {self.episodes!r}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"encoder must be one of {', '.join(ENCODERS)}; got {self.encoder!r}")
        if self.conv not in CONVS:
            raise ConfigError(f"conv must be one of {', '.join(CONVS)}; got {self.conv!r}")
        if self.edge_rule not in EDGE_RULES:
            raise ConfigError(f"edge_rule must be one of {', '.join(EDGE_RULES)}; got {self.edge_rule!r}")
        for name in ("backdoor_weight", "prune_cost", "acc_penalty", "prior", "acc_tolerance",
                     "anp_eps", "dormant_ratio", "score_margin", "large_mask_accuracy_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"option {name} must be a finite number >= 0, got {value!r}")
        for name in ("holdout", "edge_quantile", "init_prune", "max_prune_fraction", "unlearn_threshold"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(f"option {name} must be in (0, 1), got {value!r}")
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ConfigError(f"option refine_steps must be an integer >= 0 (0 = no refinement), "
                              f"got {self.refine_steps!r}")
        for name in ("episodes_per_update", "update_epochs", "hidden", "gnn_layers", "edge_neighbours",
                     "anp_iterations", "unlearn_epochs", "recover_epochs", "refine_pool"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"option {name} must be an integer >= 1, got {value!r}")
        if self.episodes_per_update < 2:
            raise ConfigError(f"episodes_per_update must be at least 2, got {self.episodes_per_update}")
        if not self.lr > 0 or not 0 < self.clip < 1 or not self.unlearn_lr > 0:
            raise ConfigError(f"lr and unlearn_lr must be > 0 and clip in (0, 1); got {self.lr}, "
                              f"{self.unlearn_lr}, {self.clip}")


@register
class ONP(Defense):
    name = "onp"
    Options = Options
    needs_data = True
    min_images = MIN_IMAGES
    summary = "Optimized Neuron Pruning: a GNN + PPO agent learns which channels to prune"

    def run(self, model: nn.Module, clean: CleanData | None) -> RepairResult:
        from ..onp.agent import ActorCritic, EpisodeBatch, PPOConfig, prune_probabilities, train_ppo
        from ..onp.graphs import build_graphs, check_mappable
        from ..onp.probes import create_probe

        o = self.options
        seconds: dict[str, float] = {}  # wall time per stage, for the report
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[stage] = round(now - clock, 3)
            clock = now

        # -- 1. the clean data: probe half and held-out half ---------------------------------
        fit, held = self._split(clean)

        # -- 2. prunable units (residual-coupled channels are one unit) ----------------------
        all_units = discover_units(model, clean.x[:1])
        units = all_units if o.layers == "all" else all_units.select(o.layers)
        check_mappable(model, units)  # fail before the expensive probe, naming the layer

        # -- 3. the trigger-free backdoor probe -----------------------------------------------
        probe = create_probe(o.probe, model, units, fit, held, o, seed=self.seed, progress=self.progress)
        lap("probe")

        # -- 4. one graph per layer: nodes = channels, features incl. the probe's signal ------
        graphs = build_graphs(model, units, fit.x, fit.y, probe.signal(), probe.signal_names,
                              edge_rule=o.edge_rule, edge_quantile=o.edge_quantile,
                              edge_neighbours=o.edge_neighbours, dormant_ratio=o.dormant_ratio)
        graph_passes = 2  # activations and the clean Taylor term, one pass each over the fit half
        lap("graphs")

        # -- 5. the environment: reward of a batch of prunings, in one batched evaluation -----
        accuracy = MaskEvaluator(model, units, held.x, held.y)

        measure = RewardTerms(o, accuracy, probe, units.total)

        def check_reward(m: dict[str, torch.Tensor], where) -> None:
            bad = ~torch.isfinite(m["reward"])
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise DataError(f"ONP's reward is NaN or infinite {where(i)} (backdoor score "
                                f"{m['backdoor'][i].item()}, accuracy {m['acc'][i].item()}): the "
                                f"probe {o.probe!r} or the model produced non-finite values. The "
                                "input model is untouched")

        base = measure.unpruned
        check_reward(base, lambda i: "for the unpruned model")
        episodes_seen = 0

        def environment(actions: torch.Tensor) -> EpisodeBatch:
            nonlocal episodes_seen
            m = measure(1 - actions)
            check_reward(m, lambda i: f"at episode {episodes_seen + i + 1}")
            episodes_seen += len(actions)
            return EpisodeBatch(m["reward"], m)

        # -- 6. the agent: GNN encoder + PPO, warm-started from the probe's signal ------------
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "onp-agent"))
            policy = ActorCritic(graphs.feature_names, hidden=o.hidden, layers=o.gnn_layers,
                                 encoder=o.encoder, conv=o.conv, init_prune=o.init_prune,
                                 prior=o.prior)
        config = PPOConfig(episodes=o.episodes, episodes_per_update=o.episodes_per_update,
                           update_epochs=o.update_epochs, lr=o.lr, clip=o.clip)
        with progress_bar(self.progress) as bar:
            task = bar.add_task("ONP: episodes", total=o.episodes)

            def on_update(update: int, actions: torch.Tensor, batch: EpisodeBatch) -> None:
                i = batch.info
                for e in range(len(actions)):
                    bar.update(task, advance=1, description=(
                        f"ONP episode {episodes_seen - len(actions) + e + 1}: reward "
                        f"{i['reward'][e]:.3f} acc {i['acc'][e]:.3f} backdoor {i['backdoor'][e]:.3f} "
                        f"pruned {int(i['pruned'][e])}"))
                if self.progress:
                    log(f"ONP update {update + 1}: episodes {episodes_seen - len(actions) + 1}-"
                        f"{episodes_seen}, reward mean {i['reward'].mean():.3f} max "
                        f"{i['reward'].max():.3f}, acc {i['acc'].mean():.3f}, backdoor "
                        f"{i['backdoor'].mean():.3f}, pruned {i['pruned'].mean():.1f}")

            history = train_ppo(policy, graphs, environment, config,
                                seed=derive_seed(self.seed, "onp-ppo"), on_update=on_update)
        lap("episodes")  # the agent's updates and every episode's reward (probe score included)

        # -- 7. final choice: best reward on the held-out half, within the accuracy guard -----
        probs = prune_probabilities(policy, graphs)
        confirm = MaskEvaluator(model, units, clean.x, clean.y) if o.confirm_on_all else None
        chosen, choice = self._choose(probs, history, measure, base, units.total, confirm)
        if o.refine_steps:
            focused = measure
            if o.refine_focus != "all":
                focused, choice["refine_focus"] = self._focus(chosen, probe, measure, accuracy, units.total)
            reward = (choice["reward"] if focused is measure
                      else float(focused(chosen[None])["reward"][0]))
            chosen, choice["refine"] = self._refine(chosen, reward, probs, probe.signal(),
                                                    focused, float(base["acc"][0]), confirm,
                                                    choice.get("all_clean_acc_unpruned"), units)
        lap("final_choice")
        if o.give_back != "off":  # on every suspect: the returns must not revive any stand-in
            chosen, choice["give_back"] = self._give_back(chosen, measure, units)
            lap("give_back")
        everything = confirm if confirm is not None else MaskEvaluator(model, units, clean.x, clean.y)
        choice["clean_estimate"], choice["reason"] = self._account(chosen, measure, everything, units.total)

        # -- 8. prune for good ----------------------------------------------------------------
        pruned = units.pruned_list(chosen)
        repaired = apply_masks_permanently(model, units, pruned)
        info = torch.cat([torch.stack([i[k] for k in ("reward", "acc", "backdoor", "pruned")], 1)
                          for i in history.info])
        details = {
            "probe": probe.details(),
            "choice": choice,
            "unpruned": {k: float(v[0]) for k, v in base.items()},
            "policy_prune_probability": {g: [round(float(p), 4) for p in t]
                                         for g, t in units.split(probs).items()},
            "reward_curve": [round(float(r.mean()), 4) for r in history.rewards],
            "episodes": {"reward": _rounded(info[:, 0]), "acc": _rounded(info[:, 1]),
                         "backdoor": _rounded(info[:, 2]), "pruned": info[:, 3].long().tolist()},
            "graphs": graphs.summary(),
            "node_features": list(graphs.feature_names),
            "clean_images": {"fit": len(fit), "held_out": len(held)},
            "evaluations_by_part": {"probe": probe.evaluations, "reward_accuracy": accuracy.evaluations,
                                    "graph_features": graph_passes,
                                    "confirmation": everything.evaluations},
            "seconds": seconds,
        }
        evaluations = sum(details["evaluations_by_part"].values())
        return RepairResult(model=repaired, method=self.name, pruned=pruned, evaluations=evaluations,
                            target=probe.target, details=details, total_units=all_units.total,
                            images=dict(probe.images))

    # ------------------------------------------------------------------------------------
    def _split(self, clean: CleanData) -> tuple[CleanData, CleanData]:
        o = self.options
        n = len(clean)
        if n < MIN_IMAGES:
            raise DataError(f"ONP needs at least {MIN_IMAGES} clean images (recommended "
                            f"{RECOMMENDED_IMAGES}); got {n}")
        if n < RECOMMENDED_IMAGES:
            message = (f"ONP: only {n} clean images (recommended {RECOMMENDED_IMAGES}); the reward "
                       f"is measured on {int(round(n * o.holdout))} held-out images and will be noisy")
            warnings.warn(message, UserWarning, stacklevel=5)
            if self.progress:
                log(message)
        fit, held = clean.split(o.holdout, seed=derive_seed(self.seed, "onp-holdout"))
        if len(fit) < MIN_SPLIT_IMAGES or len(held) < MIN_SPLIT_IMAGES:
            raise DataError(f"too few clean images for ONP's split: holdout={o.holdout} of {n} "
                            f"images leaves {len(fit)} for the probe and {len(held)} held out; "
                            f"each part needs at least {MIN_SPLIT_IMAGES} (pass more images or "
                            f"change holdout)")
        return fit, held

    def _choose(self, probs, history, measure, base, total,
                confirm: MaskEvaluator | None) -> tuple[torch.Tensor, dict]:
        """The keep mask with the best reward among the episodes, the greedy policy and its
        top-k prunings, subject to the accuracy guard (see Options.acc_tolerance) on the
        held-out half and, with ``confirm``, on all the clean images (Options.confirm_on_all)."""
        o = self.options
        k_max = max(1, int(math.ceil(o.max_prune_fraction * total)))
        ks = sorted({int(round(k)) for k in torch.logspace(0, math.log10(k_max), 12).tolist()})
        order = torch.argsort(probs, descending=True, stable=True)
        extra, sources = [], []
        greedy = (probs > 0.5).float()
        extra.append(1 - greedy)
        sources.append(f"greedy policy (p > 0.5): {int(greedy.sum())} channels")
        for k in ks:
            keep = torch.ones(total)
            keep[order[:k]] = 0
            extra.append(keep)
            sources.append(f"policy top-{k}")
        extra_m = measure(torch.stack(extra))
        keeps = [torch.ones(1, total), torch.stack(extra)] + [1 - a.float() for a in history.actions]
        fields = ("reward", "acc", "backdoor", "pruned")
        stats = {k: torch.cat([base[k], extra_m[k]] + [b[k] for b in history.info]) for k in fields}
        sources = ["unpruned"] + sources + [f"episode {i + 1}" for i in range(sum(len(a) for a in history.actions))]
        keeps = torch.cat(keeps)
        ok = stats["acc"] >= base["acc"][0] - o.acc_tolerance - 1e-9
        reward = torch.where(ok, stats["reward"], torch.full_like(stats["reward"], -math.inf))
        # by reward, best first; the stable sort keeps the unpruned model (index 0) first on ties
        ranked = [int(i) for i in torch.argsort(-reward, stable=True) if bool(ok[i])]
        best, rejected, all_acc = ranked[0], 0, None
        if confirm is not None:
            base_all = float(accuracy_of(confirm, o.accuracy)(torch.ones(1, total))[0])
            floor_all = base_all - o.acc_tolerance - 1e-9
            # the unpruned model is among the candidates and passes, so the loop always stops
            for start in range(0, len(ranked), 16):  # a batch of 16 per evaluation
                batch = ranked[start:start + 16]
                accs = accuracy_of(confirm, o.accuracy)(keeps[batch]).cpu()
                passing = (accs >= floor_all).nonzero().flatten()
                if len(passing):
                    best, all_acc = batch[int(passing[0])], float(accs[int(passing[0])])
                    rejected = start + int(passing[0])
                    break
                rejected = start + len(batch)
        choice = {"source": sources[best], "reward": float(stats["reward"][best]),
                  "held_out_acc": float(stats["acc"][best]),
                  "backdoor_score": float(stats["backdoor"][best]),
                  "pruned": int(stats["pruned"][best]), "candidates": len(sources),
                  "within_tolerance": int(ok.sum()),
                  "rule": (f"highest reward among the unpruned model, the episodes, the greedy "
                           f"policy and its top-k prunings (k <= {k_max}) whose held-out accuracy "
                           f"is within {o.acc_tolerance} of the unpruned model's"
                           + (" and whose accuracy on all the clean images is too" if confirm else ""))}
        if confirm is not None:
            choice.update({"all_clean_acc": all_acc, "all_clean_acc_unpruned": base_all,
                           "rejected_by_confirmation": rejected})
        return keeps[best], choice

    def _focus(self, keep: torch.Tensor, probe, measure: "RewardTerms", accuracy: MaskEvaluator,
               total: int, refine_focus: str | None = None) -> tuple["RewardTerms", dict]:
        """The reward terms that the refinement uses (Options.refine_focus, or ``refine_focus``
        when given; ours): the probe restricted to the suspect classes the chosen pruning
        ``keep`` answered, or ``measure`` itself when the probe has no suspects to restrict or
        the choice answered none or all of them."""
        per_trigger = (refine_focus or self.options.refine_focus) == "answered-triggers"
        view = (probe.answered(keep.float().cpu(), per_trigger=per_trigger)
                if hasattr(probe, "answered") else None)
        if view is None:
            return measure, {"answered_classes": None,
                             "rule": "every suspect (the choice answered none or all of the suspect "
                                     "classes" + (", or left none of their stand-in triggers out"
                                                  if per_trigger else "") + ", or the probe has no suspects)"}
        rule = ("the suspects of the classes one of whose stand-in triggers lost at least half of its "
                "unpruned score under the choice")
        if per_trigger:
            rule += ", less their feature-space stand-in triggers that lost less than half"
        return RewardTerms(self.options, accuracy, view, total), {
            "answered_classes": view.answered_classes, "lost_share": view.lost_share,
            "suspects": [list(s) for s in view.suspects], "rule": rule}

    def _refine(self, keep: torch.Tensor, reward: float, probs: torch.Tensor, signal: torch.Tensor,
                measure, base_acc: float, confirm: MaskEvaluator | None, base_all_acc: float | None,
                units) -> tuple[torch.Tensor, dict]:
        """Greedy steps from the chosen pruning on the same reward (Options.refine_steps; ours).
        ``base_all_acc``: the unpruned model's accuracy on ``confirm``'s images (the final
        choice measured it). The held-out accuracy is measured first, so that the (costlier)
        probe scores only the tries within the guard that can still raise the reward
        (:meth:`RewardTerms.improving`)."""
        o = self.options
        pool = set(torch.argsort(probs.cpu(), descending=True, stable=True)[:o.refine_pool].tolist())
        for col in signal.float().cpu().T:
            if bool(col.max() > col.min()):  # a constant column (a space without suspects) ranks nothing
                pool |= set(torch.argsort(col, descending=True, stable=True)[:o.refine_pool].tolist())
        floor_all = base_all_acc - o.acc_tolerance - 1e-9 if confirm is not None else None
        confirm_accuracy = accuracy_of(confirm, o.accuracy) if confirm is not None else None
        keep = keep.clone().float().cpu()
        added = []
        for _ in range(o.refine_steps):
            tries = [i for i in sorted(pool) if keep[i] > 0.5]
            if not tries:
                break
            masks = keep.repeat(len(tries), 1)
            masks[torch.arange(len(tries)), torch.tensor(tries)] = 0
            better, m = measure.improving(masks, reward, floor=base_acc - o.acc_tolerance - 1e-9)
            tries = [t for t, b in zip(tries, better.tolist()) if b]
            if not tries:
                break
            masks = masks[better]
            step = None
            for i in torch.argsort(-m["reward"], stable=True).tolist():
                if floor_all is None or float(confirm_accuracy(masks[i:i + 1])[0]) >= floor_all:
                    step = i
                    break
            if step is None:
                break
            keep, reward = masks[step], float(m["reward"][step])
            added.append({"unit": list(units.unit_of(tries[step])), "reward": round(reward, 6),
                          "held_out_acc": round(float(m["acc"][step]), 4),
                          "backdoor_score": round(float(m["backdoor"][step]), 6)})
        return keep, {"pool": len(pool), "steps": added,
                      "rule": "greedy: prune one more pool channel while it raises the reward within "
                              "the accuracy guard"}

    def _account(self, keep: torch.Tensor, measure: "RewardTerms", everything: MaskEvaluator,
                 total: int) -> tuple[dict, str]:
        """The final pruning's figures on the defender's side and a one-line account of them:
        the probe's backdoor score, and the top-1 and soft accuracy (mean probability of the
        label) on all the clean images, unpruned and pruned. The choice was made on these
        images, so their top-1 accuracy overstates the pruned model's: on stop 36's 15 ONP
        prunings of the CIFAR-10 zoo it fell 1.4 points on average where the test accuracy
        fell 2.2 (BENCHMARKS.md, "Stop 37"). The soft drop came closer there (2.3), but it is
        a loss of confidence, not of accuracy: on a model as sure of itself as the tests'
        fixture (98% accurate) it falls several times as far as the accuracy does."""
        pair = torch.stack([torch.ones(total), keep.float().cpu()])
        top1, soft = everything.accuracy(pair).cpu(), everything.soft_accuracy(pair).cpu()
        # the probe alone (the reward's held-out accuracy is not needed here); the unpruned
        # model's score is already known
        scores = torch.cat([measure.unpruned["backdoor"][:1],
                            measure.probe.score(pair[1:]).cpu().float()])
        n = int((keep < 0.5).sum())
        estimate = {"images": everything.num_images, "top1": _rounded(top1), "soft": _rounded(soft),
                    "backdoor_score": _rounded(scores)}
        if n == 0:
            return estimate, (f"pruned nothing: no pruning within the accuracy guard raised the reward "
                              f"(probe backdoor score {float(scores[0]):.2f})")
        return estimate, (
            f"pruned {n} of {total} channels: probe backdoor score {float(scores[0]):.2f} -> "
            f"{float(scores[1]):.2f}; on the {everything.num_images} clean images the choice was made "
            f"on (so optimistic), top-1 accuracy {float(top1[0]):.1%} -> {float(top1[1]):.1%}, mean "
            f"probability of the label {float(soft[0]):.3f} -> {float(soft[1]):.3f}")

    def _give_back(self, keep: torch.Tensor, measure: "RewardTerms", units) -> tuple[torch.Tensor, dict]:
        """Return pruned channels one at a time (Options.give_back; ours): each step tries
        unpruning pruned channels and keeps the return with the highest reward among
        those that raise it (and, with "score", leave the backdoor score no higher); it stops
        when none does. A channel whose return did not qualify at one step is not tried again
        (lazily, as in lazy greedy selection): the first step tries every pruned channel, each
        later one only those that qualified at the step before. Wherever trying every channel
        at every step would return at most one, this returns the same (that rule's second step
        finds nothing among all the channels, so nothing among these); where it returns many,
        this saves most of each step's cost, which grows with the suspects (vgg_small SIG,
        eight suspects: 13 full steps took 179 s, the lazy ones 25 s, returning 4 channels
        instead of 12; BENCHMARKS.md, "Stop 41"). Only the defender's held-out half and the
        probe decide."""
        keep = keep.clone().float().cpu()
        now = measure(keep[None])
        reward, backdoor = float(now["reward"][0]), float(now["backdoor"][0])
        score_rule = self.options.give_back == "score"
        returned = []
        tries = (keep < 0.5).nonzero().flatten().tolist()
        while tries:
            masks = keep.repeat(len(tries), 1)
            masks[torch.arange(len(tries)), torch.tensor(tries)] = 1
            ok, m = measure.improving(masks, reward, backdoor=backdoor if score_rule else None)
            if m is None:
                break
            qualified = [t for t, q in zip(tries, ok.tolist()) if q]
            i = int(m["reward"].argmax())
            keep = masks[ok.nonzero().flatten()[i]]
            reward, backdoor = float(m["reward"][i]), float(m["backdoor"][i])
            returned.append({"unit": list(units.unit_of(qualified[i])), "reward": round(reward, 6),
                             "held_out_acc": round(float(m["acc"][i]), 4),
                             "backdoor_score": round(backdoor, 6)})
            tries = qualified[:i] + qualified[i + 1:]
        rule = ("return a pruned channel while it raises the reward"
                + (" and leaves the backdoor score no higher" if score_rule else "")
                + "; after the first step, only the channels that qualified at the step before are tried")
        return keep, {"returned": returned, "rule": rule}


class RewardTerms:
    """ONP's reward of keep masks and its terms (see Options: backdoor_weight, prune_cost,
    acc_penalty, acc_tolerance): reward = held-out accuracy - lambda * backdoor score - c *
    pruned share - mu * (accuracy lost beyond the tolerance). ``unpruned``: the terms of the
    unpruned model, which set the accuracy floor of the penalty."""

    def __init__(self, options: Options, accuracy: MaskEvaluator, probe, total: int):
        self.options, self.accuracy, self.probe, self.total = options, accuracy, probe, total
        # A probe that scores on the same held-out images can hand over their plain logits
        # from its own pass (SuspectsProbe.score_and_held_logits): the accuracy then costs
        # no pass of its own.
        held = getattr(probe, "held", None)
        self._shared = (hasattr(probe, "score_and_held_logits") and held is not None
                        and held.x.shape == accuracy.images.shape
                        and torch.equal(held.x.to(accuracy.device, torch.float32), accuracy.images))
        self.floor = None
        self.unpruned = self(torch.ones(1, total))
        self.floor = float(self.unpruned["acc"][0]) - options.acc_tolerance

    def __call__(self, keep: torch.Tensor, acc: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Reward terms of each keep mask; ``acc``: their held-out accuracy, if measured."""
        logits = None
        if acc is None and self._shared:
            backdoor, logits = self.probe.score_and_held_logits(keep)
        else:
            backdoor = self.probe.score(keep)
        if acc is None:
            acc = self._held_accuracy(keep, logits)
        return self._terms(keep, acc, backdoor)

    def _held_accuracy(self, keep: torch.Tensor, held_logits: torch.Tensor | None) -> torch.Tensor:
        """The held-out accuracy of the keep masks: from the probe's plain held-out logits
        when it gave them, else a pass of the accuracy evaluator."""
        if held_logits is None:
            return accuracy_of(self.accuracy, self.options.accuracy)(keep)
        measure = soft_accuracy if self.options.accuracy == "soft" else top1_accuracy
        return measure(held_logits, self.accuracy.labels)

    def improving(self, keep: torch.Tensor, reward: float, *, floor: float | None = None,
                  backdoor: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """``(qualified, terms)``: which keep masks raise the reward above ``reward`` (with a
        held-out accuracy of at least ``floor`` and a backdoor score of at most ``backdoor``,
        where given), and the reward terms of those alone (None when none does). The same
        masks and numbers as filtering ``self(keep)`` (up to float rounding: see below), for
        less: the held-out accuracy is
        measured first, and a probe that scores its suspects in stages
        (:meth:`SuspectsProbe.staged_score`) drops a mask as soon as its suspects scored so
        far show that it cannot qualify. That holds because the reward falls as the backdoor
        score rises (``backdoor_weight`` >= 0) and the partial score is a lower bound of the
        whole. The refinement and the give-back step ask this of every try; their tries
        change one channel each and come in unit order, so the tries of one layer are
        consecutive masks that agree on every other layer, and the masked network up to that
        layer runs once for all of them (:func:`~trojanprune.engine.sharing_agreeing_masks`)."""
        with sharing_agreeing_masks():
            return self._improving(keep, reward, floor, backdoor)

    def _improving(self, keep, reward, floor, backdoor):
        staged = getattr(self.probe, "staged_score", None) if self._shared else None
        held_logits, score_rows = staged(keep) if staged is not None else (None, None)
        acc = self._held_accuracy(keep, held_logits).cpu()

        def qualifies(rows: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
            """Whether masks ``rows`` qualify with this backdoor score (or a lower bound of it:
            then False means they cannot)."""
            terms = self._terms(keep[rows.to(keep.device)], acc[rows], score)
            ok = terms["reward"] > reward + 1e-9
            if backdoor is not None:
                ok &= terms["backdoor"] <= backdoor + 1e-9
            return ok

        start = acc >= floor if floor is not None else torch.ones(len(keep), dtype=torch.bool)
        if score_rows is not None:
            rows, score = score_rows(start, screen=qualifies)
        else:
            rows = start.nonzero().flatten()
            score = self.probe.score(keep[rows.to(keep.device)]) if len(rows) else torch.zeros(0)
        score = score.float().cpu()
        ok = qualifies(rows, score) if len(rows) else torch.zeros(0, dtype=torch.bool)
        rows, score = rows[ok], score[ok]
        qualified = torch.zeros(len(keep), dtype=torch.bool)
        qualified[rows] = True
        if not len(rows):
            return qualified, None
        return qualified, self._terms(keep[rows.to(keep.device)], acc[rows], score)

    def _terms(self, keep: torch.Tensor, acc: torch.Tensor, backdoor: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.options
        acc = acc.cpu()
        backdoor = backdoor.cpu().float()
        pruned = (keep < 0.5).float().sum(1)
        reward = acc - o.backdoor_weight * backdoor - o.prune_cost * pruned / self.total
        if self.floor is not None:
            reward = reward - o.acc_penalty * (self.floor - acc).clamp_min(0)
        return {"reward": reward, "acc": acc, "backdoor": backdoor, "pruned": pruned}


def accuracy_of(evaluator: MaskEvaluator, measure: str):
    """The evaluator's accuracy function that Options.accuracy names."""
    return evaluator.soft_accuracy if measure == "soft" else evaluator.accuracy


def _rounded(values: torch.Tensor, digits: int = 4) -> list[float]:
    return [round(float(v), digits) for v in values]
