"""CIFAR-10 in its official python format (torchvision's ``cifar-10-batches-py``).

The folder holds ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``:
pickled dicts whose ``data`` is a uint8 (N, 3072) array already in CHW order and whose
``labels`` is a list of ints. They are read with the numpy-only unpickler, from the folder or
straight out of the downloaded ``cifar-10-python.tar.gz``.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from .cache import DecodedArrays
from .safe_pickle import load_numpy_pickle

BATCH_FOLDER = "cifar-10-batches-py"
SPLIT_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def _key(d: dict, name: str):
    """Batches pickled by Python 2 have str keys under latin1, bytes keys under 'bytes'."""
    if name in d:
        return d[name]
    return d.get(name.encode())


def _parse_batches(read: Callable[[str], bytes | None], split: str, where: str) -> DecodedArrays:
    images, labels = [], []
    for file_name in SPLIT_FILES[split]:
        data = read(file_name)
        if data is None:
            raise DataError(f"{where}: {file_name} is missing; a complete {BATCH_FOLDER} folder "
                            f"has {', '.join(SPLIT_FILES['train'] + SPLIT_FILES['test'])}")
        batch = load_numpy_pickle(data, f"{where}/{file_name}")
        pixels = _key(batch, "data") if isinstance(batch, dict) else None
        batch_labels = _key(batch, "labels") if isinstance(batch, dict) else None
        if pixels is None or batch_labels is None:
            raise DataError(f"{where}/{file_name}: not a CIFAR-10 batch (no data/labels entries)")
        pixels = np.asarray(pixels)
        batch_labels = np.asarray(batch_labels, dtype=np.int64)
        if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32 \
                or batch_labels.shape != (pixels.shape[0],):
            raise DataError(f"{where}/{file_name}: expected uint8 data of shape (N, 3072) and N "
                            f"labels, got {pixels.dtype} {pixels.shape} and {batch_labels.shape}")
        images.append(pixels.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    classes = list(CIFAR10_CLASSES)
    meta_bytes = read("batches.meta")
    if meta_bytes is not None:
        meta = load_numpy_pickle(meta_bytes, f"{where}/batches.meta")
        names = _key(meta, "label_names") if isinstance(meta, dict) else None
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    all_labels = np.concatenate(labels)
    if all_labels.min() < 0 or all_labels.max() >= len(classes):
        raise DataError(f"{where}: labels outside 0..{len(classes) - 1}")
    return DecodedArrays(np.ascontiguousarray(np.concatenate(images)), all_labels, classes)


def read_batch_folder(folder: Path, split: str) -> DecodedArrays:
    """Read one split from an extracted ``cifar-10-batches-py`` folder."""
    def read(name: str) -> bytes | None:
        path = folder / name
        return path.read_bytes() if path.is_file() else None

    return _parse_batches(read, split, str(folder))


def tar_has_batches(path: Path) -> bool:
    """Whether a tar archive is torchvision's ``cifar-10-python.tar.gz`` (pickled batches).

    Looks at the first few members only, so that checking a 60,000-image JPEG archive does
    not cost a pass over it (the pickled release has 8 members in one folder).
    """
    try:
        with tarfile.open(path, "r:*") as tar:
            for count, member in enumerate(tar):
                name = Path(member.name).name
                if BATCH_FOLDER in member.name or name in ("batches.meta", "data_batch_1"):
                    return True
                if count >= 10:
                    return False
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable tar archive ({exc})") from exc
    return False


def read_batch_tar(path: Path, split: str) -> DecodedArrays:
    """Read one split straight from ``cifar-10-python.tar.gz`` without extracting it."""
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

            def read(name: str) -> bytes | None:
                member = members.get(name)
                f = tar.extractfile(member) if member is not None else None
                return f.read() if f is not None else None

            return _parse_batches(read, split, str(path))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable tar archive ({exc})") from exc
