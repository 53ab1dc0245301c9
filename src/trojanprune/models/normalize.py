"""Normalization as the model's first layer, so triggers and defenses work in pixel space."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# Per-dataset channel statistics (the values BackdoorBench uses for CIFAR-10 and MNIST).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "gtsrb": ((0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669)),
    "mnist": ((0.1307,), (0.3081,)),
}


class Normalize(nn.Module):
    """(x - mean) / std per channel. Buffers, not parameters: no defense should prune or train it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def default_stats(in_channels: int, dataset: str | None = None):
    """The dataset's statistics when known and matching, else 0.5/0.5 (maps [0,1] to [-1,1])."""
    if dataset and dataset in DATASET_STATS and len(DATASET_STATS[dataset][0]) == in_channels:
        return DATASET_STATS[dataset]
    return (0.5,) * in_channels, (0.5,) * in_channels
