"""Loading weights safely, and user-defined model classes.

Checkpoints from elsewhere are untrusted: a pickle can run arbitrary code when loaded. We read
safetensors, or ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers, and refuse anything else with a message that says why.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

# Keys under which training scripts commonly nest the state dict.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights", "params")


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from a .safetensors or .pt/.pth file, loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from None
    else:
        _refuse_torchscript(path)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled objects that would execute code "
                f"when unpickled ({first[:160]}). Re-save only the weights "
                f"(torch.save(model.state_dict(), ...)) or convert to safetensors.") from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {exc}") from None
    return _flatten(obj, key, path)


def _refuse_torchscript(path: Path) -> None:
    """A TorchScript archive (torch.jit.save) is refused with what to do instead: loading one
    runs its compiled code (a module's ``__setstate__``), and torch.load's own refusal of it
    under ``weights_only`` suggests loading it with ``weights_only=False``."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            compiled = any("/code/__torch__/" in name or name.endswith("/constants.pkl")
                           for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return
    if compiled:
        raise CheckpointError(
            f"{path} is a TorchScript archive (torch.jit.save), not a weights file: it carries "
            f"compiled code, which is not loaded here, and a compiled model cannot be pruned "
            f"channel by channel. Where you trust the file, save its weights and pass those with "
            f"the model's Python definition (--model-def): "
            f"torch.save(torch.jit.load('{path.name}').state_dict(), 'weights.pt')")


def _flatten(obj: Any, key: str | None, path: Path) -> dict[str, torch.Tensor]:
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                keys = list(obj)[:20] if isinstance(obj, Mapping) else []
                raise CheckpointError(f"{path}: no key {key!r} in the checkpoint (top-level keys: "
                                      f"{keys})")
            obj = obj[part]
    elif isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for nested in NESTED_KEYS:
            if isinstance(obj.get(nested), Mapping):
                obj = obj[nested]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got "
                              f"{type(obj).__name__}; pass --weights-key to pick one")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: no tensors found; keys are {list(obj)[:20]}; pass "
                              f"--weights-key to pick the state dict")
    # DataParallel / DDP checkpoints prefix every key with "module.".
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path, key: str | None = None) -> nn.Module:
    """Load a checkpoint into ``model`` strictly; mismatches are named in the error."""
    state = read_state_dict(path, key)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})"
                   for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            parts.append("shape mismatch: " + ", ".join(wrong_shape[:6]))
        if missing:
            parts.append("missing in checkpoint: " + ", ".join(missing[:6]))
        if unexpected:
            parts.append("not in model: " + ", ".join(unexpected[:6]))
        more = len(missing) + len(unexpected) + len(wrong_shape) > 6
        raise CheckpointError(f"{path} does not fit the architecture {type(model).__name__}: "
                              + "; ".join(parts) + (" ..." if more else ""))
    model.load_state_dict(state, strict=True)
    return model


def load_model_def(spec: str) -> type[nn.Module]:
    """The class named by ``path/to/file.py:ClassName`` (the user's own code, run by choice)."""
    if ":" not in spec:
        raise ConfigError(f"--model-def must look like path/file.py:ClassName, got {spec!r}")
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"model definition file not found: {path}")
    module_name = f"trojanprune_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(module_name)
    if module is None:
        spec_obj = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[module_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise ConfigError(f"could not import {path}: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        found = [n for n, v in vars(module).items()
                 if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module_name]
        raise ConfigError(f"{path} has no nn.Module class {name!r}; classes defined there: {found}")
    return cls


def build_user_model(spec: str, model_args: str | dict | None = None, weights: str | None = None,
                     weights_key: str | None = None) -> nn.Module:
    """Instantiate ``path.py:Class(**model_args)`` and load ``weights`` into it."""
    if isinstance(model_args, str):
        try:
            model_args = json.loads(model_args) if model_args.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--model-args must be a JSON object: {exc}") from None
    if model_args is not None and not isinstance(model_args, dict):
        raise ConfigError("--model-args must be a JSON object like '{\"num_classes\": 10}'")
    cls = load_model_def(spec)
    try:
        model = cls(**(model_args or {}))
    except Exception as exc:  # the user's own code: any failure is a configuration problem
        raise ConfigError(f"could not build {spec} with arguments {model_args or {}}: "
                          f"{type(exc).__name__}: {exc} (check --model-args)") from None
    if weights:
        load_weights(model, weights, weights_key)
    return model
