"""Fast masked evaluation: the hot path of every pruning search.

Searches (Shapley sampling, RL rollouts, threshold sweeps) evaluate thousands of candidate
masks on the same few images. These things make that cheap:

1. **Mask batching.** M masks x B images run as one forward pass of M*B images (mask-major),
   chunked to bound memory, instead of M small forward passes whose cost is mostly overhead.
2. **Prefix reuse.** Everything that does not depend on a masked module is the same for every
   mask, and the images never change, so it is computed once at batch B and cached. The model
   is traced with ``torch.fx``; a node is *dirty* if a masked module (a hook point of a group
   whose mask is not all ones) is among its ancestors, and only dirty nodes run at M*B, fed by
   cached clean values repeated M times. A search over the last layers therefore only pays for
   the last layers.
3. **Shared agreeing layers** (opt-in, :func:`sharing_agreeing_masks`). Masks that agree on
   some pruned groups, as the tries of a search that changes one channel at a time do, run
   the masked network up to where they differ once for the group of them.

When ``torch.fx`` cannot trace a model (data-dependent control flow), the evaluator falls back
to forward hooks on the whole model (batching only), with a one-time warning. Both paths
compute the same numbers as :class:`~trojanprune.engine.masks.ChannelMasks` on the eager model.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.fx as fx
from torch import nn

from ..errors import ConfigError, TrojanPruneError
from .layout import channels_last_copy
from .masks import ChannelMasks, MaskInput, as_group_masks, hook_specs, scale_channels
from .memory import leaf_output_bytes
from .units import Units

_WARNED: set[str] = set()
_SHARING: contextvars.ContextVar[bool] = contextvars.ContextVar("share_agreeing_masks", default=False)
# Target size of the largest activation per forward on CPU, per thread (about one L2 cache).
_CPU_CACHE_BYTES = 2 << 20


@contextlib.contextmanager
def sharing_agreeing_masks():
    """Inside, every :class:`MaskEvaluator` call without gradients runs consecutive masks that
    agree on some groups as a part that computes those groups once
    (:meth:`MaskEvaluator._agreeing_parts`).
    The same numbers up to float rounding: the shared layers run at another batch size. Off
    by default, so that a search's figures do not move with the masks it happens to batch
    together; ONP turns it on for its one-change-at-a-time steps (refinement, give-back)."""
    token = _SHARING.set(True)
    try:
        yield
    finally:
        _SHARING.reset(token)


class EvaluationBudgetExceeded(TrojanPruneError):
    """A search asked for more mask evaluations than its budget allows."""

    def __init__(self, used: int, requested: int, budget: int):
        self.used, self.requested, self.budget = used, requested, budget
        super().__init__(f"evaluation budget exceeded: {used} mask evaluations done, {requested} more "
                         f"requested, budget {budget}; raise the budget or shrink the search")


@dataclass
class _Plan:
    """What to run for one set of masked modules."""

    run: list[fx.Node]                  # dirty nodes, topological order
    dirty: set[fx.Node]
    frontier: set[fx.Node]              # clean nodes read by dirty nodes (or by the output)
    last_use: dict[fx.Node, int]        # value -> index in ``run`` after which it can be freed
    masked: set[str]                    # module names whose outputs are masked
    bytes_per_image: int                # largest dirty activation, per image


class MaskEvaluator:
    """Evaluate many unit masks on a fixed image set, fast.

    Args:
        model: the classifier; used as is (eval mode during calls, then restored).
        units: the units masks refer to (all of a model's units, or a ``select``-ed subset).
        images: (B, C, H, W) in [0, 1]; moved to the model's device.
        labels: optional (B,) labels for :meth:`accuracy`.
        chunk: at most this many images (masks x images) per forward pass. Default on CUDA:
            2048 (large batches are what make a GPU fast). Default on CPU: as many as keep the
            largest activation of the masked part of the network near 2 MiB per thread, so it
            stays in cache: measured on vgg_small, 120-image batches run ~40% slower per image
            than 10-image ones, so a big batch would lose to the naive loop on full-model masks.
        budget: optional cap on :attr:`evaluations`; exceeding it raises
            :class:`EvaluationBudgetExceeded` before any work is done.
        reuse_prefix: trace with torch.fx and cache mask-independent activations (default).
        fast_layout: on the fx path on CPU, run the traced graph on a channels-last copy of the
            model (:func:`~trojanprune.engine.layout.channels_last_copy`: the same function,
            checked on the images, ~1.5x faster convolutions; the model itself is never
            converted). The copy is remade whenever the model's weights change, so results
            always follow the live weights; it is the evaluator's own (one model's memory per
            evaluator). Calls with ``grad=True`` on a model with trainable parameters run the
            model itself, so that gradients reach its parameters. Default True; off, or
            wherever the copy would not agree, the model runs as it is.

    Masks: a (M, units.total) or (units.total,) tensor, or a dict {group: (M, size) or
    (size,)} (missing groups = all ones). 1 keeps a unit, 0 removes it; values in between
    scale it. :attr:`evaluations` counts masks evaluated on the whole image set.

    Cached activations are keyed to the model's weights: changing any parameter or buffer
    (in place or by reassignment) invalidates them automatically. Changing the model's
    structure needs a new evaluator.
    """

    def __init__(self, model: nn.Module, units: Units, images: torch.Tensor,
                 labels: torch.Tensor | None = None, *, chunk: int | None = None,
                 budget: int | None = None, reuse_prefix: bool = True, fast_layout: bool = True):
        if not isinstance(images, torch.Tensor) or images.dim() < 2 or len(images) == 0:
            raise ConfigError("images must be a non-empty batched tensor (B, C, H, W)")
        if chunk is not None and chunk < 1:
            raise ConfigError(f"chunk must be at least 1, got {chunk}")
        if labels is not None and len(labels) != len(images):
            raise ConfigError(f"{len(labels)} labels for {len(images)} images")
        self.model = model
        self.units = units
        self.device = next((t.device for t in list(model.parameters()) + list(model.buffers())),
                           torch.device("cpu"))
        self.images = images.detach().to(self.device, torch.float32)
        self.labels = None if labels is None else labels.detach().to(self.device, torch.long)
        self.chunk = chunk
        self.budget = budget
        self.evaluations = 0
        self._specs = hook_specs(model, units)
        self._modules = dict(model.named_modules())
        self.fast_layout = fast_layout
        # What the fx path executes: the model, or its channels-last copy (same module names).
        self._runner: nn.Module = model
        self._run_modules = self._modules
        self._live = False  # this call runs the model itself (see _evaluate)
        self._graph: fx.Graph | None = None
        self._plans: dict[frozenset, _Plan] = {}
        self._meta: dict[fx.Node, str] | None = None
        self._cache: dict[fx.Node, Any] = {}
        self._fingerprint: tuple | None = None
        self._bytes: dict[fx.Node, int] = {}
        self._model_bytes: int | None = None
        if reuse_prefix:
            self._graph = self._trace()

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def reuses_prefix(self) -> bool:
        """True when the fx path (prefix reuse) is in use, False on the hook fallback."""
        return self._graph is not None

    # -- public API -----------------------------------------------------------------------
    def logits(self, masks: MaskInput) -> torch.Tensor:
        """(M, B, K) logits of the model under each of the M masks."""
        return self._evaluate(masks, None, [None], False, grad=False)[0]

    def edited_logits(self, masks: MaskInput, module: str, edit, grad: bool = True,
                      after_mask: bool = False) -> torch.Tensor:
        """(M, B, K) logits like :meth:`logits` (with gradients unless ``grad=False``), where
        the output of the hook point ``module`` is first replaced by ``edit(out, j0, j1)`` and
        then masked (``after_mask=True``: first masked, then edited).

        ``out`` has shape (j1 - j0, b, ...): the module's output for masks j0..j1-1 (mask-major)
        on a block of b images; ``edit`` returns a tensor of the same shape. This is how a
        feature-space trigger is injected at one layer (differentiably, so it can be learned)
        while pruning masks act on every layer; prefix reuse still applies, so only the layers
        from ``module`` on are run per mask. Editing before masking means pruning a channel
        also removes what the edit wrote into it, as it removes a real trigger's activation;
        editing after masking keeps what the edit writes whatever the pruning at ``module``
        (the pruning of the other layers still acts), so an edit can stand for a signal that
        arrives from upstream of the pruned layer.
        """
        self._check_hook_point(module)
        return self._evaluate(masks, module, [edit], bool(after_mask), grad)[0]

    def branch_logits(self, masks: MaskInput, module: str, edits: list,
                      after_mask: bool = False) -> list[torch.Tensor]:
        """``[(M, B, K)]``: for each entry of ``edits`` (an ``edit`` as for
        :meth:`edited_logits`, or None for the plain logits), the logits under each mask with
        that edit at ``module``; no gradients. The network up to ``module``'s output runs once
        per mask and is shared by the entries, so n triggers written into one layer (and the
        plain logits beside them) cost one pass up to that layer, not n. Each entry counts
        as M evaluations, as the separate calls would."""
        self._check_hook_point(module)
        if not edits:
            return []
        return self._evaluate(masks, module, list(edits), bool(after_mask), grad=False)

    def accuracy(self, masks: MaskInput, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(M,) fraction of images classified as their label."""
        return top1_accuracy(self.logits(masks), self._labels(labels))

    def soft_accuracy(self, masks: MaskInput, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(M,) mean softmax probability of each image's label: accuracy's smooth counterpart,
        which moves with every image rather than only with those whose prediction flips."""
        return soft_accuracy(self.logits(masks), self._labels(labels))

    def target_rate(self, masks: MaskInput, target: int | torch.Tensor) -> torch.Tensor:
        """(M,) fraction of images classified as ``target`` (attack success on triggered images)."""
        target = self._target(target)
        return (self.logits(masks).argmax(-1) == target).float().mean(1)

    def margin(self, masks: MaskInput, target: int | torch.Tensor) -> torch.Tensor:
        """(M,) mean over images of (target logit - largest other logit).

        A smooth backdoor score: positive while the trigger still wins, and it keeps moving
        when a unit's removal weakens the backdoor without flipping any prediction yet.
        """
        target = self._target(target)
        logits = self.logits(masks)
        idx = target.view(1, -1, 1).expand(logits.shape[0], -1, 1)
        own = logits.gather(-1, idx).squeeze(-1)
        other = logits.scatter(-1, idx, float("-inf")).amax(-1)
        return (own - other).mean(1)

    def reset_cache(self) -> None:
        """Drop cached activations (done automatically when the weights change)."""
        self._cache.clear()
        self._fingerprint = None

    def _evaluate(self, masks: MaskInput, module: str | None, edits: list, after_mask: bool,
                  grad: bool) -> list[torch.Tensor]:
        """The logits of each branch in ``edits`` (an edit at ``module``, or None), each
        counted as M evaluations."""
        group_masks, m = self._prepare(masks)
        self._charge(m * len(edits))
        flags = {mod: mod.training for mod in self._modules.values()}
        try:
            self.model.eval()
            with torch.set_grad_enabled(grad):
                if self._graph is None:
                    return [self._logits_hooks(group_masks, m, None if fn is None else (module, fn, after_mask))
                            for fn in edits]
                self._check_weights()
                # Gradients for the model's own trainable parameters must come from the model.
                self._live = grad and any(p.requires_grad for p in self.model.parameters())
                parts = self._agreeing_parts(group_masks, m) if _SHARING.get() and not grad else None
                if not parts:
                    return self._branches_fx(group_masks, m, module, edits, after_mask)
                outs: list[list[torch.Tensor]] = [[] for _ in edits]
                for start, stop, common in parts:
                    varying = {g: t[start:stop] for g, t in group_masks.items()
                               if g not in common and not bool((t[start:stop] == 1).all())}
                    # an edit's mask indices are the call's, not the part's
                    shifted = [None if fn is None else _shifted(fn, start) for fn in edits]
                    part = self._branches_fx(varying, stop - start, module, shifted, after_mask, common)
                    for e, logits in enumerate(part):
                        outs[e].append(logits)
                return [torch.cat(o, 0) for o in outs]
        finally:
            for mod, flag in flags.items():
                mod.training = flag

    # -- argument handling ----------------------------------------------------------------
    def _check_hook_point(self, module: str) -> None:
        if module not in self._specs:
            raise ConfigError(f"{module!r} is not a hook point of these units; choose one of "
                              f"{sorted(self._specs)[:8]}{' ...' if len(self._specs) > 8 else ''}")

    def _agreeing_parts(self, masks: dict[str, torch.Tensor], m: int):
        """Consecutive masks that agree on some groups share what those groups compute: a
        list of ``(start, stop, common)`` ranges covering the masks in order, ``common`` the
        groups on which masks ``start:stop`` all equal the masks' consensus (the value most
        masks give each unit), with that row, or {} for a range that shares nothing; None
        when no range shares anything (the masks then run as one call, as without sharing).
        Ranges, not sets of rows, so that an edit's mask indices stay a slice.

        Why: a search that tries one change at a time to a pruning (ONP's refinement and
        give-back: one channel more or less, in unit order) asks for masks that differ from
        each other in one layer only. Grouped by that layer, the network up to it is the same
        masked network for every mask of the group, so it runs once for the group
        (:meth:`_common_cache`) instead of once per mask."""
        if m < 3 or not masks:
            return None
        groups = list(masks)
        differs = torch.stack([(t != torch.mode(t, dim=0).values).any(1).cpu() for t in masks.values()], 1)
        runs: list[list] = []  # [start, stop, key]: consecutive masks that differ in the same groups
        for i, row in enumerate(differs.tolist()):
            key = tuple(g for g, d in zip(groups, row) if d)
            if runs and runs[-1][2] == key:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1, key])
        out: list[tuple[int, int, dict]] = []
        for start, stop, key in runs:
            # a group all of whose units the range keeps needs no mask; only a pruned (or
            # scaled) common group has something to share
            common = {g: masks[g][start] for g in groups if g not in key}
            common = {g: row for g, row in common.items() if not bool((row == 1).all())}
            if stop - start < 2 or not common:
                common = {}
            if out and not common and not out[-1][2]:
                out[-1] = (out[-1][0], stop, {})  # ranges that share nothing run together
            else:
                out.append((start, stop, common))
        return out if any(common for _, _, common in out) else None

    def _prepare(self, masks: MaskInput) -> tuple[dict[str, torch.Tensor], int]:
        group_masks = as_group_masks(self.units, masks, device=self.device, dtype=torch.float32)
        sizes = {t.shape[0] for t in group_masks.values() if t.dim() == 2}
        if len(sizes) > 1:
            raise ConfigError(f"all group masks must have the same number of masks M; got {sorted(sizes)}")
        m = sizes.pop() if sizes else 1
        if m < 1:
            raise ConfigError("no masks given (M = 0)")
        group_masks = {k: (v if v.dim() == 2 else v.unsqueeze(0).expand(m, -1)) for k, v in group_masks.items()}
        # Groups whose masks keep every unit change nothing: leaving them out keeps the
        # masked (dirty) part of the network as small as possible.
        group_masks = {k: v for k, v in group_masks.items() if not bool((v == 1).all())}
        return group_masks, m

    def _charge(self, m: int) -> None:
        if self.budget is not None and self.evaluations + m > self.budget:
            raise EvaluationBudgetExceeded(self.evaluations, m, self.budget)
        self.evaluations += m

    def _labels(self, labels):
        labels = self.labels if labels is None else labels.to(self.device, torch.long)
        if labels is None:
            raise ConfigError("accuracy needs labels: pass them to MaskEvaluator or to accuracy()")
        if labels.shape != (self.num_images,):
            raise ConfigError(f"expected {self.num_images} labels, got shape {tuple(labels.shape)}")
        return labels

    def _target(self, target) -> torch.Tensor:
        t = torch.as_tensor(target, device=self.device, dtype=torch.long)
        if t.dim() == 0:
            t = t.expand(self.num_images)
        if t.shape != (self.num_images,):
            raise ConfigError(f"target must be a class index or {self.num_images} indices")
        return t

    def _chunk(self, bytes_per_image: int) -> int:
        if self.chunk is not None:
            return int(self.chunk)
        if self.device.type == "cuda":
            return 2048
        budget = _CPU_CACHE_BYTES * max(1, torch.get_num_threads())
        return int(min(1024, max(1, budget // max(1, bytes_per_image))))

    def _blocks(self, m: int, bytes_per_image: int = 0):
        """(mask slices, image slices) so that each forward holds at most ``chunk`` images."""
        chunk = self._chunk(bytes_per_image)
        b = self.num_images
        ib = min(b, chunk)
        mc = max(1, chunk // ib)
        return ([(s, min(s + mc, m)) for s in range(0, m, mc)],
                [(s, min(s + ib, b)) for s in range(0, b, ib)])

    # -- hook path (no prefix reuse) ------------------------------------------------------
    def _logits_hooks(self, masks: dict[str, torch.Tensor], m: int, edit=None) -> torch.Tensor:
        if self._model_bytes is None and self.chunk is None:
            # the largest module output for one image sizes the hook path's chunks
            self._model_bytes = max(leaf_output_bytes(self.model, self.images[:1]), default=0)
        mask_blocks, image_blocks = self._blocks(m, self._model_bytes or 0)
        rows = []
        block = [0, 0]
        handle = None
        name, fn, after_mask = edit if edit is not None else (None, None, False)

        def edit_hook(module, inputs, output):
            k = block[1] - block[0]
            return fn(output.reshape(k, -1, *output.shape[1:]), *block).reshape(output.shape)

        if edit is not None and not after_mask:
            # prepend: the edit runs before the mask hook ChannelMasks puts on the same module
            handle = self._modules[name].register_forward_hook(edit_hook, prepend=True)
        try:
            with ChannelMasks(self.model, self.units) as cm:
                if edit is not None and after_mask:
                    # registered after ChannelMasks's hook, so it runs after the mask
                    handle = self._modules[name].register_forward_hook(edit_hook)
                for m0, m1 in mask_blocks:
                    k = m1 - m0
                    block[:] = [m0, m1]
                    cm.set({g: t[m0:m1] for g, t in masks.items()})
                    cols = []
                    for b0, b1 in image_blocks:
                        x = self.images[b0:b1]
                        x = x.repeat(k, *([1] * (x.dim() - 1)))
                        cols.append(_as_logits(self.model(x)).reshape(k, b1 - b0, -1))
                    rows.append(torch.cat(cols, 1))
        finally:
            if handle is not None:
                handle.remove()
        return torch.cat(rows, 0)

    # -- fx path --------------------------------------------------------------------------
    def _trace(self) -> fx.Graph | None:
        leaves = {spec.module for spec in self._specs.values()}
        flags = {mod: mod.training for mod in self._modules.values()}
        try:
            # Trace in eval mode: Python-level ``if self.training`` branches are frozen at trace time.
            self.model.eval()
            graph = _Tracer(leaves).trace(self.model)
            placeholders = [n for n in graph.nodes if n.op == "placeholder"]
            if not placeholders or any(not n.args for n in placeholders[1:]):
                raise TrojanPruneError("forward() must take the images as its only required argument")
            hooked = {n.target for n in graph.nodes if n.op == "call_module"}
            missing = set(self._specs) - hooked
            if missing:
                raise TrojanPruneError(f"masked modules not called as modules: {sorted(missing)}")
            return graph
        except Exception as exc:  # any tracing failure: fall back, do not fail the defense
            key = type(self.model).__qualname__
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(f"MaskEvaluator: torch.fx cannot trace {key} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); evaluating masks "
                              "without prefix reuse (same results, slower)", RuntimeWarning, stacklevel=3)
            return None
        finally:
            for mod, flag in flags.items():
                mod.training = flag

    def _check_weights(self) -> None:
        fp = tuple((t.data_ptr(), t._version) for t in
                   list(self.model.parameters()) + list(self.model.buffers()))
        if fp != self._fingerprint:
            self._cache.clear()
            self._fingerprint = fp
            # Called in eval mode, so the copy is made (and stays) in eval mode.
            self._runner = (channels_last_copy(self.model, self.images[:8]) if self.fast_layout
                            else self.model)
            self._run_modules = (self._modules if self._runner is self.model
                                 else dict(self._runner.named_modules()))

    def _node_meta(self) -> dict[fx.Node, str]:
        """Classify nodes: "batch" (tensor with the image batch first), "static" (does not
        depend on the images), "other" (depends on them but cannot be repeated per mask, e.g.
        ``x.size(0)``, which must then be recomputed on the M*B batch)."""
        if self._meta is None:
            n = min(self.num_images, 2)
            with torch.no_grad():
                env = self._run_clean(set(self._graph.nodes), 0, n)
            meta, depends = {}, set()
            images = next(iter(self._graph.nodes))  # the first placeholder; others are defaults
            for node in self._graph.nodes:
                if node is images or any(a in depends for a in node.all_input_nodes):
                    depends.add(node)
                    v = env.get(node)
                    meta[node] = ("batch" if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n
                                  else "other")
                    if meta[node] == "batch":
                        self._bytes[node] = v.numel() * v.element_size() // n
                else:
                    meta[node] = "static"
            self._meta = meta
        return self._meta

    def _plan(self, masked: frozenset) -> _Plan:
        plan = self._plans.get(masked)
        if plan is not None:
            return plan
        meta = self._node_meta()
        nodes = list(self._graph.nodes)
        output = next(n for n in nodes if n.op == "output")
        dirty: set[fx.Node] = set()
        changed = True
        while changed:
            changed = False
            for node in nodes:
                if node.op == "output" or node in dirty:
                    continue
                if ((node.op == "call_module" and node.target in masked)
                        or any(a in dirty for a in node.all_input_nodes)):
                    dirty.add(node)
                    changed = True
            # A clean value that cannot be repeated per mask is recomputed at M*B.
            for node in list(dirty):
                for a in node.all_input_nodes:
                    if a not in dirty and meta[a] == "other":
                        dirty.add(a)
                        changed = True
        needed = _ancestors(output.all_input_nodes)
        dirty &= needed
        run = [n for n in nodes if n in dirty]
        frontier = {a for n in run for a in n.all_input_nodes if a not in dirty}
        frontier |= {a for a in output.all_input_nodes if a not in dirty}
        last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(run):
            for a in node.all_input_nodes:
                last_use[a] = i
        for a in output.all_input_nodes:
            last_use[a] = len(run)
        plan = _Plan(run, dirty, frontier, last_use, set(masked),
                     max([self._bytes.get(n, 0) for n in run], default=0))
        self._plans[masked] = plan
        return plan

    def _fill_cache(self, plan: _Plan) -> None:
        missing = plan.frontier - set(self._cache)
        if missing:
            self._cache.update(self._on_all_images(missing))

    def _common_cache(self, plan: _Plan, common: dict[str, torch.Tensor]) -> dict[fx.Node, Any]:
        """The values ``plan`` reads from outside its dirty part, with the ``common`` masks
        (group -> (size,) mask, the same for every mask of the call) applied: the cached clean
        values where no common mask reaches them, the others computed here, once for the call."""
        reached = self._plan(frozenset(name for name, spec in self._specs.items()
                                       if any(entry[0] in common for entry in spec.entries))).dirty
        needs = plan.frontier & reached
        if not needs:
            return self._cache
        cache = {n: self._cache[n] for n in plan.frontier - needs}
        cache.update(self._on_all_images(needs, common))
        return cache

    def _on_all_images(self, nodes: set[fx.Node],
                       masks: Mapping[str, torch.Tensor] | None = None) -> dict[fx.Node, Any]:
        """:meth:`_run_clean` of ``nodes`` on every image, block by block, joined."""
        meta = self._node_meta()
        widest = max(self._bytes.values(), default=0)
        with torch.no_grad():  # constants for the calls that read them, also under edited_logits
            blocks = [self._run_clean(nodes, b0, b1, masks) for b0, b1 in self._blocks(1, widest)[1]]
        return {node: (torch.cat([blk[node] for blk in blocks], 0) if meta[node] == "batch"
                       else blocks[0][node]) for node in nodes}

    def _run_clean(self, wanted: set[fx.Node], b0: int, b1: int,
                   masks: Mapping[str, torch.Tensor] | None = None) -> dict[fx.Node, Any]:
        """Values of ``wanted`` nodes on images[b0:b1] (only their ancestors run): unmasked,
        or under one mask per group (``masks``: group -> (size,) mask)."""
        todo = _ancestors(wanted)
        order = [n for n in self._graph.nodes if n in todo and n.op != "output"]
        last = {}
        for i, node in enumerate(order):
            for a in node.all_input_nodes:
                last[a] = i
        env: dict[fx.Node, Any] = {}
        kept: dict[fx.Node, Any] = {}
        x = self.images[b0:b1]
        for i, node in enumerate(order):
            env[node] = self._exec(node, env, x)
            if masks and node.op == "call_module" and node.target in self._specs:
                spec = self._specs[node.target]
                mult = spec.multiplier(masks, env[node].shape[spec.dim])
                if mult is not None:
                    env[node] = scale_channels(env[node], mult, spec.dim)
            if node in wanted:
                v = env[node]
                # Clone: a later in-place op (ReLU(inplace=True)) must not alter the cache.
                kept[node] = v.clone() if isinstance(v, torch.Tensor) else v
            for a in node.all_input_nodes:
                if last.get(a) == i:
                    env.pop(a, None)
        return kept

    def _branches_fx(self, masks: dict[str, torch.Tensor], m: int, module: str | None,
                     edits: list, after_mask: bool,
                     common: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Logits for each of ``edits`` (an edit function, or None for no edit) at the hook
        point ``module``: everything up to ``module``'s output runs once per block and is
        shared by the branches; only the layers after it run once per branch. ``common``:
        groups whose one (size,) mask every mask shares (:meth:`_agreeing_parts`); what only
        they change runs once for the call."""
        common = common or {}
        masked = frozenset(name for name, spec in self._specs.items()
                           if any(entry[0] in masks for entry in spec.entries))
        if module is not None:
            masked = masked | {module}
        plan = self._plan(masked)
        self._fill_cache(plan)
        cache = self._common_cache(plan, common) if common else self._cache
        # every masked module in the dirty part applies its masks, the common ones included
        applied = plan.masked | {name for name, spec in self._specs.items()
                                 if any(entry[0] in common for entry in spec.entries)}
        meta = self._node_meta()
        output = next(n for n in reversed(self._graph.nodes) if n.op == "output")
        split = next((i for i, node in enumerate(plan.run)
                      if node.op == "call_module" and node.target == module), len(plan.run))
        mask_blocks, image_blocks = self._blocks(m, plan.bytes_per_image)
        rows: list[list[torch.Tensor]] = [[] for _ in edits]
        for m0, m1 in mask_blocks:
            k = m1 - m0
            block_masks = {**{g: row.expand(k, -1) for g, row in common.items()},
                           **{g: t[m0:m1] for g, t in masks.items()}}
            cols: list[list[torch.Tensor]] = [[] for _ in edits]
            for b0, b1 in image_blocks:
                shared: dict[fx.Node, Any] = {}

                def value_in(env: dict):
                    def value(node: fx.Node):
                        if node in env:
                            return env[node]
                        v = cache[node]
                        if meta[node] == "batch":
                            v = v[b0:b1]
                            v = v.repeat(k, *([1] * (v.dim() - 1)))  # mask-major copy
                        env[node] = v
                        return v
                    return value

                def call(env: dict, i: int):
                    """Node ``i``'s raw output (before any edit or mask)."""
                    node, value = plan.run[i], value_in(env)
                    return self._call(node, fx.node.map_arg(node.args, value),
                                      fx.node.map_arg(node.kwargs, value))

                def release(env: dict, i: int) -> None:
                    for a in plan.run[i].all_input_nodes:
                        if plan.last_use.get(a) == i:
                            env.pop(a, None)

                def step(env: dict, i: int, fn=None, raw=None) -> None:
                    """Run node ``i`` of the plan into ``env`` (``raw``: its module output,
                    already computed), with ``fn``'s edit and the masks applied."""
                    node = plan.run[i]
                    out = call(env, i) if raw is None else raw
                    if fn is not None and not after_mask:
                        out = fn(out.reshape(k, b1 - b0, *out.shape[1:]), m0, m1).reshape(out.shape)
                    if node.op == "call_module" and node.target in applied:
                        spec = self._specs[node.target]
                        mult = spec.multiplier(block_masks, out.shape[spec.dim])
                        if mult is not None:
                            out = scale_channels(out, mult, spec.dim)
                    if fn is not None and after_mask:
                        out = fn(out.reshape(k, b1 - b0, *out.shape[1:]), m0, m1).reshape(out.shape)
                    env[node] = out
                    release(env, i)

                # the shared prefix: every node before ``module``, then its raw output
                for i in range(min(split, len(plan.run))):
                    step(shared, i)
                raw = None
                if split < len(plan.run):
                    raw = call(shared, split)
                    release(shared, split)
                for e, fn in enumerate(edits):
                    last = e == len(edits) - 1
                    # every branch but the last gets copies: a later layer may write in place
                    # (ReLU(inplace=True), ``out += identity``) into a value the next branch reads
                    env = shared if last else {n: (v.clone() if isinstance(v, torch.Tensor) else v)
                                               for n, v in shared.items()}
                    if raw is not None:
                        step(env, split, fn, raw if last else raw.clone())
                        for i in range(split + 1, len(plan.run)):
                            step(env, i)
                    result = fx.node.map_arg(output.args[0], value_in(env))
                    cols[e].append(_as_logits(result).reshape(k, b1 - b0, -1))
            for e in range(len(edits)):
                rows[e].append(torch.cat(cols[e], 1))
        return [torch.cat(r, 0) for r in rows]

    # -- node execution -------------------------------------------------------------------
    def _exec(self, node: fx.Node, env: dict, x: torch.Tensor):
        if node.op == "placeholder":
            is_first = node is next(iter(self._graph.nodes))
            return x if is_first else node.args[0]
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        return self._call(node, args, kwargs)

    def _call(self, node: fx.Node, args, kwargs):
        op = node.op
        if op == "call_module":
            return (self._modules if self._live else self._run_modules)[node.target](*args, **kwargs)
        if op == "call_function":
            return node.target(*args, **kwargs)
        if op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if op == "get_attr":
            obj = self.model if self._live else self._runner
            for part in node.target.split("."):
                obj = getattr(obj, part)  # live lookup: follows .to(device) and reassignment
            return obj
        raise TrojanPruneError(f"unexpected fx node {node.op} {node.target}")


def _shifted(edit, start: int):
    """``edit`` for the masks of a range starting at ``start``: it gets the call's indices."""
    return lambda out, j0, j1: edit(out, start + j0, start + j1)


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(M,) fraction of images classified as their label, from (M, B, K) logits."""
    return (logits.argmax(-1) == labels.to(logits.device)).float().mean(1)


def soft_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(M,) mean softmax probability of each image's label, from (M, B, K) logits."""
    log_p = logits.float().log_softmax(-1)
    idx = labels.to(logits.device).view(1, -1, 1).expand(log_p.shape[0], -1, 1)
    return log_p.gather(-1, idx).squeeze(-1).exp().mean(1)


def target_margin(logits: torch.Tensor, target: int) -> torch.Tensor:
    """(...,) logit of class ``target`` minus the largest other logit, over the last dim."""
    other = logits.clone()
    other[..., target] = float("-inf")
    return logits[..., target] - other.amax(-1)


class _Tracer(fx.Tracer):
    """Keeps every masked module a leaf, even a user subclass fx would trace through."""

    def __init__(self, leaves: set[nn.Module]):
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m in self._leaves or super().is_leaf_module(m, qualname)


def _ancestors(nodes) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _as_logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    raise TrojanPruneError(f"the model must return a logits tensor, got {type(out).__name__}")
