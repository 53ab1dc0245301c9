"""BatchNorm running statistics after a pruning.

Pruning a channel changes what every later layer receives, but the later BatchNorm layers go
on normalizing with the running statistics of the unpruned model's training run. Part of what
a pruning does, to clean accuracy and to the backdoor alike, is this mismatch (BENCHMARKS.md,
"Stop 36"). :func:`pruning_shift` gives the statistics moved by what the pruning changes on
clean images: each layer's running mean plus the change in its clean-image mean, its running
variance times the ratio of its clean-image variances. A plain re-estimate on the clean images
would replace statistics that the training run estimated on its own (for a backdoored model,
poisoned) data, which on the CIFAR-10 zoo alone costs 4-9 points of accuracy.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..utils import copy_model
from .masks import apply_masks_permanently
from .units import Pruned, Units

Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]  # BatchNorm name -> (mean, var)


def batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics, by name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
            and m.running_var is not None}


def clean_statistics(model: nn.Module, images: torch.Tensor, batch_size: int = 128,
                     layers: set[str] | None = None) -> Statistics:
    """Each BatchNorm layer's mean and (unbiased) variance on ``images``, averaged over
    batches as BatchNorm's own cumulative average does; ``model`` is not touched. ``layers``:
    only these (the others normalize with their running statistics meanwhile); None = all."""
    work = copy_model(model).eval()
    norms = {n: m for n, m in batchnorms(work).items() if layers is None or n in layers}
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    device = next((t.device for t in work.buffers()), images.device)
    with torch.no_grad():
        for b in range(0, len(images), batch_size):
            work(images[b:b + batch_size].to(device))
    return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in norms.items()}


def pruning_shift(model: nn.Module, units: Units, pruned: Pruned, images: torch.Tensor,
                  eps: float = 1e-8, batch_size: int = 128) -> Statistics:
    """Each BatchNorm layer's running statistics moved by what pruning ``pruned`` changes in its
    statistics on ``images`` (mean difference, variance ratio). Channels whose variance is
    (near) zero on either model keep their statistics: they are pruned or dead, and a ratio of
    them means nothing."""
    before = clean_statistics(model, images, batch_size)
    after = clean_statistics(apply_masks_permanently(model, units, pruned), images, batch_size)
    shifted = {}
    for name, m in batchnorms(model).items():
        (mean0, var0), (mean1, var1) = before[name], after[name]
        live = (var0 > eps) & (var1 > eps)
        mean = torch.where(live, m.running_mean + (mean1 - mean0), m.running_mean)
        var = torch.where(live, m.running_var * var1 / var0.clamp_min(eps), m.running_var)
        shifted[name] = (mean, var)
    return shifted


def load_statistics(model: nn.Module, statistics: Statistics) -> None:
    """Write ``statistics`` into the model's BatchNorm layers, in place."""
    norms = batchnorms(model)
    with torch.no_grad():
        for n, (mean, var) in statistics.items():
            norms[n].running_mean.copy_(mean)
            norms[n].running_var.copy_(var)


@contextlib.contextmanager
def statistics_swapped(model: nn.Module, statistics: Statistics):
    """Run with ``statistics`` in the model's BatchNorm layers, in place; restored on exit.
    (Evaluators notice the change: their cached activations are keyed on the buffers'
    versions.)"""
    norms = batchnorms(model)
    saved = {n: (norms[n].running_mean.clone(), norms[n].running_var.clone()) for n in statistics}
    try:
        load_statistics(model, statistics)
        yield model
    finally:
        load_statistics(model, saved)
