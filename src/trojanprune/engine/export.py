"""Physical pruning: a smaller model with the pruned channels removed.

Masks are what searches use; a deployed repaired model should also be smaller and faster.
Removal goes through Torch-Pruning's dependency groups, so a channel of a residual stream is
taken out of every conv, BatchNorm and consumer that shares it, and the result computes what
the masked model computes (up to float rounding).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import TrojanPruneError
from ..utils import copy_model
from .units import Pruned, Units, _example


def export_pruned(model: nn.Module, units: Units, pruned: Pruned, example_input: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` with the ``pruned`` channels physically removed.

    ``units`` must come from :func:`discover_units` on this model (or one with the same
    structure); ``example_input`` is a batch shaped like the model's input, used to trace the
    copy. ``model`` is not modified. Removing every channel of a group is refused: the layer
    would vanish and the network could no longer be built; zero it with
    :func:`apply_masks_permanently` instead.
    """
    import torch_pruning as tp

    chosen = units.pruned_channels(pruned)
    for name, chans in chosen.items():
        g = units[name]
        if len(chans) >= g.size:
            raise TrojanPruneError(
                f"cannot remove all {g.size} channels of unit group {name!r}: the layer would "
                "disappear. Keep at least one channel, or use apply_masks_permanently to zero them.")

    new = copy_model(model)
    flags = {n: m.training for n, m in new.named_modules()}
    if not chosen:
        return new
    x = _example(new, example_input)
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(new, example_inputs=(x.requires_grad_(True),),
                                                       verbose=False)
        # Each group's indices are channels of its own root, which pruning another group
        # does not renumber; Torch-Pruning re-maps concatenation offsets itself.
        for name, chans in chosen.items():
            root = new.get_submodule(units[name].root)
            pruner = dg.get_pruner_of_module(root)
            dg.get_pruning_group(root, pruner.prune_out_channels, chans).prune()
    except TrojanPruneError:
        raise
    except Exception as exc:
        raise TrojanPruneError(f"could not remove the pruned channels from {type(model).__name__} "
                               f"({type(exc).__name__}: {exc})") from exc
    finally:
        for n, m in new.named_modules():
            m.training = flags.get(n, m.training)
    return new
