"""``trojanprune.repair``: the one entry point every defense is reached through."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.data import Dataset

from . import defenses
from .data.dataset import ImageDataset
from .defenses.base import CleanData, RepairResult
from .engine.masks import ZEROABLE_REPARAMETRIZATIONS, reparametrization, unzeroable_message
from .errors import ConfigError, DataError, TrojanPruneError
from .utils import copy_model, model_device, resolve_device, seed_everything


def repair(model: nn.Module, clean, method: str = "onp", seed: int = 0, device=None,
           progress: bool = False, **options) -> RepairResult:
    """Repair a copy of ``model`` with ``method``; the input model is never modified.

    ``clean`` is an ``(x, y)`` pair of tensors (images float in [0, 1], NCHW), a Dataset of
    ``(x, y)``, or ``None`` for data-free methods. Options are the method's dataclass fields.
    The model must return logits (a warning says so when it returns probabilities); any
    floating dtype is accepted, and the repaired copy comes back in the model's own.
    """
    defense_cls = defenses.get(method)
    if torch.is_inference_mode_enabled():
        raise ConfigError("repair was called inside torch.inference_mode(): every defense needs "
                          "gradients (trigger reverses, masks, fine-tuning); call it outside")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _eager(model)
    scripted = next((f"submodule {name!r}" if name else "the model"
                     for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)),
                    None)
    if scripted is not None:
        # A compiled module hides its layers from the pruning engine (no forward hooks, no
        # autograd graph to map channels by): every defense would fail deep inside.
        raise ConfigError(f"{scripted} is a TorchScript module (torch.jit.script or "
                          f"torch.jit.trace); pruning needs the eager torch.nn.Module. Build the "
                          f"model from its Python definition and load the compiled one's weights "
                          f"into it: model.load_state_dict(scripted.state_dict())")
    _check_reparametrizations(model)
    device = resolve_device(device) if device is not None else model_device(model)
    # Defenses compute in float32 (their masks, triggers and images are float32): a float64 or
    # half-precision model is repaired as a float32 copy and returned in its own dtype, in
    # which its pruned weights are still exactly zero.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    working = copy_model(model).to(device=device, dtype=torch.float32).eval()
    for p in working.parameters():
        p.requires_grad_(False)
    num_classes = _num_classes(working, clean, device)
    data = to_clean_data(clean, num_classes, device)
    if data is None and defense_cls.needs_data:
        raise ConfigError(f"method {method!r} needs clean data; pass clean images or use a "
                          f"data-free method ({', '.join(_data_free())})")
    if data is not None and len(data) < defense_cls.min_images:
        raise DataError(f"method {method!r} needs at least {defense_cls.min_images} clean images, "
                        f"got {len(data)}")
    seed_everything(seed)
    defense = defense_cls(seed=seed, device=device, progress=progress, **options)
    # defenses switch gradients off where they do not need them; a caller's torch.no_grad()
    # would otherwise silently cut the graphs of the reverses and the fine-tuning
    with torch.enable_grad():
        result = defense.repair(working, data)
    result.model = result.model.to(dtype).eval()
    return result


def _eager(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's wrapper, which is what gets repaired.

    The engine's module-type checks do not see through the wrapper (Fine-Pruning found "no
    prunable conv layer" in a compiled conv net), and running through it compiles on the way
    (CLP spent 33 s compiling a two-layer model on a CPU); so the eager module is repaired and
    returned.
    """
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        warnings.warn("the model is wrapped by torch.compile; repairing the eager module inside "
                      "it (the repaired copy is not compiled: compile it again if you want)",
                      UserWarning, stacklevel=3)
        return inner
    return model


def _check_reparametrizations(model: nn.Module) -> None:
    """Refuse, before any work, a weight computed by a reparametrization whose channels the
    repaired copy could not have zeroed (the export would fail at the end of the repair)."""
    for name, module in model.named_modules():
        for pname in ("weight", "bias"):
            kind = reparametrization(module, pname)
            if kind is not None and kind not in ZEROABLE_REPARAMETRIZATIONS:
                raise ConfigError(unzeroable_message(name or "the model", pname, kind))


def _data_free() -> list[str]:
    return [m for m in defenses.available() if not defenses.get(m).needs_data]


def _num_classes(model: nn.Module, clean, device) -> int:
    if isinstance(clean, ImageDataset):
        sample = clean.images[:8].float() / 255
    elif isinstance(clean, (tuple, list)) and len(clean) == 2:
        sample = torch.as_tensor(clean[0][:8]).float()
    elif isinstance(clean, Dataset):
        sample = torch.as_tensor(clean[0][0]).float().unsqueeze(0)
    else:
        sample = None
    if sample is None or sample.ndim != 4:
        return -1  # data-free: defenses probe the model themselves; not NCHW: to_clean_data says so
    try:
        with torch.no_grad():
            out = model(sample.to(device))
    except RuntimeError as exc:
        raise DataError(f"the model cannot run on the clean images of shape "
                        f"{tuple(sample.shape[1:])}: {str(exc).splitlines()[0]}") from None
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the model returns a {type(out).__name__}, not a logits tensor; repair "
                          f"trojanprune.models.SelectOutput(model, key) instead, with key the "
                          f"logits' index or name in that output (e.g. 0 for (logits, features))")
    if out.ndim != 2 or out.shape[1] < 2:
        raise ConfigError(f"the model must return logits of shape (N, classes) with at least 2 "
                          f"classes; got {tuple(out.shape)}")
    if len(out) and bool((out >= 0).all()) and torch.allclose(out.sum(1), torch.ones(len(out), device=out.device),
                                                 atol=1e-3):
        # the trigger reverses' cross-entropy and the probes' logit margins would act on
        # probabilities, where they are nearly flat, and find nothing
        warnings.warn("the model returns probabilities (non-negative, each row sums to 1), but "
                      "every defense expects logits: remove its final softmax, or repair "
                      "nn.Sequential(model, trojanprune.models.LogOf()) and keep that",
                      UserWarning, stacklevel=3)
    return out.shape[1]


def to_clean_data(clean, num_classes: int, device) -> CleanData | None:
    """Validate and convert the defender's clean data; errors say what is wrong and what to do."""
    if clean is None:
        return None
    if isinstance(clean, ImageDataset):
        x, y = clean.tensors()
    elif isinstance(clean, (tuple, list)) and len(clean) == 2:
        x, y = torch.as_tensor(clean[0]), torch.as_tensor(clean[1])
    elif isinstance(clean, Dataset):
        try:
            items = [clean[i] for i in range(len(clean))]
        except TypeError as exc:
            raise DataError(f"clean dataset must have a length and yield (image, label): {exc}") from None
        if not items:
            raise DataError("the clean set is empty; pass at least a few images per class")
        x = torch.stack([torch.as_tensor(i[0]) for i in items])
        y = torch.as_tensor([int(i[1]) for i in items])
    else:
        raise DataError("clean must be (images, labels) tensors, a Dataset of (image, label), or None")
    if x.shape[0] == 0:
        raise DataError("the clean set is empty; pass at least a few images per class")
    if x.ndim != 4:
        raise DataError(f"clean images must be a 4-D tensor (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{x.shape[0]} clean images but {y.shape[0]} labels")
    if x.dtype == torch.uint8:
        x = x.float() / 255
    x = x.float()
    lo, hi = x.min().item(), x.max().item()
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise DataError(f"clean images must be floats in [0, 1] (normalization is part of the "
                        f"model); got values in [{lo:.3g}, {hi:.3g}]. If your model expects "
                        f"normalized inputs, pass the raw images and the model with its "
                        f"normalization in front: nn.Sequential(trojanprune.models.Normalize(mean, "
                        f"std), model)")
    y = y.long()
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"clean labels must be in 0..{num_classes - 1} (the model has "
                        f"{num_classes} outputs); got {int(y.min())}..{int(y.max())}")
    return CleanData(x.clamp(0, 1).to(device), y.to(device), num_classes)


__all__ = ["repair", "to_clean_data", "RepairResult", "TrojanPruneError"]
