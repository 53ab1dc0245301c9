"""A user's model as the toolkit needs it, from the form it was trained in.

Every defense takes images in [0, 1] and reads logits. Models trained elsewhere often normalize
in the data pipeline (torchvision's ``Normalize``), return ``(logits, features)`` or a dict, or
end in softmax. :class:`Adapted` puts the missing pieces around the model, and the CLI builds it
from ``--input-mean/--input-std``, ``--output-key`` and ``--probabilities``. The user's model is
``.model``: its weights are saved in their own key layout, so a repaired model loads back into
the user's own code, and the run record keeps the adapter so that ``trojanprune eval`` rebuilds
the same function.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .normalize import Normalize
from .outputs import LogOf, select_output


class Adapted(nn.Module):
    """``out(model(normalize(x)))`` with each piece optional:

    Args:
        model: the user's model (named ``model.<name>`` in a repair's results).
        mean, std: the per-channel normalization the model was trained behind (both or neither).
        output_key: the logits' place in what the model returns (see
            :class:`~trojanprune.models.SelectOutput`).
        probabilities: the model returns probabilities; its log is taken (:class:`LogOf`).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, output_key: Any = None,
                 probabilities: bool = False):
        super().__init__()
        if (mean is None) != (std is None):
            raise ConfigError("input normalization needs both a mean and a std per channel")
        if mean is not None:
            if len(mean) != len(std) or not len(mean):
                raise ConfigError(f"input mean and std need one value per channel, got "
                                  f"{len(mean)} and {len(std)}")
            if any(float(s) <= 0 for s in std):
                raise ConfigError(f"input std must be positive, got {list(std)}")
        self.normalize = Normalize(mean, std) if mean is not None else nn.Identity()
        self.model = model
        self.output_key = output_key
        self.log = LogOf() if probabilities else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(self.normalize(x))
        if self.output_key is not None:
            out = select_output(out, self.output_key)
        return self.log(out)


__all__ = ["Adapted"]
