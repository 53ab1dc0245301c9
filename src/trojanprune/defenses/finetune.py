"""Fine-tuning on the defender's clean images: the FT baseline, FP's last stage, and a helper any
defense may reuse (e.g. to recover accuracy after pruning).

:func:`finetune` trains the whole model in place with SGD (momentum, weight decay, cosine
learning-rate schedule, optional random-crop augmentation) on a :class:`CleanData`. Given a
:class:`~trojanprune.engine.ChannelMasks` installed on the same model, training runs *through*
the masks, so pruned channels stay at zero in every forward pass: they contribute nothing to the
loss and receive no gradient from it (only weight decay shrinks their weights). The masks stay
installed afterwards; make them permanent with
:func:`~trojanprune.engine.apply_masks_permanently` (or keep using the hooks).

Our choices (no paper fixes them for a 500-image clean set): the cosine schedule and the
per-batch tensor augmentation of :mod:`trojanprune.training`; by default BatchNorm layers run in
training mode, so their running statistics adapt to the clean set, as in BackdoorBench's
fine-tuning. ``batchnorm="keep"`` runs them in eval mode instead (weights and affine parameters
still train; the running statistics stay as they were): a pruning repair can rest on the
statistics it was chosen under (BENCHMARKS.md, "Stop 36"), which a re-estimate undoes.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import ChannelMasks
from ..engine.batchnorm import batchnorms
from ..errors import ConfigError, DataError
from ..progress import progress_bar
from ..training import AUGMENTATIONS, augment_batch
from ..utils import derive_seed
from .base import CleanData, check_finite

#: finetune's ``batchnorm`` values
BATCHNORM_MODES = ("update", "keep")


def finetune(model: nn.Module, clean: CleanData, epochs: int, lr: float, batch_size: int,
             seed: int, masks: ChannelMasks | None = None, weight_decay: float = 5e-4,
             momentum: float = 0.9, progress: bool = False, augment: str = "none",
             crop_padding: int = 4, batchnorm: str = "update") -> dict:
    """Fine-tune ``model`` in place on ``clean``; return statistics (JSON-able).

    Args:
        model: trained in place (all parameters; their ``requires_grad`` flags and the model's
            train/eval flags are restored afterwards, the model is left in eval mode).
        clean: the images and labels to train on (already on the model's device).
        epochs: passes over ``clean``; 0 returns at once.
        lr: initial learning rate of SGD, annealed to 0 with a cosine schedule.
        batch_size: images per step; a last batch of a single image is skipped (BatchNorm
            cannot train on one image).
        seed: seeds the batch order and the augmentation (independently of other streams).
        masks: optional :class:`ChannelMasks` installed on ``model``; masked channels stay at
            zero during training. Masks must be single (no mask batch).
        weight_decay, momentum: SGD's.
        progress: show a progress bar.
        augment: ``"none"``, ``"crop"`` (random crop after zero padding of ``crop_padding``
            pixels) or ``"crop+flip"``, as in :func:`trojanprune.training.augment_batch`.
        batchnorm: ``"update"`` (BatchNorm in training mode: batch statistics, running
            statistics re-estimated) or ``"keep"`` (BatchNorm in eval mode: the running
            statistics normalize and stay unchanged).

    Raises :class:`~trojanprune.errors.DataError` when the loss becomes NaN or infinite; the
    caller's input model is untouched (defenses work on a copy).
    """
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"fine-tuning needs epochs >= 0, batch_size >= 1 and lr > 0; got "
                          f"epochs={epochs}, batch_size={batch_size}, lr={lr}")
    if weight_decay < 0 or not 0 <= momentum < 1:
        raise ConfigError(f"fine-tuning needs weight_decay >= 0 and momentum in [0, 1); got "
                          f"{weight_decay}, {momentum}")
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if batchnorm not in BATCHNORM_MODES:
        raise ConfigError(f"batchnorm must be one of {', '.join(BATCHNORM_MODES)}; got {batchnorm!r}")
    if masks is not None:
        _check_masks(model, masks)
    n = len(clean)
    stats = {"epochs": int(epochs), "steps": 0, "images": 0, "lr": lr, "batch_size": batch_size,
             "augment": augment, "batchnorm": batchnorm, "final_loss": None, "final_train_acc": None,
             "seconds": 0.0}
    if epochs == 0:
        return stats
    if n < 2:
        raise DataError(f"fine-tuning needs at least 2 clean images, got {n}")

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(derive_seed(seed, "finetune"))
    params = list(model.parameters())
    grad_flags = [p.requires_grad for p in params]
    mode_flags = {m: m.training for m in model.modules()}
    steps_per_epoch = math.ceil(n / batch_size)
    try:
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
        model.train()
        if batchnorm == "keep":
            for m in batchnorms(model).values():
                m.eval()
        with torch.enable_grad(), progress_bar(enabled=progress) as bar:
            task = bar.add_task("fine-tuning", total=epochs * steps_per_epoch)
            for epoch in range(epochs):
                order = torch.randperm(n, generator=generator).to(clean.x.device)
                loss_sum = correct = seen = 0.0
                for step in range(steps_per_epoch):
                    idx = order[step * batch_size:(step + 1) * batch_size]
                    if idx.numel() < 2:
                        bar.advance(task)
                        continue
                    x = augment_batch(clean.x[idx], augment, crop_padding, generator)
                    y = clean.y[idx]
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    check_finite(loss.detach(), f"the fine-tuning loss (epoch {epoch + 1}, lr {lr})")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    stats["steps"] += 1
                    loss_sum += loss.item() * idx.numel()
                    correct += (logits.argmax(1) == y).sum().item()
                    seen += idx.numel()
                    bar.update(task, advance=1, description=f"fine-tuning {epoch + 1}/{epochs} "
                               f"loss {loss.item():.3f}")
                stats["images"] += int(seen)
                if seen:
                    stats["final_loss"] = loss_sum / seen
                    stats["final_train_acc"] = correct / seen
        for p in params:
            check_finite(p.detach(), "the fine-tuned weights")
    finally:
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
            p.grad = None
        for m, flag in mode_flags.items():
            m.training = flag
        model.eval()
    stats["seconds"] = time.perf_counter() - start
    return stats


def _check_masks(model: nn.Module, masks: ChannelMasks) -> None:
    if not isinstance(masks, ChannelMasks):
        raise ConfigError(f"masks must be a ChannelMasks installed on the model, not "
                          f"{type(masks).__name__}")
    if masks.model is not model or not masks.active:
        raise ConfigError("masks must be a ChannelMasks installed (not yet removed) on the model "
                          "being fine-tuned")
    for name, mask in masks.masks.items():
        if mask.dim() == 2 and mask.shape[0] != 1:
            raise ConfigError(f"fine-tuning takes one mask per group; group {name!r} has a batch "
                              f"of {mask.shape[0]} masks")


__all__ = ["finetune"]


def check_finetune_options(o) -> None:
    """Validate the fine-tuning fields (lr, batch_size, weight_decay, momentum, augment,
    batchnorm) that every fine-tuning defense's Options share."""
    if not o.lr > 0 or o.batch_size < 1:
        raise ConfigError(f"lr must be > 0 and batch_size >= 1; got lr={o.lr}, "
                          f"batch_size={o.batch_size}")
    if o.weight_decay < 0 or not 0 <= o.momentum < 1:
        raise ConfigError(f"weight_decay must be >= 0 and momentum in [0, 1); got "
                          f"{o.weight_decay}, {o.momentum}")
    if o.augment not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}; got {o.augment!r}")
    if o.batchnorm not in BATCHNORM_MODES:
        raise ConfigError(f"batchnorm must be one of {', '.join(BATCHNORM_MODES)}; got {o.batchnorm!r}")
