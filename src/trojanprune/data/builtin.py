"""The named datasets that live under the data root: CIFAR-10, GTSRB and MNIST.

Each loader looks in the usual places (the layout of ``shared/datasets``, torchvision's
download folders, an extracted ImageFolder) and, when nothing is there, raises a DataError
that says which file to put in which folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .cache import DecodedArrays
from .cifar_pickle import BATCH_FOLDER, read_batch_folder, read_batch_tar, tar_has_batches
from .dataset import ImageDataset
from .idx import read_idx
from .imagefolder import ARCHIVE_SUFFIXES, load_image_folder
from .imageops import ImageSize, resize_images

_HOW_TO_POINT = "or pass --data-dir / set TROJANPRUNE_DATA to the folder that has them"


def _archives(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name.lower().endswith(ARCHIVE_SUFFIXES))


def _has_split_folders(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def _from_arrays(arrays: DecodedArrays, name: str, split: str, size: ImageSize | None,
                 meta: dict) -> ImageDataset:
    images = resize_images(arrays.images, size)
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)),
                        torch.from_numpy(arrays.labels.astype(np.int64)), list(arrays.classes),
                        name, {"split": split, **meta})


def _from_folder(source: Path, name: str, split: str, size: ImageSize | None) -> ImageDataset:
    dataset = load_image_folder(source, split=split, image_size=size, name=name)
    dataset.meta["dataset"] = name
    return dataset


def load_cifar10(root: Path, split: str, size: ImageSize | None) -> ImageDataset:
    """CIFAR-10 from a JPEG/PNG ImageFolder tar, torchvision's pickled batches, or a folder."""
    folder = root / "cifar10"
    archives = [folder / "cifar10-jpeg.tar.gz", root / "cifar10-jpeg.tar.gz",
                *_archives(folder), *_archives(root / "CIFAR10"), root / "cifar-10-python.tar.gz"]
    for archive in dict.fromkeys(archives):  # ordered, without duplicates
        if not archive.is_file():
            continue
        if tar_has_batches(archive):
            return _from_arrays(read_batch_tar(archive, split), "cifar10", split, size,
                                {"source": str(archive), "format": "cifar-python"})
        return _from_folder(archive, "cifar10", split, size)
    for batches in (folder / BATCH_FOLDER, root / BATCH_FOLDER, root / "CIFAR10" / BATCH_FOLDER):
        if batches.is_dir():
            return _from_arrays(read_batch_folder(batches, split), "cifar10", split, size,
                                {"source": str(batches), "format": "cifar-python"})
    for extracted in (folder, root / "CIFAR10"):
        if _has_split_folders(extracted):
            return _from_folder(extracted, "cifar10", split, size)
    raise DataError(
        f"CIFAR-10 not found under {root}: put cifar10-jpeg.tar.gz (ImageFolder layout "
        f"train/<class>/*.jpg, test/<class>/*.jpg) in {folder}/, or torchvision's "
        f"{BATCH_FOLDER}/ folder (or cifar-10-python.tar.gz) in {root}/, {_HOW_TO_POINT}")


def load_gtsrb(root: Path, split: str, size: ImageSize | None) -> ImageDataset:
    """GTSRB (43 classes, folders 00-42) from its 32x32 PNG ImageFolder tar or folder."""
    folder = root / "gtsrb"
    candidates = [folder / "gtsrb32-png.tar.gz", *_archives(folder), *_archives(root / "GTSRB")]
    for archive in dict.fromkeys(candidates):
        if archive.is_file():
            return _from_folder(archive, "gtsrb", split, size)
    for extracted in (folder, root / "GTSRB"):
        if _has_split_folders(extracted):
            return _from_folder(extracted, "gtsrb", split, size)
    raise DataError(
        f"GTSRB not found under {root}: put gtsrb32-png.tar.gz (ImageFolder layout "
        f"train/<00-42>/*.png, test/<00-42>/*.png) in {folder}/, or extract it there, "
        f"{_HOW_TO_POINT}")


MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_idx(folders: list[Path], base: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / f"{base}.gz", folder / base):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(root: Path, split: str, size: ImageSize | None) -> ImageDataset:
    """MNIST from the four IDX files (gzip or not), torchvision's raw names."""
    folders = [root / "mnist", root / "MNIST" / "raw", root / "mnist" / "MNIST" / "raw",
               root / "mnist" / "raw", root]
    image_base, label_base = MNIST_FILES[split]
    image_file, label_file = _find_idx(folders, image_base), _find_idx(folders, label_base)
    if image_file is None or label_file is None:
        raise DataError(
            f"MNIST ({split}) not found under {root}: put {image_base}.gz and {label_base}.gz "
            f"(torchvision's raw names; the other split needs "
            f"{' and '.join(n + '.gz' for n in MNIST_FILES['test' if split == 'train' else 'train'])}"
            f") in {root / 'mnist'}/, {_HOW_TO_POINT}")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 \
            or labels.shape[0] != images.shape[0]:
        raise DataError(f"{image_file}, {label_file}: expected uint8 images (N, H, W) and N "
                        f"labels, got {images.dtype} {images.shape} and {labels.shape}")
    if labels.size and labels.max() > 9:
        raise DataError(f"{label_file}: labels outside 0..9")
    arrays = DecodedArrays(images[:, None].copy(), labels.astype(np.int64),
                           [str(d) for d in range(10)])
    return _from_arrays(arrays, "mnist", split, size,
                        {"source": str(image_file.parent), "format": "idx"})
