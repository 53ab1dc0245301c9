"""Output adapters for models that do not return logits."""

from __future__ import annotations

import torch
from torch import nn


class LogOf(nn.Module):
    """log(p) of a model's probabilities: logits up to a per-image constant, which softmax,
    cross-entropy, argmax and logit margins ignore. Put it after a model that ends in softmax:
    ``nn.Sequential(model, LogOf())``."""

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return p.clamp_min(1e-12).log()


class SelectOutput(nn.Module):
    """The logits of a model that returns more than them: ``out[key]`` of a tuple, list or dict,
    or ``out.key`` of an object (e.g. ``"logits"`` of a Hugging Face output). Repair
    ``SelectOutput(model, 0)`` for a model returning ``(logits, features)``; the wrapped model
    is ``.model``, its modules named ``model.<name>`` in the result."""

    def __init__(self, model: nn.Module, key=0):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_output(self.model(x), self.key)

    def extra_repr(self) -> str:
        return f"key={self.key!r}"


def select_output(out, key):
    """``out[key]`` of a tuple, list or dict, ``out.key`` of another object for a string key."""
    if isinstance(key, str) and not isinstance(out, dict):
        return getattr(out, key)
    return out[key]
