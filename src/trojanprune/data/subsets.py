"""The defender's clean set and other seeded subsets of a dataset.

A defense may only see a small clean set drawn from the *training* split (BackdoorBench's
protocol); drawing it from the test split would leak the data the repair is judged on, so
:func:`clean_subset` refuses a dataset whose ``meta['split']`` is ``'test'``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, DataError
from .dataset import ImageDataset


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _stratified_counts(class_sizes: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` split over classes in proportion to their sizes (largest remainder, ties by index)."""
    total = int(class_sizes.sum())
    exact = class_sizes.double() * n / total
    counts = exact.floor().long()
    remainder = exact - counts
    order = sorted(range(len(class_sizes)), key=lambda c: (-float(remainder[c]), c))
    for c in order[: n - int(counts.sum())]:
        counts[c] += 1
    return torch.minimum(counts, class_sizes)


def clean_subset(dataset: ImageDataset, n: int | None = None, per_class: int | None = None,
                 seed: int = 0) -> ImageDataset:
    """A seeded clean set of ``n`` images (stratified by class) or exactly ``per_class`` each.

    ``per_class=1`` is the few-shot setting (one image per class). The images come in a
    seeded random order; the same dataset and seed always give the same subset.
    """
    if (n is None) == (per_class is None):
        raise ConfigError("clean_subset needs exactly one of n= (images in all) or per_class=")
    split = dataset.meta.get("split")
    if split == "test":
        raise DataError(f"{dataset.name}: the defender's clean data must come from the training "
                        f"split, never from the test split the repair is evaluated on; load "
                        f"split='train'")
    labels = dataset.labels
    class_sizes = torch.bincount(labels, minlength=dataset.num_classes)
    generator = _generator(seed)
    if per_class is not None:
        if per_class < 1:
            raise ConfigError(f"per_class must be at least 1, got {per_class}")
        short = [f"{dataset.classes[c]} ({int(class_sizes[c])})"
                 for c in range(dataset.num_classes) if class_sizes[c] < per_class]
        if short:
            raise DataError(f"{dataset.name}: per_class={per_class} but these classes have fewer "
                            f"images: {', '.join(short[:10])}{' ...' if len(short) > 10 else ''}")
        counts = torch.full_like(class_sizes, per_class)
    else:
        assert n is not None
        if not 1 <= n <= len(dataset):
            raise ConfigError(f"clean set size n must be between 1 and {len(dataset)} "
                              f"(the dataset's size), got {n}")
        counts = _stratified_counts(class_sizes, n)
    chosen = []
    for c in range(dataset.num_classes):
        members = torch.nonzero(labels == c).flatten()
        pick = torch.randperm(len(members), generator=generator)[: int(counts[c])]
        chosen.append(members[pick])
    index = torch.cat(chosen)
    index = index[torch.randperm(len(index), generator=generator)]
    subset = dataset.subset(index)
    subset.meta["clean_subset"] = {"n": n, "per_class": per_class, "seed": seed,
                                   "from_size": len(dataset)}
    return subset


def split_dataset(dataset: ImageDataset, fraction: float, seed: int = 0
                  ) -> tuple[ImageDataset, ImageDataset]:
    """Seeded stratified split into (``fraction`` of each class, the rest).

    E.g. ONP's held-out half of the clean set; both parts keep the dataset's meta (its split).
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"fraction must be strictly between 0 and 1, got {fraction}")
    generator = _generator(seed)
    first, second = [], []
    for c in range(dataset.num_classes):
        members = torch.nonzero(dataset.labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = int(round(len(members) * fraction))
        first.append(members[:cut])
        second.append(members[cut:])
    a, b = torch.cat(first), torch.cat(second)
    if len(a) == 0 or len(b) == 0:
        raise DataError(f"{dataset.name}: splitting {len(dataset)} images at {fraction} leaves "
                        f"one part empty")
    a = a[torch.randperm(len(a), generator=generator)]
    b = b[torch.randperm(len(b), generator=generator)]
    return dataset.subset(a), dataset.subset(b)
