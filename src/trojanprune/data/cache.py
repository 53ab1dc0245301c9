"""On-disk cache of decoded datasets, so that JPEG/PNG archives are decoded only once.

A cache entry is one uncompressed ``.npz`` (uint8 images, int64 labels, class names) in
:func:`~trojanprune.data.paths.cache_dir`. Its file name carries a hash of everything that
determines the decoded arrays (source path, size and mtime, split, image size, channels, the
format version below), so a changed source or option simply misses and is rebuilt. Files are
written to a temporary name and moved into place with ``os.replace``, so a crash or two
concurrent runs never leave a half-written entry under the final name. The cache is an
optimization only: when it cannot be read or written, loading still works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .paths import cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class DecodedArrays:
    """What a loader produces before it becomes an ImageDataset."""

    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]


def source_fingerprint(path: Path) -> dict:
    """Identity of a source file or folder: resolved path plus size and mtime of its files."""
    path = Path(path).resolve()
    if path.is_file():
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    digest = hashlib.sha256()
    count = 0
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            rel = os.path.relpath(os.path.join(folder, name), path)
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            count += 1
    return {"path": str(path), "files": count, "listing": digest.hexdigest()}


def cache_path(stem: str, key: dict) -> Path:
    """Cache file for ``key``; ``stem`` only makes the folder readable to a person."""
    blob = json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    safe_stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)[:60]
    return cache_dir() / f"{safe_stem}-{digest}.npz"


def _read(path: Path) -> DecodedArrays | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = DecodedArrays(npz["images"], npz["labels"].astype(np.int64),
                                   [str(c) for c in npz["classes"]])
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        log.warning("ignoring unreadable cache file %s (%s); decoding again", path, exc)
        return None
    if arrays.images.dtype != np.uint8 or arrays.images.ndim != 4 or \
            arrays.labels.shape != (arrays.images.shape[0],):
        log.warning("ignoring malformed cache file %s; decoding again", path)
        return None
    return arrays


def _write(path: Path, arrays: DecodedArrays) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        log.warning("cannot write the data cache in %s (%s); set TROJANPRUNE_CACHE to a "
                    "writable folder to avoid decoding again next time", path.parent, exc)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=arrays.images, labels=arrays.labels,
                     classes=np.array(arrays.classes, dtype=str))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared by users
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write the data cache %s (%s)", path, exc)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def load_or_build(stem: str, key: dict, build: Callable[[], DecodedArrays],
                  use_cache: bool = True) -> tuple[DecodedArrays, Path | None, bool]:
    """Cached arrays for ``key`` or ``build()`` them and store them.

    Returns ``(arrays, cache file or None, whether it was a cache hit)``.
    """
    if not use_cache:
        return build(), None, False
    path = cache_path(stem, key)
    cached = _read(path)
    if cached is not None:
        return cached, path, True
    arrays = build()
    _write(path, arrays)
    return arrays, path, False
