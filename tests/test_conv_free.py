"""Models without any conv layer (an MLP; the same holds for an all-linear ViT-style head):
the defenses built around conv channels prune hidden linear neurons instead of refusing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trojanprune as tp
from trojanprune.errors import ConfigError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.LayerNorm(32), nn.GELU(),
                         nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g), torch.arange(n) % 10


def test_fine_pruning_prunes_the_last_hidden_linear_layer():
    result = tp.repair(_mlp(), _data(), method="fp", finetune_epochs=1)
    assert result.details["layer"] == "4" and result.details["layer_kind"] == "linear"
    assert all(name == "4" for name, _ in result.pruned)


def test_clp_scores_linear_neurons_when_there_is_no_conv():
    model = _mlp()
    with torch.no_grad():  # one neuron with an outlying weight row
        model[4].weight[3] *= 40
    result = tp.repair(model, _data(), method="clp")
    assert result.details["linear_because_no_conv"] is True
    assert ("4", 3) in result.pruned
    # data-free, the input shape cannot be read off a conv: say what to set
    with pytest.raises(ConfigError, match="input_shape"):
        tp.repair(model, None, method="clp")
    data_free = tp.repair(model, None, method="clp", input_shape="3,8,8")
    assert data_free.pruned == result.pruned


def test_shappruning_plays_hidden_neurons_when_there_is_no_conv():
    result = tp.repair(_mlp(), _data(20), method="shappruning", force=True, reverse_steps=20,
                       permutations=12, warmup=4)
    shapley = result.details["shapley"]
    assert shapley["players_kind"] == "linear" and shapley["layers"] == ["1", "4"]
