"""SIG: a horizontal sinusoidal signal superimposed on the image (clean-label).

Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without Label
Poisoning", ICIP 2019, arXiv 1902.11237.

    x'[c, i, j] = clip(x[c, i, j] + delta / 255 * sin(2 * pi * j * f / W), 0, 1)

The signal varies along the columns j only (the same in every row and channel), as in
BackdoorBench's ``utils/bd_img_transform/sig.py``. Defaults follow BackdoorBench
(``config/attack/sig/default.yaml`` and the per-dataset yamls): delta = 40 (on the 0-255 scale)
and f = 6, all-to-one, target 0. The paper trains with delta = 20 (older BackdoorBench and NAD
code use 20 as well); pass ``delta=20`` for that setting.

Clean-label: :meth:`Attack.poison` adds the signal only to target-class training images and
never changes a label; the poison rate is still counted over *all* training images
(BackdoorBench), so rate 0.1 on CIFAR-10 (10% per class) poisons the whole target class, and a
higher rate is capped with a warning. ``mode="all-to-all"`` is not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Attack


@dataclass
class SIGOptions:
    """Options of :class:`SIG`.

    delta: amplitude on the 0-255 scale (BackdoorBench: 40; Barni et al. 2019 train with 20).
    f: number of periods across the image width (6).
    """

    delta: float = 40.0
    f: float = 6.0


class SIG(Attack):
    name = "sig"
    Options = SIGOptions
    clean_label = True

    def _build(self) -> None:
        for field in ("delta", "f"):
            value = getattr(self.options, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"sig: {field} must be a number >= 0, got {value!r}")
            setattr(self.options, field, float(value))
        w = self.image_shape[2]
        j = torch.arange(w, dtype=torch.float64)
        # computed in float64 so that the float32 signal is the same on every machine
        signal = self.options.delta / 255 * torch.sin(2 * math.pi * j * self.options.f / w)
        #: (1, 1, 1, W) float: the additive signal, a function of the column only
        self.signal = signal.float().view(1, 1, 1, w)

    def _apply(self, x: Tensor) -> Tensor:
        return (x + self._on("signal", x)).clamp(0, 1)
