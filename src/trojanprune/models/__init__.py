"""Model registry: ``create(name, num_classes, in_channels)``, plus user-defined models.

Every model takes images in [0, 1] (normalization is its first layer) and returns logits.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .checkpoint import load_weights, load_model_def, build_user_model
from .lenet import LeNet5
from .normalize import Normalize, default_stats
from .resnet import PreActResNet18, ResNet20
from .vgg import VGGSmall

MODELS: Registry = Registry("architecture")
MODELS.register("vgg_small")(VGGSmall)
MODELS.register("resnet20")(ResNet20)
MODELS.register("preact_resnet18")(PreActResNet18)
MODELS.register("lenet5")(LeNet5)


def available() -> list[str]:
    return MODELS.available()


def create(name: str, num_classes: int, in_channels: int = 3, dataset: str | None = None,
           **kwargs) -> nn.Module:
    """A fresh model. ``dataset`` picks the normalization statistics (else 0.5/0.5)."""
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    cls = MODELS.get(name)
    mean, std = default_stats(in_channels, dataset)
    kwargs.setdefault("mean", mean)
    kwargs.setdefault("std", std)
    try:
        return cls(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for architecture {name!r}: {exc}") from None


__all__ = ["MODELS", "available", "create", "load_weights", "load_model_def",
           "build_user_model", "Normalize", "VGGSmall", "ResNet20", "PreActResNet18", "LeNet5"]
