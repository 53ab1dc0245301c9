"""Soft channel masks: zero (or scale) units without changing the model's structure.

Every defense needs "the model with these units removed" many times over; rebuilding a smaller
network each time would be slow and irreversible. Instead a mask multiplies each unit group's
channels at the group's hook points (see :class:`~trojanprune.engine.units.UnitGroup`), which
for 0/1 masks is exactly the network with those channels removed. Masks may be fractional and
may require grad, which is how ANP and RNP learn them.

A *mask batch* evaluates M masks in one forward pass: with per-group masks of shape
(M, size) and an input batch of M*B images laid out mask-major (images of mask 0, then of
mask 1, ...), the output of a hooked module is viewed as (M, B, C, ...) and scaled by
(M, 1, C, 1, ...).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, Union

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from ..errors import ConfigError, TrojanPruneError
from ..utils import copy_model
from .units import _NORM as _NORM_TYPES, _PRODUCER as _PRODUCER_TYPES, Pruned, Units, channel_dim

MaskInput = Union[torch.Tensor, Mapping[str, torch.Tensor]]


@dataclass
class _HookSpec:
    """How the masks of the groups hooked at one module become one channel multiplier."""

    module: nn.Module
    dim: int
    # (group name, module channel carrying each group channel, whether that is 0..size-1)
    entries: list[tuple[str, torch.Tensor, bool]]

    def multiplier(self, masks: Mapping[str, torch.Tensor], channels: int) -> torch.Tensor | None:
        """(C,) or (M, C) multiplier for an output with ``channels`` channels, or None."""
        mult = None
        for group, index, in_order in self.entries:
            mask = masks.get(group)
            if mask is None:
                continue
            if in_order and mask.shape[-1] == channels:
                part = mask  # the group owns all channels, in order: the usual case
            else:  # e.g. a BatchNorm after a concatenation holds several groups' channels
                base = torch.ones(mask.shape[:-1] + (channels,), dtype=mask.dtype, device=mask.device)
                part = base.index_copy(-1, index.to(mask.device), mask)  # differentiable in ``mask``
            mult = part if mult is None else mult * part
        return mult


def scale_channels(out: torch.Tensor, mult: torch.Tensor, dim: int) -> torch.Tensor:
    """``out`` with channel dim ``dim`` multiplied by ``mult`` (C,) or, mask-major, (M, C)."""
    d = dim % out.dim()
    if d == 0:
        raise TrojanPruneError("cannot mask channels in the batch dimension")
    mult = mult.to(dtype=out.dtype)
    if mult.dim() == 1:
        shape = [1] * out.dim()
        shape[d] = -1
        return out * mult.view(shape)
    m, n = mult.shape[0], out.shape[0]
    if n % m:
        raise TrojanPruneError(f"a batch of {m} masks needs a batch of M*B inputs (mask-major); got {n} inputs")
    shape = [m, 1] + [1] * (out.dim() - 1)
    shape[d + 1] = -1
    return (out.reshape(m, n // m, *out.shape[1:]) * mult.view(shape)).reshape(out.shape)


def hook_specs(model: nn.Module, units: Units) -> dict[str, _HookSpec]:
    """Module name -> :class:`_HookSpec` for every hook point of ``units`` in ``model``."""
    specs: dict[str, _HookSpec] = {}
    for g in units:
        for point in g.hook_points:
            try:
                module = model.get_submodule(point)
            except AttributeError:
                raise ConfigError(f"unit group {g.name!r} names module {point!r}, which this model "
                                  "does not have; were the units found on a different model?") from None
            chans = g.channels_at(point)
            spec = specs.setdefault(point, _HookSpec(module, channel_dim(module), []))
            spec.entries.append((g.name, torch.tensor(chans, dtype=torch.long), chans == tuple(range(g.size))))
    return specs


def as_group_masks(units: Units, masks: MaskInput, device=None, dtype=None) -> dict[str, torch.Tensor]:
    """Per-group masks from a flat (total,)/(M, total) tensor or a {group: (size,)/(M, size)} dict.

    Tensors are kept (not copied) when device and dtype already match, so a learnable mask
    updated in place by an optimizer is seen by the hooks without calling ``set`` again.
    """
    if isinstance(masks, torch.Tensor):
        if masks.dim() not in (1, 2):
            raise ConfigError(f"masks must be (total,) or (M, total); got shape {tuple(masks.shape)}")
        out = units.split(masks)
    elif isinstance(masks, Mapping):
        out = {}
        for name, mask in masks.items():
            g = units[name]
            if not isinstance(mask, torch.Tensor):
                mask = torch.as_tensor(mask, dtype=torch.float32)
            if mask.dim() not in (1, 2) or mask.shape[-1] != g.size:
                raise ConfigError(f"mask for group {name!r} must be ({g.size},) or (M, {g.size}); "
                                  f"got {tuple(mask.shape)}")
            out[name] = mask
    else:
        raise ConfigError(f"masks must be a tensor or a dict of per-group tensors, not {type(masks).__name__}")
    if device is not None or dtype is not None:
        out = {k: v.to(device=device if device is not None else v.device,
                       dtype=dtype if dtype is not None else (v.dtype if v.is_floating_point() else torch.float32))
               for k, v in out.items()}
    return {k: (v if v.is_floating_point() else v.float()) for k, v in out.items()}


class ChannelMasks:
    """Forward hooks that multiply unit channels by masks; ``remove()`` restores the model.

    >>> with ChannelMasks(model, units, {"features.17": keep}) as cm:
    ...     logits = model(x)
    ...     cm.set(other_masks)          # swap masks without re-installing hooks
    ...     logits2 = model(x)

    Masks are per group, 1 = keep and 0 = removed; groups without a mask are untouched.
    A mask with a leading dimension M (shape (M, size)) applies mask m to images
    ``m*B ... (m+1)*B - 1`` of an M*B batch. A mask that requires grad receives gradients.
    """

    def __init__(self, model: nn.Module, units: Units, masks: MaskInput | None = None):
        self.model = model
        self.units = units
        self._masks: dict[str, torch.Tensor] = {}
        self._specs = hook_specs(model, units)
        self._handles = [spec.module.register_forward_hook(self._make_hook(spec))
                         for spec in self._specs.values()]
        if masks is not None:
            self.set(masks)

    def _make_hook(self, spec: _HookSpec):
        def hook(module, inputs, output):
            if not self._masks or not isinstance(output, torch.Tensor):
                return None
            mult = spec.multiplier(self._masks, output.shape[spec.dim])
            return None if mult is None else scale_channels(output, mult.to(output.device), spec.dim)
        return hook

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return dict(self._masks)

    def set(self, masks: MaskInput | None) -> "ChannelMasks":
        """Replace all masks (``None`` = no masking)."""
        self._masks = {} if masks is None else as_group_masks(self.units, masks)
        return self

    def update(self, masks: MaskInput) -> "ChannelMasks":
        """Set the masks of some groups, keeping the others."""
        self._masks.update(as_group_masks(self.units, masks))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._masks = {}

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "ChannelMasks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_masks_permanently(model: nn.Module, units: Units, pruned: Pruned) -> nn.Module:
    """A deep copy of ``model`` whose pruned channels are zeroed in the weights (same structure).

    At every mask point the channel's output is made exactly 0: conv/linear output rows and
    bias are zeroed; BatchNorm weight and bias are zeroed (so its output ``w*x_hat + b`` is 0
    whatever the input) and its running mean/var reset to 0/1 (so an affine-free BatchNorm
    of the now-zero input is 0 too). The copy therefore computes what the masked model
    computes, and weight-based criteria see the filters as pruned. ``model`` is untouched.
    A group with a GroupNorm or LayerNorm among its mask points is zeroed at its hook points
    only (see :func:`_hook_points_only`), so that the norm's statistics stay those of the
    masked model.

    ``pruned``: (group, channel) pairs, a dict group -> bool tensor or channels, or a flat bool
    tensor of length ``units.total``.
    """
    chosen = units.pruned_channels(pruned)
    new = copy_model(model)
    with torch.no_grad():
        for name, chans in chosen.items():
            g = units[name]
            points = _hook_points_only(new, g) or g.mask_points
            for point in points:
                module = new.get_submodule(point)
                mapping = g.channels_at(point)
                idx = torch.tensor([mapping[c] for c in chans], dtype=torch.long)
                _zero_channels(module, idx, point)
    return new


def _hook_points_only(model: nn.Module, group) -> tuple[str, ...] | None:
    """The group's hook points, where a group normalized ACROSS channels (GroupNorm, LayerNorm)
    must be zeroed; None: zero every mask point.

    Why: masks act at the hook points, so a masked channel still enters the statistics of a
    GroupNorm or LayerNorm it passes before them. Zeroing its producer as well would change
    those statistics, and with them every other channel of the norm: the repaired model would
    not compute what the defense measured (logits off by up to 0.18 on a small ConvNeXt,
    BENCHMARKS.md "Stop 22"). Zeroing the hook points alone reproduces the masked model
    exactly, provided each can output zeros by its own parameters (a conv or linear, or a norm
    with affine weight and bias); otherwise every mask point is zeroed, as for BatchNorm
    networks, whose per-channel statistics do not mix channels.
    """
    modules = [model.get_submodule(p) for p in group.mask_points]
    if not any(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in modules):
        return None
    for point in group.hook_points:
        m = model.get_submodule(point)
        if isinstance(m, _NORM_TYPES) and (getattr(m, "weight", None) is None or getattr(m, "bias", None) is None):
            return None
        if not isinstance(m, _NORM_TYPES + _PRODUCER_TYPES):
            return None
    return tuple(group.hook_points)


def _zero_channels(module: nn.Module, idx: torch.Tensor, name: str) -> None:
    idx = idx.to(next(itertools.chain(module.parameters(), module.buffers()), idx).device)
    if isinstance(module, nn.PReLU):
        return  # maps 0 to 0; its input is already zero
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise TrojanPruneError(f"cannot zero channels of grouped transposed conv {name!r}")
        _zero_param(module, "weight", idx, 1, name)  # transposed convs store (in, out, ...)
    elif isinstance(module, nn.LayerNorm):
        # LayerNorm's channels are its last normalized dim (see channel_dim).
        _zero_param(module, "weight", idx, -1, name)
        _zero_param(module, "bias", idx, -1, name)
        return
    else:
        _zero_param(module, "weight", idx, 0, name)
    _zero_param(module, "bias", idx, 0, name)
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_mean is not None:
        module.running_mean[idx] = 0
        module.running_var[idx] = 1


#: the reparametrizations whose channels :func:`_zero_param` can zero exactly ("prune": the
#: mask of ``torch.nn.utils.prune``, weight = weight_orig * weight_mask)
ZEROABLE_REPARAMETRIZATIONS = ("weight_norm", "spectral_norm", "prune")


def reparametrization(module: nn.Module, pname: str) -> str | None:
    """How ``module``'s ``pname`` is computed from other tensors: None (stored as it is),
    "weight_norm" or "spectral_norm" (``torch.nn.utils.parametrizations`` or the older
    hook-based ``torch.nn.utils`` functions), or the parametrization's class name."""
    if parametrize.is_parametrized(module, pname):
        chain = getattr(module.parametrizations, pname)
        if len(chain) != 1:
            return " + ".join(type(p).__name__ for p in chain)
        kind = type(chain[0]).__name__
        return {"_WeightNorm": "weight_norm", "_SpectralNorm": "spectral_norm"}.get(kind, kind)
    hook = _weight_hook(module, pname)
    if hook is None:
        return None
    if isinstance(hook, prune.BasePruningMethod):
        return "prune"
    return {"WeightNorm": "weight_norm", "SpectralNorm": "spectral_norm"}.get(
        type(hook).__name__, type(hook).__name__)


def _weight_hook(module: nn.Module, pname: str):
    """The forward pre-hook that computes ``module``'s ``pname`` before each forward (the older
    ``torch.nn.utils`` weight_norm and spectral_norm name it ``name``, ``torch.nn.utils.prune``
    ``_tensor_name``), or None."""
    return next((h for h in module._forward_pre_hooks.values()
                 if pname in (getattr(h, "name", None), getattr(h, "_tensor_name", None))), None)


def _zero_param(module: nn.Module, pname: str, idx: torch.Tensor, dim: int, name: str) -> None:
    """Zero the entries ``idx`` along ``dim`` of ``module``'s parameter ``pname`` where they are
    stored.

    Why not just write into ``module.weight``: a weight computed from other tensors is not
    stored there. Under ``torch.nn.utils.parametrizations`` writing into it changes a temporary,
    and under the older hook-based ``weight_norm`` and ``spectral_norm``, and under
    ``torch.nn.utils.prune``'s mask, the next forward recomputes it; either way the repaired
    copy kept every channel, silently. So weight norm's magnitude ``g`` is zeroed for the
    channels, a pruning mask's ``weight_orig`` rows are zeroed, and spectral norm's stored weight
    rows are zeroed with its left singular vector rescaled so that the norm it divides by stays
    what it was. The result is checked: exactly those entries zero, every other one unchanged.
    """
    kind = reparametrization(module, pname)
    if kind is None:
        stored = getattr(module, pname, None)
        if stored is not None:
            stored.index_fill_(dim % stored.dim(), idx, 0)
        return
    if kind not in ZEROABLE_REPARAMETRIZATIONS:
        raise TrojanPruneError(unzeroable_message(name, pname, kind))
    if parametrize.is_parametrized(module, pname):
        chain = getattr(module.parametrizations, pname)
        training = chain.training
        chain.eval()  # no power iteration while the weight is read
        try:
            current = getattr(module, pname)
            dim %= current.dim()
            expected = current.detach().clone().index_fill_(dim, idx, 0)
            if kind == "weight_norm":
                _zero_magnitude(chain.original0, idx, dim)
            else:
                norm = chain[0]
                _zero_spectral(chain.original, norm._u, norm._v, norm._reshape_weight_to_matrix, idx, dim)
            after = getattr(module, pname)
        finally:
            chain.train(training)
    else:  # a forward pre-hook computes the weight before every forward
        hook = _weight_hook(module, pname)
        compute = (hook.apply_mask if kind == "prune" else hook.compute_weight if kind == "weight_norm"
                   else lambda m: hook.compute_weight(m, do_power_iteration=False))
        current = compute(module)  # not the attribute: it is as the last forward left it
        dim %= current.dim()
        expected = current.detach().clone().index_fill_(dim, idx, 0)
        if kind == "weight_norm":
            _zero_magnitude(getattr(module, pname + "_g"), idx, dim)
        elif kind == "prune":
            getattr(module, pname + "_orig").index_fill_(dim, idx, 0)
        else:
            _zero_spectral(getattr(module, pname + "_orig"), getattr(module, pname + "_u"),
                           getattr(module, pname + "_v"), hook.reshape_weight_to_matrix, idx, dim)
        after = compute(module)
        setattr(module, pname, after)  # what the hook sets at the next forward
    if not torch.allclose(after, expected, rtol=1e-5, atol=1e-7):
        raise TrojanPruneError(unzeroable_message(name, pname, f"{kind} along another dim"))


def _zero_magnitude(g: torch.Tensor, idx: torch.Tensor, dim: int) -> None:
    if g.dim() > dim and g.numel() == g.shape[dim]:  # one magnitude per channel of that dim
        g.index_fill_(dim, idx, 0)


def _zero_spectral(weight, u, v, to_matrix, idx, dim) -> None:
    sigma = torch.vdot(u, torch.mv(to_matrix(weight), v))
    weight.index_fill_(dim, idx, 0)
    left = torch.vdot(u, torch.mv(to_matrix(weight), v))
    if float(left) != 0:
        u.mul_(sigma / left)


def unzeroable_message(name: str, pname: str, kind: str) -> str:
    return (f"cannot zero channels of {name!r}: its {pname} is computed by a reparametrization "
            f"({kind}) that the repair cannot zero exactly (it can: weight_norm and spectral_norm "
            f"over output channels, and torch.nn.utils.prune masks). Remove it first, which "
            f"keeps the same function: "
            f"torch.nn.utils.parametrize.remove_parametrizations(module, {pname!r}) (or "
            f"torch.nn.utils.remove_weight_norm / remove_spectral_norm for the older API)")
