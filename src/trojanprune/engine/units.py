"""Prunable-unit discovery for any ``nn.Module``, without per-architecture code.

A *unit* is one channel of a conv layer (with the normalization that follows it) or one neuron
of a hidden linear layer. Channels that must disappear together form a :class:`UnitGroup`:
in a residual network every conv that writes into a stage's residual stream adds into the same
channels, so channel ``c`` of all of them (and of every BatchNorm reading or writing that
stream) is one unit. Defenses score, mask and prune units, never raw modules, so the same
defense code runs on VGG, ResNet, PreAct-ResNet, LeNet or a user's model.

The coupling is found by Torch-Pruning's DependencyGraph (DepGraph), which traces the autograd
graph of one forward pass. Everything here is stored by module *name*, so a :class:`Units`
found on a model also describes its deep copies (the repaired model, an exported model).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from ..errors import ConfigError, TrojanPruneError

_CONV = nn.modules.conv._ConvNd
_PRODUCER = (_CONV, nn.Linear)
# _NormBase covers BatchNorm*d and InstanceNorm*d.
_NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# Modules whose output tensor carries a group's channels and can therefore be masked there.
_MASKABLE = _PRODUCER + _NORM + (nn.PReLU,)

Pruned = Union[Sequence[tuple[str, int]], Mapping[str, Union[torch.Tensor, Sequence[int]]], torch.Tensor]


def channel_dim(module: nn.Module) -> int:
    """The dimension of ``module``'s output that holds its channels.

    Convolutions and BatchNorm put channels in dim 1 (NCHW); linear and LayerNorm act on the
    last dim, which is dim 1 for the usual (N, features) input and stays right for (N, T, C).
    """
    if isinstance(module, nn.LayerNorm) and _normalizes_dim1(module):
        return 1
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def _normalizes_dim1(module: nn.LayerNorm) -> bool:
    """A LayerNorm subclass with its own forward that normalizes the channels of NCHW tensors
    (torchvision's and timm's ``LayerNorm2d`` permute to channels-last and back), so its
    output holds the channels in dim 1. Found by running it on a small NCHW tensor: a plain
    LayerNorm refuses one whose last dim is not its normalized shape."""
    if type(module).forward is nn.LayerNorm.forward or len(module.normalized_shape) != 1:
        return False
    channels = module.normalized_shape[0]
    weight = module.weight if module.weight is not None else torch.zeros(0)
    probe = torch.zeros(1, channels, 2, 3, device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():  # forward itself: no hook a defense put on the module sees the probe
            out = type(module).forward(module, probe)
    except Exception:  # not an NCHW norm: its channels are where a LayerNorm's are
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (1, channels, 2, 3)


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, _CONV) and module.groups > 1 and module.groups == module.out_channels


@dataclass(frozen=True)
class UnitGroup:
    """Channels that are pruned together: ``size`` units, channel ``c`` of every member.

    Attributes:
        name: the group's name, that of its root module (used in ``result.pruned``).
        size: number of channels (units) in the group.
        root: name of the producing conv/linear that runs first; channel ``c`` of the group is
            output channel ``c`` of this module.
        kind: ``"conv"`` or ``"linear"`` (type of the root).
        mask_points: every module whose OUTPUT carries the group's channels: the producing
            convs/linears and every normalization layer in the group, including consumer
            BatchNorms such as PreAct's ``bn1`` of the next block. Zeroing the channel at all of
            them is exactly what physically removing it does.
        hook_points: the subset of ``mask_points`` whose outputs reach a consumer without
            passing another mask point (a conv or linear of the group that also reads its
            channels, as a block applied twice does, counts as a consumer). Masking there
            alone is equivalent to masking everywhere for 0/1 masks, and with soft masks it
            scales what consumers see exactly once (conv -> BN -> ReLU is masked after the BN
            only, as ANP and RNP do).
        point_channels: for each mask point (same order), the module channel that carries group
            channel ``c`` at position ``c``; ``range(size)`` except after concatenations.
        depth: execution-order index of the root among all modules of the model.
        residual: the group has more than one producing (non-depthwise) conv/linear, i.e. its
            channels are tied by a skip connection.
        members: names of all modules in the Torch-Pruning group (producers, norms, and the
            consumers whose input channels go with the group), in execution order.
        consumers: the convs/linears that read the group's channels (their input channels).
        producers: the mask points that are convs/linears (their output channels are the
            group's channels).
    """

    name: str
    size: int
    root: str
    kind: str
    mask_points: tuple[str, ...]
    hook_points: tuple[str, ...]
    point_channels: tuple[tuple[int, ...], ...]
    depth: int
    residual: bool
    members: tuple[str, ...]
    consumers: tuple[str, ...]
    producers: tuple[str, ...]

    def channels_at(self, point: str) -> tuple[int, ...]:
        """Module channel index carrying each group channel, at mask point ``point``."""
        try:
            return self.point_channels[self.mask_points.index(point)]
        except ValueError:
            raise ConfigError(f"{point!r} is not a mask point of unit group {self.name!r}") from None


class Units:
    """The prunable units of one model: groups in execution order, flattened into one index.

    A search works with flat vectors of length :attr:`total` (one entry per unit); group ``g``
    occupies ``[offsets[g], offsets[g] + size)``. :meth:`split` and :meth:`join` convert between
    flat vectors and per-group tensors.
    """

    def __init__(self, groups: Iterable[UnitGroup], input_shape: tuple[int, ...] | None = None):
        self.groups: tuple[UnitGroup, ...] = tuple(groups)
        self.input_shape = input_shape
        self._index = {g.name: i for i, g in enumerate(self.groups)}
        if len(self._index) != len(self.groups):
            raise ValueError("unit group names must be unique")
        offsets, start = [], 0
        for g in self.groups:
            offsets.append(start)
            start += g.size
        self.offsets: tuple[int, ...] = tuple(offsets)
        self.total: int = start

    # -- container protocol -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[UnitGroup]:
        return iter(self.groups)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, key: str | int) -> UnitGroup:
        if isinstance(key, int):
            return self.groups[key]
        return self.groups[self._position(key)]

    def __repr__(self) -> str:
        body = ", ".join(f"{g.name}[{g.size}{'R' if g.residual else ''}]" for g in self.groups)
        return f"Units({len(self.groups)} groups, {self.total} units: {body})"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def offset(self, group: str) -> int:
        return self.offsets[self._position(group)]

    def _position(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ConfigError(f"unknown unit group {name!r}; groups: {', '.join(self.names)}") from None

    # -- flat index <-> (group, channel) ------------------------------------------------
    def unit_index(self, group: str, channel: int) -> int:
        """Flat index of ``channel`` of ``group``."""
        g = self[group]
        if not 0 <= int(channel) < g.size:
            raise ConfigError(f"channel {channel} out of range for unit group {group!r} of size {g.size}")
        return self.offset(group) + int(channel)

    def unit_of(self, index: int) -> tuple[str, int]:
        """(group name, channel) of flat index ``index``."""
        index = int(index)
        if not 0 <= index < self.total:
            raise ConfigError(f"unit index {index} out of range [0, {self.total})")
        lo, hi = 0, len(self.groups) - 1
        while lo < hi:  # last group whose offset <= index
            mid = (lo + hi + 1) // 2
            if self.offsets[mid] <= index:
                lo = mid
            else:
                hi = mid - 1
        return self.groups[lo].name, index - self.offsets[lo]

    # -- subsets --------------------------------------------------------------------------
    def select(self, layers: str | Sequence[str] = "all", kind: str | None = None) -> "Units":
        """A :class:`Units` restricted to some groups (offsets renumbered).

        ``layers``: ``"all"``, ``"last:N"`` / ``"first:N"`` (in execution order, after the
        ``kind`` filter), one group name, or a list of group names. ``kind``: ``"conv"`` or
        ``"linear"`` to keep only that kind (Fine-Pruning, for instance, wants
        ``select("last:1", kind="conv")``).
        """
        groups = list(self.groups)
        if kind is not None:
            if kind not in ("conv", "linear"):
                raise ConfigError(f"kind must be 'conv' or 'linear', got {kind!r}")
            groups = [g for g in groups if g.kind == kind]
        if isinstance(layers, str) and (layers == "all" or ":" in layers):
            if layers != "all":
                where, _, count = layers.partition(":")
                if where not in ("last", "first") or not count.strip().isdigit() or int(count) < 1:
                    raise ConfigError(f"bad layer selection {layers!r}; use 'all', 'last:N', 'first:N' "
                                      "or a list of group names")
                n = int(count)
                groups = groups[-n:] if where == "last" else groups[:n]
        else:
            wanted = [layers] if isinstance(layers, str) else list(layers)
            for name in wanted:
                self._position(name)
            keep = set(wanted)
            groups = [g for g in groups if g.name in keep]
        if not groups:
            raise ConfigError(f"layer selection {layers!r} (kind={kind!r}) matches no unit group")
        return Units(groups, self.input_shape)

    # -- conversions ----------------------------------------------------------------------
    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-group views of a (..., total) tensor."""
        if flat.shape[-1] != self.total:
            raise ConfigError(f"expected a last dimension of {self.total} (units), got {tuple(flat.shape)}")
        return {g.name: flat[..., o:o + g.size] for g, o in zip(self.groups, self.offsets)}

    def join(self, per_group: Mapping[str, torch.Tensor], fill: float = 1.0) -> torch.Tensor:
        """Flat (..., total) tensor from per-group tensors; missing groups get ``fill``."""
        ref = next(iter(per_group.values()), None)
        lead = tuple(ref.shape[:-1]) if ref is not None else ()
        like = ref if ref is not None else torch.empty(0)
        out = torch.full(lead + (self.total,), fill, dtype=like.dtype, device=like.device)
        for name, t in per_group.items():
            g = self[name]
            if t.shape[-1] != g.size:
                raise ConfigError(f"mask for group {name!r} has {t.shape[-1]} entries, expected {g.size}")
            o = self.offset(name)
            out[..., o:o + g.size] = t
        return out

    def pruned_channels(self, pruned: Pruned) -> dict[str, list[int]]:
        """Normalize a pruning decision to {group: sorted channel list} (groups with none omitted).

        Accepts a list of (group name, channel) pairs (the ``result.pruned`` format), a dict
        group -> bool tensor (True = pruned) or channel list, or a flat bool tensor of length
        :attr:`total`.
        """
        out: dict[str, set[int]] = {}
        if isinstance(pruned, torch.Tensor):
            if pruned.dim() != 1 or pruned.numel() != self.total:
                raise ConfigError(f"a flat pruning mask needs shape ({self.total},), got {tuple(pruned.shape)}")
            for i in torch.nonzero(pruned.bool()).flatten().tolist():
                g, c = self.unit_of(i)
                out.setdefault(g, set()).add(c)
        elif isinstance(pruned, Mapping):
            for name, chans in pruned.items():
                g = self[name]
                if isinstance(chans, torch.Tensor) and chans.dtype == torch.bool:
                    if chans.numel() != g.size:
                        raise ConfigError(f"pruning mask for {name!r} has {chans.numel()} entries, expected {g.size}")
                    idx = torch.nonzero(chans.flatten()).flatten().tolist()
                else:
                    idx = [int(c) for c in (chans.tolist() if isinstance(chans, torch.Tensor) else chans)]
                for c in idx:
                    self.unit_index(name, c)  # range check
                if idx:
                    out.setdefault(name, set()).update(idx)
        else:
            for item in pruned:
                try:
                    name, c = item
                except (TypeError, ValueError):
                    raise ConfigError(f"pruned entries must be (group name, channel) pairs, got {item!r}") from None
                self.unit_index(name, c)
                out.setdefault(name, set()).add(int(c))
        return {g.name: sorted(out[g.name]) for g in self.groups if g.name in out}

    def keep_mask(self, pruned: Pruned, dtype=torch.float32) -> torch.Tensor:
        """Flat (total,) mask: 1 = keep, 0 = pruned."""
        mask = torch.ones(self.total, dtype=dtype)
        for name, chans in self.pruned_channels(pruned).items():
            o = self.offset(name)
            mask[[o + c for c in chans]] = 0
        return mask

    def pruned_list(self, mask: torch.Tensor) -> list[tuple[str, int]]:
        """(group, channel) pairs whose entry in a flat keep-mask is 0 (below 0.5)."""
        if mask.dim() != 1 or mask.numel() != self.total:
            raise ConfigError(f"expected a flat mask of shape ({self.total},), got {tuple(mask.shape)}")
        return [self.unit_of(i) for i in torch.nonzero(mask < 0.5).flatten().tolist()]


# ------------------------------------------------------------------------------------------
# discovery
# ------------------------------------------------------------------------------------------

def discover_units(model: nn.Module, example_input: torch.Tensor, include_linear: bool = True) -> Units:
    """Find every prunable unit group of ``model``.

    ``example_input``: a batch shaped like the model's input (only its first image is used).
    ``include_linear``: also make hidden linear layers' neurons prunable. The output layer (any
    conv/linear whose channels reach the model's output) never is.

    The model is not modified: weights, buffers and train/eval flags are as before (tracing
    runs one forward pass in eval mode, so BatchNorm statistics do not move).
    """
    import torch_pruning as tp  # heavy import, only needed here

    _restore_input_sizes()
    x = _example(model, example_input)
    flags = {m: m.training for m in model.modules()}
    names = _module_names(model)
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # requires_grad on the input gives every op a grad_fn even when the weights are frozen.
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=(x.requires_grad_(True),), verbose=False)
        order = _execution_order(model, x.detach())
    except TrojanPruneError:
        raise
    except Exception as exc:  # tracing a user model can fail in many ways; say which
        raise TrojanPruneError(
            f"could not trace {type(model).__name__} to find its prunable units "
            f"({type(exc).__name__}: {exc}); the model must run on a batch shaped "
            f"{tuple(example_input.shape)}") from exc
    finally:
        for m, flag in flags.items():
            m.training = flag

    tied = _output_tied(dg)
    roots = (_PRODUCER if include_linear else (_CONV,))
    groups: list[UnitGroup] = []
    try:
        for tp_group in dg.get_all_groups(root_module_types=roots):
            group = _make_group(dg, tp_group, names, order, tied)
            if group is not None:
                groups.append(group)
    except TrojanPruneError:
        raise
    except Exception as exc:  # Torch-Pruning traced the model but cannot follow its channels
        raise TrojanPruneError(
            f"could not follow the channels of {type(model).__name__} from layer to layer "
            f"({type(exc).__name__}: {exc}); the model has a reshape, split or concatenation "
            "that Torch-Pruning cannot map. Please report the model definition.") from exc
    groups.sort(key=lambda g: g.depth)
    if not groups:
        what = "conv or hidden linear" if include_linear else "conv"
        raise TrojanPruneError(
            f"{type(model).__name__} has nothing prunable: no {what} layer whose output channels "
            "can be removed (the output layer never is). Pruning defenses need such layers.")
    return Units(groups, tuple(example_input.shape[1:]))


class _InputSizes:
    """An autograd node as Torch-Pruning expects to find it: with ``_saved_self_sizes`` (the
    op's input shape), which PyTorch now names ``_saved_self_sym_sizes``; everything else is
    the node's own."""

    def __init__(self, grad_fn):
        self._grad_fn = grad_fn
        self._saved_self_sizes = tuple(int(s) for s in grad_fn._saved_self_sym_sizes)

    def __getattr__(self, name):
        return getattr(self._grad_fn, name)


def _restore_input_sizes() -> None:
    """Give Torch-Pruning's shape rules the input shapes they read under an older name.

    Torch-Pruning (1.6.1) reads a reshape's or a split's input shape from
    ``grad_fn._saved_self_sizes``, which PyTorch 2.x calls ``_saved_self_sym_sizes``. Without
    it, its rules fall back to guesses: a reshape whose input is not 2-D or 4-D is mapped
    anyway (torchvision ShuffleNetV2's channel-shuffle view divided by zero), and a chunk's
    sizes are inferred from its consumers (wrong in the same model). So its two passes that
    read shapes run with every node's autograd function showing the old name too. Installed
    once; where the old name exists, nothing changes.
    """
    from torch_pruning.dependency import index_mapping, shape_infer

    for module, name in ((shape_infer, "init_shape_information"), (index_mapping, "update_index_mapping")):
        original = getattr(module, name)
        if getattr(original, "_trojanprune_sizes", False):
            continue

        def with_sizes(graph, _original=original):
            swapped = []
            for node in graph.module2node.values():
                fn = node.grad_fn
                if not hasattr(fn, "_saved_self_sizes") and hasattr(fn, "_saved_self_sym_sizes"):
                    node.grad_fn = _InputSizes(fn)
                    swapped.append((node, fn))
            try:
                return _original(graph)
            finally:
                for node, fn in swapped:
                    node.grad_fn = fn

        with_sizes._trojanprune_sizes = True
        setattr(module, name, with_sizes)


def _example(model: nn.Module, example_input) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ConfigError("example_input must be a batched tensor, e.g. images of shape (N, C, H, W)")
    device = next((t.device for t in list(model.parameters()) + list(model.buffers())), example_input.device)
    return example_input[:1].detach().clone().float().to(device)


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        names.setdefault(module, name)
    return names


def _execution_order(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Module name -> index of its first call in a forward pass."""
    order: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        def hook(mod, args, _name=name):
            order.setdefault(_name, len(order))
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.eval()
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


def _output_tied(dg) -> set[nn.Module]:
    """Convs/linears whose output channels reach the model output without another conv/linear.

    Their channels are the logits (or feed them one-to-one), so pruning them would change the
    model's output format. Found by walking back from the graph's sinks through
    channel-preserving ops (activations, norms, pooling, reshapes, concatenations).
    """
    tied: set[nn.Module] = set()
    stack = [n for n in dg.module2node.values() if not n.outputs]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node.module, _PRODUCER) and not is_depthwise(node.module):
            tied.add(node.module)
            continue
        stack.extend(node.inputs)
    return tied


def _make_group(dg, tp_group, names, order, tied) -> UnitGroup | None:
    out_modules = [dep.target.module for dep, _ in tp_group
                   if dg.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names]
    if any(m in tied for m in out_modules):
        return None
    producers = [m for m in out_modules if isinstance(m, _PRODUCER)]
    if not producers:
        return None
    root = min(producers, key=lambda m: order.get(names[m], 1 << 30))
    size = dg.get_out_channels(root)
    if not size:
        return None
    # Re-derive the group from our root so that root_idxs are channels of *our* root.
    pruner = dg.get_pruner_of_module(root)
    group = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(size)))

    points: dict[str, list[tuple[int, int]]] = {}
    kinds: dict[str, str] = {}
    members: set[str] = set()
    consumers: set[str] = set()
    for item in group:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        if module not in names:
            continue  # Torch-Pruning's internal op nodes (add, reshape, concat...)
        name = names[module]
        members.add(name)
        if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(module, _MASKABLE):
            points.setdefault(name, []).extend(zip(item.root_idxs, idxs))
            kinds[name] = "producer" if isinstance(module, _PRODUCER) else "norm"
        elif dg.is_in_channel_pruning_fn(dep.handler):
            consumers.add(name)

    point_names = sorted(points, key=lambda n: order.get(n, 1 << 30))
    point_channels = []
    for name in point_names:
        mapping = dict(points[name])
        if sorted(mapping) != list(range(size)) or len(set(mapping.values())) != size:
            warnings.warn(f"trojanprune: skipped unit group {names[root]!r}: its channels do not map "
                          f"one-to-one onto {name!r}", RuntimeWarning, stacklevel=3)
            return None
        point_channels.append(tuple(int(mapping[c]) for c in range(size)))

    hook_points = _hook_points(dg, names, point_names)
    by_order = lambda n: (order.get(n, 1 << 30), n)  # noqa: E731
    real_producers = [m for m in producers if not is_depthwise(m)]
    unit = UnitGroup(
        name=names[root], size=int(size), root=names[root],
        kind="conv" if isinstance(root, _CONV) else "linear",
        mask_points=tuple(point_names), hook_points=hook_points,
        point_channels=tuple(point_channels), depth=order.get(names[root], -1),
        residual=len(real_producers) > 1,
        members=tuple(sorted(members, key=by_order)),
        consumers=tuple(sorted(consumers - set(point_names), key=by_order)),
        producers=tuple(n for n in point_names if kinds[n] == "producer"),
    )
    return unit


def _hook_points(dg, names, point_names: list[str]) -> tuple[str, ...]:
    """Mask points with a path to a consumer (or the output) that passes no other mask point.

    Masking only there gives the same network as masking every mask point when masks are 0/1
    (every read of the channel goes through one of them), and applies a soft mask once.
    """
    modules = {n: m for m, n in names.items() if n in point_names}
    point_nodes = {dg.module2node[modules[n]] for n in point_names if modules[n] in dg.module2node}
    hooks = []
    for name in point_names:
        node = dg.module2node.get(modules[name])
        if node is None or _reaches_unmasked(node, point_nodes, names):
            hooks.append(name)
    return tuple(hooks)


def _reaches_unmasked(start, point_nodes, names) -> bool:
    stack, seen = list(start.outputs), set()
    if not stack:
        return True  # feeds the output directly
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in point_nodes:
            if isinstance(node.module, _PRODUCER) and not is_depthwise(node.module):
                # a conv/linear of the group that also READS its channels (a block applied
                # twice, a recurrence) mixes channel c into all its outputs: c must be masked
                # before it, or the masked model leaks what the pruned model does not have
                return True
            continue  # this path is masked further on (per channel)
        if node.module in names or not node.outputs:
            return True  # a real module reads the channel, or the model output does
        stack.extend(node.outputs)
    return False
