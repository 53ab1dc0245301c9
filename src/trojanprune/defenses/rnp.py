"""RNP: Reconstructive Neuron Pruning (Li, Lyu, Ma, Koren, Lyu, Li, Jiang, "Reconstructive
Neuron Pruning for Backdoor Defense", ICML 2023, arXiv 2305.14876; official code bboylyg/RNP).

The paper's observation: unlearning the clean task exposes the backdoor. Maximizing the clean
loss destroys the clean features quickly, while the neurons that carry the backdoor survive;
learning masks that recover the clean accuracy of the unlearned model then switches those
neurons off. Three steps:

1. unlearn: gradient ASCENT on the clean cross-entropy (SGD lr 0.01, momentum 0.9, weight decay
   5e-4, batch 128, lr x0.1 at epochs 10 and 20) until the clean accuracy measured during an
   epoch falls to ``clean_threshold`` (0.20) or below, for at most ``unlearn_epochs`` (20);
2. recover: on the unlearned model, learn a mask m in [0, 1] per neuron (initialised at 1,
   clipped to [0, 1]) by minimizing ``alpha * L_clean`` with SGD (lr 0.2, momentum 0.9) for 20
   epochs. In the official code ``alpha`` (0.2) only scales this loss (so it acts as a factor on
   the step size); the mask multiplies the BatchNorm weight, the bias is kept;
3. prune the ORIGINAL model's neurons with small masks (mask <= threshold).

How it is done here (see :mod:`.neuron_perturbation` for the mechanics):
- Neurons are the engine's units, masked at their hook points (exactly the paper's BatchNorm
  masks for conv -> BN layers; ours for other layers: the mask scales a conv/linear's weighted
  sum and keeps its bias). Residual-coupled channels share one mask.
- As the official code, both the unlearning and the recovering run the model in train mode
  (BatchNorm on batch statistics, running statistics updated on the private unlearned copy);
  mini-batches of one image are skipped (BatchNorm cannot train on them).
- If the accuracy never reaches ``clean_threshold`` within ``unlearn_epochs`` (the official code
  would then recover from a checkpoint it never saved), we recover from the last state and say
  so in ``details["unlearn"]["reached_threshold"]``.
- The ascent's gradient norm is clipped to ``unlearn_clip`` (20). The official code calls
  ``clip_grad_norm_(max_norm=20)`` too, but before ``backward()``, where it has no effect; we
  clip where it acts. Why: on a network without normalization layers the unclipped ascent
  blows the logits up until the loss overflows (measured: a BN-free CNN on MNIST reached an
  infinite loss within the first epoch, before its accuracy was ever measured). If the loss
  still becomes non-finite, the unlearning stops at the last finite state (the clean task is
  unlearned by then; ``details["unlearn"]["stopped"]`` says so) instead of failing.
- Which units to prune (ours; the paper sweeps thresholds against test-set ASR): as ANP's, by
  default the official code's "prune by number" walk down the recovered masks, lowest first
  (ties broken by the mask's mean over the recovering steps), stopping before the first prefix
  whose accuracy on a held-out 20% of the clean set falls more than ``acc_tolerance`` (2
  points) below the unpruned model's, the other 80% being used for unlearning and recovering;
  or a fixed ``threshold`` (the paper's examples: 0.2) or ``prune_ratio``. Pruned units are
  removed entirely (``apply_masks_permanently``).

Measured on the test fixture (a narrow vgg_small on MNIST with a BadNets backdoor, 500 clean
images): the ascent overshoots within one epoch (accuracy 0.93 -> 0.52 -> 0.12, the model then
predicts the target class for everything) and the recovery cannot bring the clean accuracy back
(about 0.2); the ~40 units whose masks reach 0 include the backdoor units but also clean ones.
The paper's threshold 0.2 then removes the backdoor (ASR 100% -> 0%) at a cost of about 18 points
of clean accuracy; the default held-out rule (the walk down the masks) prunes 4 units, ASR
100% -> 39% at -1.2 points (the earlier threshold sweep pruned nothing). No stopping point of
the unlearning we tried (per step) gave a better trade-off on that model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import Units, apply_masks_permanently, discover_units
from ..progress import progress_bar
from ..utils import copy_model, derive_seed
from . import register
from .base import CleanData, Defense, RepairResult, check_finite
from .neuron_perturbation import (NeuronMasks, logits_of, model_mode, check_option_fields,
                                  check_selection_options, mask_values_by_group, select_pruning,
                                  split_for_selection)

__all__ = ["RNP", "Options", "unlearn", "recover_masks"]

# The official code's learning-rate schedule for unlearning (MultiStepLR, gamma 0.1).
UNLEARN_MILESTONES = (10, 20)


@dataclass
class Options:
    """RNP options (paper / official-code defaults unless marked ours).

    unlearn_lr, unlearn_momentum, unlearn_weight_decay: SGD for the unlearning ascent (0.01,
        0.9, 5e-4; lr x0.1 at epochs 10 and 20).
    unlearn_clip: the ascent's gradients are clipped to this L2 norm (20, the official code's
        max_norm; see the module docstring). 0 disables clipping.
    unlearn_epochs: at most this many unlearning epochs (20).
    clean_threshold: stop unlearning once the epoch's clean accuracy is <= this fraction (0.20).
    recover_lr, recover_momentum: SGD on the masks (0.2, 0.9).
    recover_epochs: mask-recovering epochs (20).
    alpha: factor on the recovering loss (0.2; the official code's ``alpha * loss``).
    batch_size: mini-batch size of both steps (128).
    threshold: prune units whose mask is <= this. None (default, ours): choose how many to
        prune on held-out clean data, see acc_tolerance. The official code sweeps 0 ... 0.9 in
        steps of 0.05.
    prune_ratio: instead, prune this fraction of all units, lowest masks first. None by default.
    acc_tolerance: automatic choice: prune the lowest masks one by one while the held-out
        accuracy stays at most this FRACTION below the unpruned model's (0.02 = 2 points; ours,
        as ANP's).
    holdout: fraction of the clean set held out for that choice (0.2; ours). Unused with a
        fixed threshold or prune_ratio.
    layers: which unit groups get masks: "all" (default, as the paper: every BN layer),
        "last:N", "first:N", or a group name.
    """

    unlearn_lr: float = 0.01
    unlearn_momentum: float = 0.9
    unlearn_weight_decay: float = 5e-4
    unlearn_clip: float = 20.0
    unlearn_epochs: int = 20
    clean_threshold: float = 0.20
    recover_lr: float = 0.2
    recover_momentum: float = 0.9
    recover_epochs: int = 20
    alpha: float = 0.2
    batch_size: int = 128
    threshold: float | None = None
    prune_ratio: float | None = None
    acc_tolerance: float = 0.02
    holdout: float = 0.2
    layers: str = "all"

    def __post_init__(self):
        check_option_fields(self, positive=("unlearn_lr", "recover_lr", "alpha"),
                            non_negative=("unlearn_momentum", "unlearn_weight_decay",
                                          "recover_momentum", "unlearn_clip"),
                            fractions=("clean_threshold",),
                            at_least_one=("unlearn_epochs", "recover_epochs", "batch_size"))
        check_selection_options(self)


@register
class RNP(Defense):
    name = "rnp"
    Options = Options
    needs_data = True
    min_images = 10
    summary = ("Reconstructive Neuron Pruning: unlearn the clean task, recover it with neuron "
               "masks, prune low masks")

    def run(self, model: nn.Module, clean: CleanData | None) -> RepairResult:
        o = self.options
        all_units = discover_units(model, clean.x[:1])
        units = all_units if o.layers == "all" else all_units.select(o.layers)
        fit, held, fallback = split_for_selection(clean, o, self.seed, "rnp-holdout")
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "rnp"))

        unlearned, unlearn_info = unlearn(model, fit, o, gen, self.progress)
        scores, recover_info = recover_masks(unlearned, units, fit, o, gen, self.progress)
        del unlearned
        prune, pruned, selection, evals = select_pruning(
            model, units, scores, held, threshold=o.threshold, prune_ratio=o.prune_ratio,
            acc_tolerance=o.acc_tolerance, tiebreak=recover_info.pop("mask_mean"))

        repaired = apply_masks_permanently(model, units, prune)
        details = {
            **selection,
            "mask_values": mask_values_by_group(units, scores),
            "unlearn": unlearn_info,
            "recover": recover_info,
            "optimization_images": len(fit),
            "holdout_images": 0 if held is None else len(held),
            "holdout_fallback": fallback,
        }
        evaluations = unlearn_info["epochs"] + o.recover_epochs + evals
        return RepairResult(model=repaired, method=self.name, pruned=pruned,
                            evaluations=evaluations, details=details, total_units=all_units.total)


def _epoch(data: CleanData, batch_size: int,
           gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass over ``data``; batches of a single image are skipped (train-mode BN)."""
    order = torch.randperm(len(data), generator=gen).to(data.x.device)
    for start in range(0, len(data), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) > 1:
            yield data.x[idx], data.y[idx]


def unlearn(model: nn.Module, data: CleanData, o: Options, gen: torch.Generator,
            progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Step 1: a copy of ``model`` unlearned by gradient ascent on ``data``'s cross-entropy,
    until the accuracy during an epoch is <= ``o.clean_threshold`` (or ``o.unlearn_epochs``).
    ``model`` is not modified; the copy's parameters are frozen again on return."""
    net = copy_model(model)
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=o.unlearn_lr, momentum=o.unlearn_momentum,
                                weight_decay=o.unlearn_weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(UNLEARN_MILESTONES),
                                                    gamma=0.1)
    accs, losses, reached, stopped = [], [], False, None
    with model_mode(net, train=True), progress_bar(enabled=progress) as bar:
        task = bar.add_task("RNP: unlearning", total=o.unlearn_epochs)
        for _ in range(o.unlearn_epochs):
            correct, seen, total_loss, steps = 0, 0, 0.0, 0
            for x, y in _epoch(data, o.batch_size, gen):
                logits = logits_of(net(x))
                loss = F.cross_entropy(logits, y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(x)
                if not bool(torch.isfinite(loss.detach())):
                    # the weights are still those of the last (finite) step: stop there
                    stopped = "the unlearning loss overflowed; the ascent stopped at the last finite state"
                    break
                optimizer.zero_grad(set_to_none=True)
                (-loss).backward()
                if o.unlearn_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_norm=o.unlearn_clip)
                optimizer.step()
                total_loss += float(loss.detach())
                steps += 1
            schedule.step()
            bar.advance(task)
            accs.append(correct / max(seen, 1))
            losses.append(total_loss / max(steps, 1))
            if accs[-1] <= o.clean_threshold:
                reached = True
            if reached or stopped:
                break
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    for p in params:
        check_finite(p.detach(), "the unlearned model's weights")
    info = {"epochs": len(accs), "reached_threshold": reached, "clean_acc": accs, "loss": losses,
            "stopped": stopped}
    return net.eval(), info


def recover_masks(unlearned: nn.Module, units: Units, data: CleanData, o: Options,
                  gen: torch.Generator, progress: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """Step 2: per-unit masks (flat ``(units.total,)`` CPU tensor in [0, 1]; LOW = backdoor
    suspect) that recover the clean accuracy of ``unlearned``: SGD on ``o.alpha * CE``. The
    info dict's ``mask_mean`` is each mask averaged over the steps (a tensor)."""
    accs, losses, steps_total = [], [], 0
    with NeuronMasks(unlearned, units) as nm, model_mode(unlearned, train=True), \
            progress_bar(enabled=progress) as bar:
        optimizer = torch.optim.SGD([nm.mask], lr=o.recover_lr, momentum=o.recover_momentum)
        task = bar.add_task("RNP: recovering masks", total=o.recover_epochs)
        mask_sum = torch.zeros_like(nm.mask.detach())
        for _ in range(o.recover_epochs):
            correct, seen, total_loss, steps = 0, 0, 0.0, 0
            for x, y in _epoch(data, o.batch_size, gen):
                logits = logits_of(unlearned(x))
                loss = o.alpha * F.cross_entropy(logits, y)
                check_finite(loss.detach(), "RNP's mask-recovering loss")
                (grad,) = torch.autograd.grad(loss, [nm.mask], allow_unused=True)
                nm.mask.grad = grad if grad is not None else torch.zeros_like(nm.mask)
                optimizer.step()
                with torch.no_grad():
                    nm.mask.clamp_(0.0, 1.0)
                check_finite(nm.mask.detach(), "RNP's neuron masks")
                mask_sum += nm.mask.detach()
                steps_total += 1
                correct += int((logits.argmax(1) == y).sum())
                seen += len(x)
                total_loss += float(loss.detach())
                steps += 1
            accs.append(correct / max(seen, 1))
            losses.append(total_loss / max(steps, 1))
            bar.advance(task)
        scores = nm.mask.detach().cpu().clone()
        mask_mean = (mask_sum / max(steps_total, 1)).cpu()
    # mask_mean (the masks averaged over every step) is the tie-break of the pruning order
    return scores, {"epochs": o.recover_epochs, "clean_acc": accs, "loss": losses,
                    "mask_mean": mask_mean}
