"""ANP: Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Perturbations Purify
Backdoored Deep Neural Networks", NeurIPS 2021, arXiv 2110.14430; official code
csdongxian/ANP_backdoor).

The paper's observation: neurons that carry a backdoor are sensitive to small adversarial
perturbations of the neurons themselves (perturbed, the network starts predicting the target
class even without the trigger). So learn a mask m in [0, 1] per neuron that keeps the clean
loss low both as is and under the worst perturbation of every neuron's BatchNorm weight and
bias by relative amounts delta, xi in [-eps, eps]:

    min_m  alpha * L(m) + (1 - alpha) * max_{delta, xi} L(m + delta, 1 + xi)

with one signed-gradient ascent step of size eps from a random start for the inner
maximization and SGD (lr 0.2, momentum 0.9) on m, clipped to [0, 1], for the outer; then prune
the neurons whose mask is small.

How it is done here (see :mod:`.neuron_perturbation` for the mechanics):
- Neurons are the engine's units (conv channels and hidden linear neurons; residual-coupled
  channels are one unit), perturbed at their hook points. For a BatchNorm hook point this is
  exactly the paper's perturbation; for a conv/linear hook point without a following norm the
  same rule is applied to its weighted sum and bias (ours).
- Faithful to the paper/official code: eps 0.4, alpha 0.2, 2,000 iterations, batch 128, mask
  lr 0.2 with momentum 0.9, one perturbation step of size eps from U[-eps, eps], masks
  initialised at 1 and clipped to [0, 1], prune when mask <= threshold. As the official script,
  the masks are learned with the model in train mode (``batch_stats``: BatchNorm normalizes
  with the mini-batch's statistics, which absorbs part of a layer-wide perturbation); the
  running statistics are restored afterwards, so the model is left exactly as it was. This
  matters: in eval mode the perturbations compound through every layer (on the test fixture the
  perturbed loss starts near 80 instead of 2.6) and the masks collapse to zero.
- Ours: perturbations are projected back onto [-eps, eps] after the step (the paper's
  constraint; the official code does not clip, so its perturbations can reach 2*eps); no data
  augmentation (the official script uses CIFAR's crop and flip; images here can be anything).
- Which units to prune (ours; the paper and peer toolkits pick the threshold with test-set
  ASR): by default the official code's "prune by number" walk down the masks, lowest first
  (ties, common at 0, broken by the mask's mean over the optimization: the unit that collapsed
  first goes first), over the units whose mask fell to 0.9 or below, stopping before the first
  prefix whose accuracy on a held-out 20% of the clean set (class-stratified, seeded) falls
  more than ``acc_tolerance`` (2 points) below the unpruned model's; the masks are learned on
  the other 80% (see :func:`~.neuron_perturbation.select_pruning` for why not a threshold
  sweep). ``threshold=0.2`` gives the paper's fixed rule and ``prune_ratio`` a fixed fraction;
  both use every clean image for the masks. Pruned units are removed entirely (weight and
  bias, via ``apply_masks_permanently``); the official code zeroes the BatchNorm weight only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..engine import apply_masks_permanently, discover_units
from . import register
from .base import CleanData, Defense, RepairResult
from .neuron_perturbation import (anp_mask_scores, check_option_fields, check_selection_options,
                                  mask_values_by_group, optimize_anp_masks, select_pruning,
                                  split_for_selection)

__all__ = ["ANP", "Options", "anp_mask_scores"]


@dataclass
class Options:
    """ANP options (paper defaults unless marked ours).

    eps: bound of the relative neuron perturbations delta (BN weight) and xi (BN bias) (0.4).
    alpha: weight of the natural loss; 1 - alpha weighs the perturbed loss (0.2).
    iterations: mask-optimization iterations, one mini-batch each (2000).
    batch_size: mini-batch size (128).
    lr, momentum: SGD on the masks (0.2, 0.9).
    noise_steps: signed-gradient ascent steps for the perturbation, each of size eps/noise_steps (1).
    threshold: prune units whose mask is <= this (the paper uses 0.2). None (default, ours):
        choose how many to prune on held-out clean data, see acc_tolerance.
    prune_ratio: instead, prune this fraction of all units, lowest masks first. None by default.
    acc_tolerance: automatic choice: prune the lowest masks one by one while the held-out
        accuracy stays at most this FRACTION below the unpruned model's (0.02 = 2 points;
        ours: with the usual 500 clean images the held-out 100 measure accuracy in 1-point
        steps, so 1 point would be noise, while defenses are usually judged acceptable within
        2-3 points of clean accuracy).
    holdout: fraction of the clean set held out for that choice (0.2; ours). Unused with a
        fixed threshold or prune_ratio.
    layers: which unit groups get masks: "all" (default, as the paper: every BN layer),
        "last:N", "first:N", or a group name.
    batch_stats: learn the masks with the model in train mode, BatchNorm on mini-batch
        statistics (True, as the official code); False = eval mode, running statistics.
    """

    eps: float = 0.4
    alpha: float = 0.2
    iterations: int = 2000
    batch_size: int = 128
    lr: float = 0.2
    momentum: float = 0.9
    noise_steps: int = 1
    threshold: float | None = None
    prune_ratio: float | None = None
    acc_tolerance: float = 0.02
    holdout: float = 0.2
    layers: str = "all"
    batch_stats: bool = True

    def __post_init__(self):
        check_option_fields(self, positive=("lr",), non_negative=("eps", "momentum"),
                            fractions=("alpha",),
                            at_least_one=("iterations", "batch_size", "noise_steps"))
        check_selection_options(self)


@register
class ANP(Defense):
    name = "anp"
    Options = Options
    needs_data = True
    min_images = 10
    summary = ("Adversarial Neuron Pruning: prune neurons whose learned mask shrinks under "
               "neuron perturbations")

    def run(self, model: nn.Module, clean: CleanData | None) -> RepairResult:
        o = self.options
        all_units = discover_units(model, clean.x[:1])
        units = all_units if o.layers == "all" else all_units.select(o.layers)
        fit, held, fallback = split_for_selection(clean, o, self.seed, "anp-holdout")

        scores, spent, history = optimize_anp_masks(model, units, fit, o, self.seed, self.progress)
        prune, pruned, selection, evals = select_pruning(
            model, units, scores, held, threshold=o.threshold, prune_ratio=o.prune_ratio,
            acc_tolerance=o.acc_tolerance, tiebreak=history.mask_mean)

        repaired = apply_masks_permanently(model, units, prune)
        details = {
            **selection,
            "mask_values": mask_values_by_group(units, scores),
            "optimization_images": len(fit),
            "holdout_images": 0 if held is None else len(held),
            "holdout_fallback": fallback,
            "history": history.as_dict(),
        }
        return RepairResult(model=repaired, method=self.name, pruned=pruned,
                            evaluations=spent + evals, details=details, total_units=all_units.total)
