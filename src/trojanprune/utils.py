"""Small shared helpers: seeding, device choice, atomic file writes."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, TrojanPruneError


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derive_seed(seed: int, purpose: str) -> int:
    """An independent seed for one purpose (training order, subset choice, poisoning, ...).

    Seeding two samplers with the same number gives the same permutation: the images a poisoning
    picked would then open the first training epoch, all with the target label. Each use of the
    run's seed therefore draws from its own stream.
    """
    return (seed * 1_000_003 + zlib.crc32(purpose.encode())) % 2**63


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _process_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any worker thread
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def default_mode(directory: bool = False) -> int:
    """The permissions ``open``/``mkdir`` would give a new file (directory) under the umask.

    Atomic writes go through ``mkstemp``/``mkdtemp``, which create private (0600/0700) entries;
    outputs are given these ordinary permissions before they are moved into place, so a
    repaired model or report is as readable as any other file the user writes.
    """
    return (0o777 if directory else 0o666) & ~_UMASK


def write_atomic(path: str | Path, content: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``content`` to ``path`` completely or not at all (temporary file + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode(encoding) if isinstance(content, str) else content)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _give_default_modes(root: Path) -> None:
    """mkdtemp's folder is private, and so are files some writers create inside it."""
    os.chmod(root, default_mode(directory=True))
    for entry in root.rglob("*"):
        if entry.is_symlink():
            continue
        os.chmod(entry, default_mode(directory=entry.is_dir()))


@contextmanager
def atomic_directory(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` only if the block completes.

    An interrupted run (Ctrl-C, crash) leaves no ``out_dir`` behind, so nothing half-written
    ever looks complete. An existing ``out_dir`` is kept unless ``force``; with ``force`` it is
    replaced only after the new one is complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise TrojanPruneError(f"{out_dir} already exists; choose another --out or pass --force "
                               f"to replace it")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
    except OSError as exc:
        raise TrojanPruneError(f"cannot write to {parent}: {exc.strerror}; choose a writable --out") from None
    try:
        yield tmp
        _give_default_modes(tmp)
        if out_dir.exists():
            old = parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for a model with the older hook-based weight_norm or
    spectral_norm, or a ``torch.nn.utils.prune`` mask, whose last forward ran with gradients:
    their computed weight is then a non-leaf tensor, which copy.deepcopy refuses. The hook
    recomputes it at every forward, so the copy starts from a detached one; the model keeps
    its own."""
    memo = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            name = getattr(hook, "name", getattr(hook, "_tensor_name", None))
            computed = getattr(module, name, None) if isinstance(name, str) else None
            if isinstance(computed, torch.Tensor) and computed.grad_fn is not None:
                memo[id(computed)] = computed.detach().clone()
    return copy.deepcopy(model, memo)
