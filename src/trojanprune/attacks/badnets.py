"""BadNets: a small square patch stamped onto the image.

Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
Supply Chain", arXiv 1708.06733, 2017.

Defaults follow BackdoorBench (``resource/badnet/generate_white_square.py`` with its defaults,
``config/attack/badnet/default.yaml``): a 3x3 white square in the bottom-right corner, touching
both edges, for 32x32 images; all-to-one, target 0. BackdoorBench resizes that 32x32 trigger
image for other resolutions; we keep the patch size explicit instead (3 px also on 28x28 MNIST),
so a run's config says exactly what was stamped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Attack

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
COLOURS = ("white", "black", "checkerboard")


@dataclass
class BadNetsOptions:
    """Options of :class:`BadNets`.

    patch_size: side of the square in pixels (BackdoorBench: 3 for 32x32 images).
    position: "bottom-right" (BackdoorBench), "bottom-left", "top-right", "top-left", "center",
        or an explicit ``(row, col)`` of the patch's top-left pixel.
    colour: "white" (BackdoorBench's white square), "black", "checkerboard" (white where
        row + col inside the patch is even, black elsewhere, as BackdoorBench's
        ``generate_grid.py``), or per-channel values in [0, 1] (one value, or one per channel).
    """

    patch_size: int = 3
    position: Union[str, Sequence[int]] = "bottom-right"
    colour: Union[str, float, Sequence[float]] = "white"


class BadNets(Attack):
    """Square-patch trigger; the only attack here that also supports ``mode="all-to-all"``."""

    name = "badnets"
    Options = BadNetsOptions
    supports_all_to_all = True

    def _build(self) -> None:
        c, h, w = self.image_shape
        size = self.options.patch_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"badnets: patch_size must be a positive integer, got {size!r}")
        if size > min(h, w):
            raise ConfigError(f"badnets: patch_size {size} does not fit {h}x{w} images")
        row, col = self._top_left(h, w, size)
        if not isinstance(self.options.position, str):
            self.options.position = [row, col]  # plain ints, JSON-able as given back by config()

        patch = self._colour_block(c, size)
        mask = torch.zeros(1, 1, h, w, dtype=torch.bool)
        mask[..., row:row + size, col:col + size] = True
        pattern = torch.zeros(1, c, h, w)
        pattern[..., row:row + size, col:col + size] = patch
        #: (1, 1, H, W) bool: where the patch replaces the image
        self.mask = mask
        #: (1, C, H, W) float: the patch's values (zero outside the mask)
        self.pattern = pattern

    def _top_left(self, h: int, w: int, size: int) -> tuple[int, int]:
        pos = self.options.position
        if isinstance(pos, str):
            named = {"bottom-right": (h - size, w - size), "bottom-left": (h - size, 0),
                     "top-right": (0, w - size), "top-left": (0, 0),
                     "center": ((h - size) // 2, (w - size) // 2)}
            key = pos.lower().replace("_", "-").replace("centre", "center")
            if key not in named:
                raise ConfigError(f"badnets: unknown position {pos!r}; valid: "
                                  f"{', '.join(POSITIONS)}, or (row, col)")
            return named[key]
        try:
            row, col = (int(v) for v in pos)
        except (TypeError, ValueError):
            raise ConfigError(f"badnets: position must be a name ({', '.join(POSITIONS)}) or "
                              f"(row, col), got {pos!r}") from None
        if not (0 <= row <= h - size and 0 <= col <= w - size):
            raise ConfigError(f"badnets: a {size}px patch at (row, col) = ({row}, {col}) does "
                              f"not fit {h}x{w} images")
        return row, col

    def _colour_block(self, c: int, size: int) -> Tensor:
        colour = self.options.colour
        if isinstance(colour, str):
            key = colour.lower()
            if key == "white":
                return torch.ones(c, size, size)
            if key == "black":
                return torch.zeros(c, size, size)
            if key in ("checkerboard", "grid"):
                ij = torch.arange(size)[:, None] + torch.arange(size)[None, :]
                return (ij % 2 == 0).float().expand(c, size, size).clone()
            raise ConfigError(f"badnets: unknown colour {colour!r}; valid: {', '.join(COLOURS)}, "
                              f"or per-channel values in [0, 1]")
        values = [colour] if isinstance(colour, (int, float)) else list(colour)
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ConfigError(f"badnets: colour values must be numbers, got {colour!r}") from None
        if len(values) not in (1, c) or not all(0.0 <= v <= 1.0 for v in values):
            raise ConfigError(f"badnets: colour needs 1 or {c} values in [0, 1] (divide 0-255 "
                              f"values by 255), got {colour!r}")
        # normalized so that config() is plain JSON and rebuilds the same patch
        self.options.colour = values[0] if isinstance(colour, (int, float)) else values
        values = values * c if len(values) == 1 else values
        return torch.tensor(values).view(c, 1, 1).expand(c, size, size).clone()

    def _apply(self, x: Tensor) -> Tensor:
        # where() copies patch values exactly (no blending arithmetic), and leaves x untouched
        return torch.where(self._on("mask", x), self._on("pattern", x), x)
