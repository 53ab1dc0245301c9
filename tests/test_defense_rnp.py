"""RNP (Reconstructive Neuron Pruning): removes a real backdoor, unlearns to the paper's clean
threshold, chooses its threshold on held-out clean data, bad inputs give clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import trojanprune as tp
from test_defense_anp import assert_walk_choice
from trojanprune.engine import discover_units
from trojanprune.errors import ConfigError, DataError
from trojanprune.metrics import evaluate


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _random_set(n=24, c=3, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, side, side, generator=g), torch.arange(n) % 10


def test_rnp_with_the_papers_threshold_removes_the_backdoor(backdoor_case):
    """The paper's rule (prune masks <= 0.2) removes the backdoor. On this narrow MNIST model
    the recovered masks also catch clean-critical units, so it costs clean accuracy (about 18
    points here); the bound below only catches a model that is broken outright."""
    case = backdoor_case
    state = _state(case.model)
    result = tp.repair(case.model, case.clean, method="rnp", seed=0, threshold=0.2)
    after = evaluate(result.model, case.test, case.attack)
    d = result.details
    print("RNP threshold=0.2: before", case.before, "after", after, "pruned", len(result.pruned),
          "unlearn", d["unlearn"], f"{result.seconds:.1f}s")
    assert after["asr"] < 20, after
    assert case.before["acc"] - after["acc"] < 30, after
    assert _same_state(case.model, state), "the input model was modified"
    assert not any(m._forward_hooks for m in case.model.modules())
    # unlearning ran until the epoch's clean accuracy fell to the paper's 0.2
    assert d["unlearn"]["reached_threshold"] and d["unlearn"]["clean_acc"][-1] <= 0.2
    assert max(d["unlearn"]["clean_acc"]) > 0.9
    assert d["selection"] == "fixed threshold" and d["holdout_images"] == 0
    assert d["optimization_images"] == len(case.clean)
    expected = sorted((g, c) for g, vals in d["mask_values"].items() for c, v in enumerate(vals)
                      if v <= 0.2 + 1e-4)
    assert sorted(result.pruned) == expected
    json.dumps(result.to_dict())


def test_rnp_default_threshold_is_chosen_on_held_out_clean_data(backdoor_case):
    """The default rule never trades more than acc_tolerance of held-out accuracy; it is decided
    on 20% of the defender's images (the test set is never seen by the defense)."""
    case = backdoor_case
    result = tp.repair(case.model, case.clean, method="rnp", seed=0)
    after = evaluate(result.model, case.test, case.attack)
    d = result.details
    print("RNP default: after", after, "pruned", len(result.pruned), "threshold", d["threshold"],
          d["reason"])
    assert case.before["acc"] - after["acc"] < 4, after
    assert d["selection"] == "held-out"
    assert d["holdout_images"] == 100 and d["optimization_images"] == 400
    assert_walk_choice(d, result.pruned)
    if d["threshold"] is None:
        assert result.pruned == []


def test_rnp_on_resnet20_with_fixed_rules():
    torch.manual_seed(0)
    model = tp.models.create("resnet20", 10, 3).eval()
    x, y = _random_set()
    state = _state(model)
    result = tp.repair(model, (x, y), method="rnp", seed=0, unlearn_epochs=2, recover_epochs=2,
                       batch_size=8, prune_ratio=0.1)
    assert _same_state(model, state)
    units = discover_units(model, x)
    assert set(result.details["mask_values"]) == set(units.names)
    assert len(result.pruned) == round(0.1 * units.total)
    assert result.details["selection"] == "prune_ratio" and result.details["holdout_images"] == 0
    fixed = tp.repair(model, (x, y), method="rnp", seed=0, unlearn_epochs=1, recover_epochs=1,
                      batch_size=8, threshold=0.95)
    assert fixed.details["threshold"] == 0.95


@pytest.mark.parametrize("options,match", [
    (dict(threshold=0.2, prune_ratio=0.1), "not both"),
    (dict(prune_ratio=1.0), "prune_ratio"),
    (dict(holdout=0), "held-out"),
    (dict(unlearn_lr=0), "unlearn_lr"),
    (dict(clean_threshold=1.5), "clean_threshold"),
    (dict(recover_epochs=0), "recover_epochs"),
    (dict(no_such_option=1), "unknown option"),
])
def test_rnp_bad_options(options, match):
    model = tp.models.create("lenet5", 10, 1, input_size=16).eval()
    x, y = _random_set(20, 1, 16)
    with pytest.raises(ConfigError, match=match):
        tp.repair(model, (x, y), method="rnp", **options)


class _NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = tp.models.create("lenet5", 10, 1, input_size=16)

    def forward(self, x):
        return self.inner(x) * float("nan")


def test_rnp_nan_is_a_data_error_and_model_untouched():
    torch.manual_seed(0)
    model = _NaNModel().eval()
    state = _state(model)
    x, y = _random_set(20, 1, 16)
    with pytest.raises(DataError, match="NaN or infinity"):
        tp.repair(model, (x, y), method="rnp", unlearn_epochs=2, recover_epochs=2, batch_size=8)
    assert _same_state(model, state)


def test_rnp_exploding_unlearning_is_a_data_error():
    """A learning rate far too large makes the ascent overflow: a clear DataError, not NaN masks."""
    torch.manual_seed(0)
    model = tp.models.create("lenet5", 10, 1, input_size=16).eval()
    x, y = _random_set(40, 1, 16)
    with pytest.raises(DataError, match="NaN or infinity"):
        tp.repair(model, (x, y), method="rnp", unlearn_lr=1e30, clean_threshold=0.0,
                  unlearn_epochs=5, recover_epochs=1, batch_size=8)


def test_rnp_clips_the_ascent_so_a_network_without_normalization_survives_it():
    """LeNet-5 has no normalization layer: at unlearn_lr 0.1 the unclipped ascent drives the
    logits to overflow and the masks cannot be recovered; with the gradient clipped to the
    official code's max_norm (the default) the repair completes with finite masks."""
    x, y = _random_set(60, 1, 16)
    options = dict(unlearn_lr=0.1, clean_threshold=0.0, unlearn_epochs=10, recover_epochs=1,
                   batch_size=8)
    torch.manual_seed(0)
    model = tp.models.create("lenet5", 10, 1, input_size=16).eval()
    with pytest.raises(DataError, match="NaN or infinity"):
        tp.repair(model, (x, y), method="rnp", unlearn_clip=0, **options)
    result = tp.repair(model, (x, y), method="rnp", **options)
    masks = [v for vals in result.details["mask_values"].values() for v in vals]
    assert all(0.0 <= v <= 1.0 for v in masks)
    assert result.details["unlearn"]["epochs"] == 10 and result.details["unlearn"]["stopped"] is None
