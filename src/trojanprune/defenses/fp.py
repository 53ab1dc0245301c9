"""FP: Fine-Pruning (Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID 2018).

The paper's observation: a backdoor lives in neurons that clean inputs leave dormant. So:
1. run the clean images through the model and record the mean activation of every channel of the
   LAST convolutional layer;
2. prune those channels in increasing order of mean activation (dormant first), one at a time,
   and stop once the clean validation accuracy has fallen by more than a tolerance (the paper
   stops at a 4-point drop);
3. fine-tune the pruned network on the clean images.

How it is done here, generically (any model the engine supports):
- "last convolutional layer" = the unit group written by the conv that runs last in a forward
  pass (:func:`last_conv_group`); for a residual network that is the last stage's residual
  stream (all of whose convs share the channels), the layer that feeds the classifier. A model
  without conv layers (an MLP) has its last hidden linear layer pruned instead, the same rule
  one layer type down (ours; the paper's networks all have convs).
- "activation" (ours): what the rest of the network reads of the channel. We hook the INPUT of
  the group's last consumer (the conv/linear that reads the channels last, e.g. the classifier
  after global pooling), which carries the channel after BatchNorm, ReLU, pooling and any skip
  addition, and average it over images and positions (a flattened (C*H*W) input is viewed as
  (C, H*W)). When that input also carries other channels (e.g. after a concatenation; checked by
  zeroing the group's channels and seeing which nonzero input entries stay) we fall back to the mean of the positive part of the group's hook-point outputs
  (the channel after its normalization, with ReLU assumed). ``details["activation_source"]``
  says which was used.
- The stopping rule is decided on a held-out part of the clean set (``holdout``, default 20%,
  class-stratified, seeded), never on test data: k = 1, 2, ... channels are pruned (all these
  masks are evaluated in batches by :class:`MaskEvaluator`); the first k whose held-out accuracy
  is more than ``acc_drop`` below the unpruned model's stops the search and k - 1 is kept, or the
  search ends at ``max_ratio`` of the layer's channels. Activations are measured on the other
  80%; fine-tuning uses all clean images (the choice is already made).
- Fine-tuning runs through the masks (pruned channels stay zero), then the masks are applied
  permanently. Its defaults are ours, as FT's (SGD lr 0.01, momentum 0.9, weight decay 5e-4,
  cosine schedule, batch 64, random crop), for 10 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine import (ChannelMasks, MaskEvaluator, UnitGroup, Units, apply_masks_permanently,
                      discover_units)
from ..errors import ConfigError, TrojanPruneError
from ..progress import progress_bar
from ..utils import derive_seed
from . import register
from .base import CleanData, Defense, RepairResult
from .finetune import check_finetune_options, finetune


@dataclass
class Options:
    """Fine-Pruning options.

    acc_drop: stop pruning when the held-out clean accuracy falls by more than this, as a
        FRACTION of images (0.04 = 4 percentage points: the paper's 4% stopping point).
    max_ratio: prune at most this fraction of the last conv layer's channels (0.8; ours, a cap
        so that a flat accuracy curve on a tiny held-out set cannot empty the layer).
    holdout: fraction of the clean images held out (class-stratified) to judge accuracy (0.2;
        ours). With too few images to hold any out, the whole clean set is used and
        ``details["holdout_fallback"]`` says so.
    finetune_epochs: fine-tuning epochs after pruning (10; ours; 0 = prune only).
    lr, momentum, weight_decay, batch_size, augment, batchnorm: fine-tuning settings, as FT's
        (0.01, 0.9, 5e-4, 64, "crop", "update").
    """

    acc_drop: float = 0.04
    max_ratio: float = 0.8
    holdout: float = 0.2
    finetune_epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    augment: str = "crop"
    batchnorm: str = "update"

    def __post_init__(self):
        if not 0 <= self.acc_drop <= 1:
            raise ConfigError(f"acc_drop is a fraction in [0, 1] (0.04 = 4 points), got {self.acc_drop}")
        if not 0 < self.max_ratio <= 1:
            raise ConfigError(f"max_ratio must be in (0, 1], got {self.max_ratio}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        check_finetune_options(self)


# Masks (pruning depths k) evaluated per MaskEvaluator call; the search stops at the first chunk
# that contains the stopping point, so most of a long curve is never computed.
_CHUNK = 32


@register
class FinePruning(Defense):
    name = "fp"
    Options = Options
    needs_data = True
    min_images = 10
    summary = "Fine-Pruning: prune last-conv channels dormant on clean data, then fine-tune"

    def run(self, model: nn.Module, clean: CleanData | None) -> RepairResult:
        o = self.options
        all_units = discover_units(model, clean.x[:1])
        kind = "conv" if any(g.kind == "conv" for g in all_units) else "linear"
        all_units = all_units.select("all", kind=kind)
        group = last_conv_group(model, all_units, clean.x[:1], kind=kind)
        units = all_units.select([group.name])

        fit, held = clean.split(o.holdout, seed=derive_seed(self.seed, "fp-holdout"))
        fallback = len(held) == 0 or len(fit) == 0
        if fallback:
            fit = held = clean

        activation, source = mean_channel_activation(model, group, fit.x)
        order = torch.argsort(activation.cpu(), stable=True)

        k_max = min(int(o.max_ratio * group.size + 1e-9), group.size - 1)
        evaluator = MaskEvaluator(model, units, held.x, held.y)
        ks, accs, k_chosen, reason = [], [], k_max, "max_ratio"
        base = None
        with progress_bar(enabled=self.progress) as bar:
            task = bar.add_task("fine-pruning: pruning curve", total=k_max + 1)
            for lo in range(0, k_max + 1, _CHUNK):
                chunk = list(range(lo, min(lo + _CHUNK, k_max + 1)))
                masks = torch.ones(len(chunk), group.size)
                for row, k in enumerate(chunk):
                    masks[row, order[:k]] = 0
                # Compare counts of correct images, not float32 fractions, so that a drop of
                # exactly acc_drop is within the tolerance.
                correct = (evaluator.accuracy({group.name: masks}) * len(held)).round().long()
                bar.advance(task, len(chunk))
                if base is None:
                    base = int(correct[0])
                stop = None
                for k, n_ok in zip(chunk, correct.tolist()):
                    ks.append(k)
                    accs.append(n_ok / len(held))
                    if base - n_ok > o.acc_drop * len(held) + 1e-6:
                        stop = k
                        break
                if stop is not None:
                    k_chosen, reason = stop - 1, "acc_drop"
                    break

        pruned = [(group.name, int(c)) for c in order[:k_chosen].tolist()]
        stats = None
        if o.finetune_epochs > 0:
            keep = torch.ones(group.size, device=clean.x.device)
            keep[order[:k_chosen].to(keep.device)] = 0
            with ChannelMasks(model, units, {group.name: keep}) as cm:
                stats = finetune(model, clean, epochs=o.finetune_epochs, lr=o.lr,
                                 batch_size=o.batch_size, seed=self.seed, masks=cm,
                                 weight_decay=o.weight_decay, momentum=o.momentum,
                                 progress=self.progress, augment=o.augment,
                                 batchnorm=o.batchnorm)
        repaired = apply_masks_permanently(model, units, pruned)
        details = {
            "layer": group.name, "layer_kind": kind, "layer_channels": group.size,
            "activation_source": source,
            "mean_activation": activation.cpu().tolist(),
            "prune_order": order.tolist(),
            "baseline_heldout_acc": base / len(held),
            "curve": {"k": ks, "heldout_acc": accs},
            "chosen_k": k_chosen, "k_max": k_max,
            "reason": (f"pruning {k_chosen + 1} channels took the held-out accuracy from "
                       f"{base / len(held):.3f} to {accs[-1]:.3f}, a drop of more than acc_drop="
                       f"{o.acc_drop}; kept {k_chosen}"
                       if reason == "acc_drop" else
                       f"reached max_ratio={o.max_ratio} ({k_max} channels) within the accuracy "
                       f"tolerance"),
            "stopped_by": reason,
            "holdout_images": len(held), "activation_images": len(fit),
            "holdout_fallback": fallback,
            "finetune": stats,
        }
        evaluations = 1 + evaluator.evaluations + o.finetune_epochs
        return RepairResult(model=repaired, method=self.name, pruned=pruned,
                            evaluations=evaluations, details=details, total_units=all_units.total)


@torch.no_grad()
def last_conv_group(model: nn.Module, units: Units, example: torch.Tensor,
                    kind: str = "conv") -> UnitGroup:
    """The unit group written by the conv that runs last: the last convolutional layer
    (``kind="linear"``: the last hidden linear layer).

    Not ``units.select("last:1")``, which orders groups by their root (first producer): in a
    ResNet the last stage's residual stream has its root early in the stage, so "last:1" would
    be the last block's inner conv, while the layer that feeds the classifier is the stream.
    """
    convs = {p for g in units if g.kind == kind for p in g.producers}
    order: dict[str, int] = {}
    handles = []
    flags = {m: m.training for m in model.modules()}
    try:
        for name in convs:
            def hook(module, args, _name=name):
                order[_name] = len(order)  # the last call counts (modules may be reused)
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        model.eval()
        model(example)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    candidates = [g for g in units if g.kind == kind and any(p in order for p in g.producers)]
    if not candidates:
        raise TrojanPruneError(f"{type(model).__name__} has no prunable {kind} layer; Fine-Pruning "
                               f"prunes the channels of the last {kind} layer")
    return max(candidates, key=lambda g: max(order.get(p, -1) for p in g.producers))


@torch.no_grad()
def mean_channel_activation(model: nn.Module, group: UnitGroup, images: torch.Tensor,
                            batch_size: int = 256) -> tuple[torch.Tensor, str]:
    """(group.size,) mean activation of each channel of ``group`` on ``images``, and its source.

    Measured at the input of the group's last consumer (what the network reads of the channel,
    after normalization, activation, pooling and skip additions); when that input does not map
    one-to-one onto the group's channels, the mean positive part of the hook-point outputs.
    """
    size = group.size
    if group.consumers:
        consumer = group.consumers[-1]
        linear = isinstance(model.get_submodule(consumer), nn.Linear)

        def consumer_input(module, args, out):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None or x.dim() < 2:
                return None
            if linear:  # (..., F): F = size, or size * positions after a channel-major flatten
                if x.shape[-1] % size:
                    return None
                return x.reshape(-1, size, x.shape[-1] // size).mean((0, 2))
            if x.shape[1] != size:
                return None
            return x.transpose(0, 1).reshape(size, -1).mean(1)

        if _reads_only(model, group, consumer, images[:16]):
            acts = _hooked_means(model, images, batch_size, {consumer: consumer_input})
            if acts is not None:
                return acts, f"input of {consumer}"

    def point_output(channels):
        def measure(module, args, out):
            if not isinstance(out, torch.Tensor) or out.dim() < 2:
                return None
            d = 1 if not isinstance(module, (nn.Linear, nn.LayerNorm)) else out.dim() - 1
            per = out.clamp(min=0).transpose(0, d).reshape(out.shape[d], -1).mean(1)
            return per[channels.to(per.device)]
        return measure

    points = {p: point_output(torch.tensor(group.channels_at(p))) for p in group.hook_points}
    acts = _hooked_means(model, images, batch_size, points)
    if acts is None:
        raise TrojanPruneError(f"cannot measure the activations of unit group {group.name!r}")
    return acts, "positive part of the outputs of " + ", ".join(group.hook_points)


def _reads_only(model: nn.Module, group: UnitGroup, consumer: str, images: torch.Tensor) -> bool:
    """False when ``consumer``'s input also carries other channels (e.g. after a concatenation).

    Zeroing the group's channels at its hook points (removing them) changes every nonzero input
    entry that comes from them; a nonzero entry that stays the same comes from elsewhere.
    """
    captured = []
    handle = model.get_submodule(consumer).register_forward_hook(
        lambda mod, args, out: captured.append(args[0].detach().clone()))
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(images)
        with ChannelMasks(model, Units([group]), {group.name: torch.zeros(group.size)}):
            model(images)
    finally:
        handle.remove()
        for m, flag in flags.items():
            m.training = flag
    plain, removed = captured[0], captured[-1]
    if len(captured) != 2 or plain.shape != removed.shape:
        return False
    same = torch.isclose(plain, removed, rtol=1e-4, atol=1e-6) & (plain.abs() > 1e-6)
    return not bool(same.any())


def _hooked_means(model: nn.Module, images: torch.Tensor, batch_size: int, measures: dict):
    """Average over ``images`` (and over the modules) of ``measures[name](module, args, out)``,
    or None when any measure returns None (its tensor does not map onto the channels)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    failed = []

    def make(name, fn):
        def hook(module, args, out):
            value = fn(module, args, out)
            if value is None:
                failed.append(name)
                return
            n = len(out) if isinstance(out, torch.Tensor) else 1
            sums[name] = sums.get(name, 0) + value.float() * n
            counts[name] = counts.get(name, 0) + n
        return hook

    flags = {m: m.training for m in model.modules()}
    handles = [model.get_submodule(name).register_forward_hook(make(name, fn))
               for name, fn in measures.items()]
    try:
        model.eval()
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
            if failed:
                return None
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    if not sums:
        return None
    return torch.stack([sums[n] / counts[n] for n in sums]).mean(0)
