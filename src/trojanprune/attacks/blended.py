"""Blended: a full-image pattern mixed into the image, x' = (1 - alpha) x + alpha p.

Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", arXiv 1712.05526, 2017 (the blended injection strategy; its blend keys are a
Hello-Kitty image and a random-noise image).

Defaults follow BackdoorBench (``config/attack/blended/default.yaml``): alpha 0.2 for training
and testing, all-to-one, target 0. BackdoorBench blends ``resource/blended/hello_kitty.jpeg``,
which we do not ship (it is a copyrighted picture). Our default key is Chen et al.'s other one:
a random uniform-noise image (each pixel and channel an independent integer level 0..255),
drawn from the attack's ``seed``. To reproduce BackdoorBench exactly, pass that image file as
``pattern_path``; it is resized to the attack's H x W (bilinear, as BackdoorBench's
``transforms.Resize``) and converted to 1 (grayscale) or 3 (RGB) channels.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Attack


@dataclass
class BlendedOptions:
    """Options of :class:`Blended`.

    alpha: blend ratio in [0, 1] (BackdoorBench: 0.2, train and test).
    pattern_path: an image file to blend (BackdoorBench: hello_kitty.jpeg); None draws a fixed
        uniform-noise pattern from the seed (Chen et al. 2017's random-noise key).
    """

    alpha: float = 0.2
    pattern_path: Optional[str] = None


class Blended(Attack):
    name = "blended"
    Options = BlendedOptions

    def _build(self) -> None:
        alpha = self.options.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ConfigError(f"blended: alpha must be a number in [0, 1], got {alpha!r}")
        self.options.alpha = float(alpha)
        c, h, w = self.image_shape
        if self.options.pattern_path is None:
            self._pattern_sha256 = None
            gen = torch.Generator().manual_seed(self.seed)
            pattern = torch.randint(0, 256, (c, h, w), generator=gen).float().div_(255)
        else:
            self.options.pattern_path = str(self.options.pattern_path)
            pattern, self._pattern_sha256 = _load_pattern(self.options.pattern_path, c, h, w)
        #: (C, H, W) float in [0, 1]: the blend key
        self.pattern = pattern

    def _apply(self, x: Tensor) -> Tensor:
        alpha = self.options.alpha
        # clamp only guards float rounding: a convex mix of [0, 1] values stays in [0, 1]
        return torch.lerp(x, self._on("pattern", x).expand_as(x), alpha).clamp(0, 1)

    def _extra_config(self) -> dict:
        return {"pattern_sha256": self._pattern_sha256} if self._pattern_sha256 else {}

    def _check_config(self, d: dict) -> None:
        recorded = d.get("pattern_sha256")
        if recorded and recorded != self._pattern_sha256:
            raise ConfigError(f"blended: pattern file {self.options.pattern_path} has changed "
                              f"since the run was recorded (sha256 {self._pattern_sha256[:12]}... "
                              f"!= {recorded[:12]}...); restore the original image")


def _load_pattern(path: str, c: int, h: int, w: int) -> tuple[Tensor, str]:
    from PIL import Image, UnidentifiedImageError

    if c not in (1, 3):
        raise ConfigError(f"blended: pattern_path needs 1- or 3-channel images, not {c}; "
                          f"omit pattern_path to use a noise pattern")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"blended: cannot read pattern image {path}: {exc.strerror}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
            array = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"blended: {path} is not a readable image ({exc})") from None
    pattern = array.view(h, w, c).permute(2, 0, 1).float().div_(255).contiguous()
    return pattern, hashlib.sha256(data).hexdigest()
