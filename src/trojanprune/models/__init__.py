"""Model registry: ``create(name, num_classes, in_channels)``, plus user-defined models.

Every model takes images in [0, 1] (normalization is its first layer) and returns logits.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .adapter import Adapted
from .checkpoint import load_weights, load_model_def, build_user_model
from .lenet import LeNet5
from .normalize import Normalize, default_stats
from .outputs import LogOf, SelectOutput
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
           input_size: int | None = None, **kwargs) -> nn.Module:
    """A fresh model. ``dataset`` picks the normalization statistics (else 0.5/0.5);
    ``input_size`` reaches architectures whose classifier depends on it (LeNet-5)."""
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    cls = MODELS.get(name)
    mean, std = default_stats(in_channels, dataset)
    kwargs.setdefault("mean", mean)
    kwargs.setdefault("std", std)
    if input_size is not None and "input_size" in inspect.signature(cls).parameters:
        kwargs.setdefault("input_size", input_size)
    try:
        return cls(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for architecture {name!r}: {exc}") from None


def arch_kwargs(name: str, image_shape, dataset: str | None = None, **extra) -> dict:
    """The constructor arguments that rebuild ``name`` for images of ``image_shape``: the
    dataset's normalization and, for architectures that need it, the input size."""
    in_channels = image_shape[0]
    mean, std = default_stats(in_channels, dataset)
    kwargs = {"mean": list(mean), "std": list(std)}
    if "input_size" in inspect.signature(MODELS.get(name)).parameters:
        kwargs["input_size"] = image_shape[1]
    return {**kwargs, **extra}


__all__ = ["MODELS", "available", "create", "load_weights", "load_model_def",
           "build_user_model", "arch_kwargs", "Adapted", "Normalize", "LogOf", "SelectOutput", "VGGSmall", "ResNet20", "PreActResNet18", "LeNet5"]
