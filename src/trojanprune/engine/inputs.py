"""An input to trace a model with when a defense has no images (data-free CLP, ShapPruning).

Tracing (unit discovery) and data synthesis need one input of the model's shape. Without
clean images it comes from the ``input_shape`` option, else it is probed: the first conv
layer's input channels at the common image sizes, first size the model runs on.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

# CIFAR/GTSRB, MNIST, then the usual ImageNet-style sizes.
PROBE_SIZES = (32, 28, 64, 224, 96, 128, 256, 16)


def parse_input_shape(text) -> tuple[int, int, int]:
    """``"3,32,32"``, ``"3x32x32"`` or a sequence of three positive ints -> (C, H, W)."""
    parts = list(text) if isinstance(text, (tuple, list)) else \
        [p for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input_shape must be C,H,W (e.g. 3,32,32), got {text!r}")
    return shape


def first_conv(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def probe_input(model: nn.Module, input_shape, device, who: str) -> tuple[torch.Tensor, str]:
    """One random input of the model's shape and where the shape came from ("input_shape
    option" or "probed"). ``who`` names the caller in the error when nothing fits."""
    if input_shape:
        shape = parse_input_shape(input_shape)
        x = torch.rand(1, *shape, device=device)
        if not runs_on(model, x):
            raise ConfigError(f"the model does not run on inputs of shape {shape} (input_shape)")
        return x, "input_shape option"
    conv = first_conv(model)
    if conv is not None:
        for side in PROBE_SIZES:
            x = torch.rand(1, conv.in_channels, side, side, device=device)
            if runs_on(model, x):
                return x, "probed"
        tried = f" (tried {conv.in_channels} channels and {', '.join(map(str, PROBE_SIZES))} pixels)"
    else:
        tried = " (it has no conv layer to read the input channels from)"
    raise ConfigError(f"{who} cannot tell the model's input shape{tried}; set the input_shape "
                      f"option, e.g. input_shape=3,32,32")


@torch.no_grad()
def runs_on(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` maps ``x`` to a (N, classes) tensor; train/eval flags are restored."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        out = model(x)
        return isinstance(out, torch.Tensor) and out.dim() == 2
    except Exception:  # noqa: BLE001 - any failure means "not this shape"
        return False
    finally:
        for m, flag in flags.items():
            m.training = flag
