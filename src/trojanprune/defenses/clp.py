"""CLP: Channel Lipschitzness-based Pruning (Zheng, Zhang, Wagner, Goldblum, Jiang, "Data-free
Backdoor Removal based on Channel Lipschitzness", ECCV 2022). Data-free.

A backdoor makes some channels react very strongly to a small input change (the trigger): their
Lipschitz constant is large. CLP bounds each channel's Lipschitz constant from the weights alone
and prunes the outliers of each layer:

- UCLC_k (upper bound of the channel Lipschitz constant) = the spectral norm (largest singular
  value) of channel k's kernel reshaped to (C_in, kh*kw), after folding in the BatchNorm that
  follows the conv: |gamma_k| / sqrt(running_var_k + eps) * W_k (the reference code uses the
  absolute BN scale, as here, and omits eps, which is negligible);
- within each layer, channels with UCLC > mean + u * std (sample standard deviation, as
  ``torch.std`` in the reference code) are pruned; u = 3 is the paper's default for CIFAR-10.

Generic choices (ours; the reference code walks a ResNet's modules in definition order):
- "conv followed by BatchNorm" is found by tracing one forward pass: a BatchNorm whose input
  tensor is a conv's output is folded into that conv. A conv not directly followed by a
  BatchNorm (e.g. a pre-activation block's second conv, whose output is added to the skip
  path) is scored with its kernel alone (the reference code scores only convs followed by BN).
- Channels are pruned per engine unit group. In a residual group several convs write the same
  channels; UCLC and the mean + u * std threshold are computed per producing conv (its own
  layer statistics), and the group channel is pruned if ANY producer flags it.
- Depthwise and grouped convs use each channel's (C_in / groups, kh*kw) kernel; with
  ``include_linear`` hidden linear layers are scored too (a neuron's weight row, spectral norm
  = its L2 norm; a following BatchNorm1d is folded the same way). The paper scores convs only;
  a model without any conv layer (an MLP, a ViT-style all-linear network) has its hidden
  linear neurons scored whatever ``include_linear`` says (``details["linear_because_no_conv"]``),
  rather than nothing to prune.
- The engine needs an example input to find the unit groups. Without clean data the input shape
  is probed: the first conv's input channels and the first of 32, 28, 64, 224, 96, 128, 256, 16
  pixels the model runs on; set ``input_shape`` ("C,H,W") to skip probing. Given clean data,
  only its shape is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine import apply_masks_permanently, discover_units
from ..engine.inputs import first_conv, parse_input_shape, probe_input
from ..errors import ConfigError
from . import register
from .base import CleanData, Defense, RepairResult

_CONV = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class Options:
    """CLP options.

    u: prune channels whose UCLC exceeds mean + u * std of their layer (3.0, the paper's
        default for CIFAR-10; smaller prunes more).
    include_linear: also score hidden linear layers' neurons (False; the paper prunes convs).
    input_shape: "C,H,W" of the model's input, only used to trace the model when no clean data
        is given ("" = probe it).
    """

    u: float = 3.0
    include_linear: bool = False
    input_shape: str = ""

    def __post_init__(self):
        if not isinstance(self.u, (int, float)) or self.u != self.u:
            raise ConfigError(f"u must be a number, got {self.u!r}")
        if self.input_shape:
            parse_input_shape(self.input_shape)


@register
class ChannelLipschitzPruning(Defense):
    name = "clp"
    Options = Options
    needs_data = False
    min_images = 1
    summary = "CLP (data-free): prune channels with an outlying channel Lipschitz bound"

    def run(self, model: nn.Module, clean: CleanData | None) -> RepairResult:
        o = self.options
        example, shape_source = example_input(model, clean, o.input_shape, self.device)
        no_conv = first_conv(model) is None
        units = discover_units(model, example, include_linear=o.include_linear or no_conv)
        norms = following_norms(model, example)

        pruned: list[tuple[str, int]] = []
        per_group = {}
        for group in units:
            flagged = torch.zeros(group.size, dtype=torch.bool)
            layers = {}
            for producer in group.producers:
                module = model.get_submodule(producer)
                norm = model.get_submodule(norms[producer]) if producer in norms else None
                uclc = channel_lipschitz_bound(module, norm)
                if uclc is None:
                    continue
                channels = torch.tensor(group.channels_at(producer))
                values = uclc[channels]  # in group channel order
                if values.numel() > 1:
                    threshold = (values.mean() + o.u * values.std()).item()
                    hits = values > threshold
                else:  # one channel: no spread, no outlier
                    threshold, hits = None, torch.zeros(1, dtype=torch.bool)
                flagged |= hits
                layers[producer] = {"bn": norms.get(producer), "threshold": threshold,
                                    "uclc": values.tolist(),
                                    "flagged": torch.nonzero(hits).flatten().tolist()}
            chans = torch.nonzero(flagged).flatten().tolist()
            pruned += [(group.name, int(c)) for c in chans]
            per_group[group.name] = {"residual": group.residual, "pruned": chans, "layers": layers}

        repaired = apply_masks_permanently(model, units, pruned)
        details = {"u": o.u, "input_shape": list(example.shape[1:]), "input_shape_from": shape_source,
                   "data_used": False, "linear_because_no_conv": no_conv and not o.include_linear,
                   "groups": per_group}
        return RepairResult(model=repaired, method=self.name, pruned=pruned, evaluations=0,
                            details=details, total_units=units.total)


@torch.no_grad()
def channel_lipschitz_bound(module: nn.Module, norm: nn.Module | None = None) -> torch.Tensor | None:
    """(out_channels,) UCLC of ``module``'s output channels, or None for unsupported modules.

    ``norm``: the BatchNorm that directly follows ``module``; its per-channel scale
    |gamma| / sqrt(running_var + eps) is folded into the kernels.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    w = weight.detach().float()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            return None
        w = w.transpose(0, 1)  # stored (in, out, ...)
    if isinstance(module, _CONV):
        kernels = w.reshape(w.shape[0], w.shape[1], -1)  # (out, in/groups, kh*kw)
    elif isinstance(module, nn.Linear):
        kernels = w.reshape(w.shape[0], -1, 1)  # (out, in, 1): spectral norm = L2 norm
    else:
        return None
    uclc = torch.linalg.matrix_norm(kernels, ord=2)
    if norm is not None:
        gamma = (norm.weight.detach().float().abs() if norm.weight is not None
                 else torch.ones_like(uclc))
        uclc = uclc * gamma / torch.sqrt(norm.running_var.detach().float() + norm.eps)
    return uclc.cpu()


@torch.no_grad()
def following_norms(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """{conv/linear name: name of the BatchNorm that reads its output directly}, from one
    traced forward pass. Only foldable pairs are kept: the BatchNorm has running statistics
    (used at inference) and one entry per output channel."""
    names = {m: n for n, m in reversed(list(model.named_modules()))}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output tensor) -> (producer, tensor)
    pairs: dict[str, str] = {}

    def producer_hook(module, args, out):
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (names[module], out)  # the tensor is kept alive: ids stay unique

    def norm_hook(module, args):
        x = args[0] if args else None
        hit = produced.get(id(x)) if isinstance(x, torch.Tensor) else None
        if hit is not None and hit[1] is x:
            pairs.setdefault(hit[0], names[module])

    handles = []
    flags = {m: m.training for m in model.modules()}
    try:
        for module in model.modules():
            if isinstance(module, (_CONV, nn.Linear)):
                handles.append(module.register_forward_hook(producer_hook))
            elif isinstance(module, _BN):
                handles.append(module.register_forward_pre_hook(norm_hook))
        model.eval()
        model(example)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    foldable = {}
    for producer, norm in pairs.items():
        bn = model.get_submodule(norm)
        if bn.running_var is not None and bn.num_features == _out_channels(model.get_submodule(producer)):
            foldable[producer] = norm
    return foldable


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


def example_input(model: nn.Module, clean: CleanData | None, input_shape: str,
                  device: torch.device) -> tuple[torch.Tensor, str]:
    """One input image to trace ``model`` with: from the clean data, ``input_shape``, or probed."""
    if clean is not None and len(clean):
        return clean.x[:1], "clean data"
    if not input_shape and first_conv(model) is None:
        raise ConfigError("this model has no conv layer to read its input channels from, so "
                          "data-free CLP cannot probe its input shape; set input_shape "
                          "(e.g. --set input_shape=1,28,28)")
    return probe_input(model, input_shape, device, "data-free CLP")
