"""The pruning engine shared by every defense (FP, ANP, RNP, CLP, ShapPruning, ONP).

- :func:`discover_units`: find prunable channel groups of any model (residual-coupled channels
  form one group), as a :class:`Units` index of flat unit numbers.
- :class:`ChannelMasks`: reversible (soft, differentiable, batchable) masks via forward hooks.
- :func:`apply_masks_permanently`: same structure, pruned channels zeroed in the weights.
- :func:`export_pruned`: a smaller model with the pruned channels physically removed.
- :class:`MaskEvaluator`: many masks on a fixed image set, batched and with prefix reuse.
- :mod:`~trojanprune.engine.batchnorm`: BatchNorm running statistics moved by what a pruning
  changed on clean images (a diagnosis: how much of a repair rests on stale statistics).
- :func:`~trojanprune.engine.layout.channels_last_copy`: a faster (channels-last, CPU) copy of a
  model that computes the same function, for the passes of the reverses and the evaluator.

Typical search::

    units = discover_units(model, images[:1]).select("last:2", kind="conv")
    ev = MaskEvaluator(model, units, images, labels, budget=20_000)
    scores = ev.margin(candidate_masks, target=0)        # (M,)
    pruned = units.pruned_list(best_mask)                # [(group, channel), ...]
    repaired = apply_masks_permanently(model, units, pruned)
"""

from .evaluate import (EvaluationBudgetExceeded, MaskEvaluator, sharing_agreeing_masks, soft_accuracy,
                       target_margin, top1_accuracy)
from .export import export_pruned
from .masks import ChannelMasks, apply_masks_permanently, as_group_masks, scale_channels
from .units import UnitGroup, Units, channel_dim, discover_units

__all__ = [
    "ChannelMasks", "EvaluationBudgetExceeded", "MaskEvaluator", "UnitGroup", "Units",
    "apply_masks_permanently", "as_group_masks", "channel_dim", "discover_units", "export_pruned",
    "scale_channels", "sharing_agreeing_masks", "soft_accuracy", "target_margin", "top1_accuracy",
]
