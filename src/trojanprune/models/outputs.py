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
