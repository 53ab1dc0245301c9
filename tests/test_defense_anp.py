"""ANP (Adversarial Neuron Pruning): removes a real backdoor, its neuron perturbation is the
paper's BatchNorm perturbation (generalized to other hook points), thresholds are chosen on
held-out clean data, bad inputs give clear errors, residual networks work."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import trojanprune as tp
from trojanprune.defenses.neuron_perturbation import NeuronMasks, anp_mask_scores
from trojanprune.engine import discover_units
from trojanprune.errors import ConfigError, DataError
from trojanprune.metrics import evaluate
from trojanprune.repair import to_clean_data

# The paper's 2000 iterations of batch 128 take about 7.5 minutes on one CPU core here (ASR
# 100% -> 3%, ACC -1.9 points); 800 iterations of batch 32 (about 50 s) get most of the way.
FAST = dict(iterations=800, batch_size=32)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _randomize_norms(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def test_anp_removes_the_backdoor(backdoor_case):
    case = backdoor_case
    state = _state(case.model)
    result = tp.repair(case.model, case.clean, method="anp", seed=0, **FAST)
    after = evaluate(result.model, case.test, case.attack)
    print("ANP", FAST, "before", case.before, "after", after, "pruned", len(result.pruned),
          "threshold", result.details["threshold"], f"{result.seconds:.1f}s")
    assert after["asr"] < 20, after
    assert case.before["acc"] - after["acc"] < 4, after
    assert _same_state(case.model, state), "the input model was modified"
    assert not any(m._forward_hooks for m in case.model.modules())

    d = result.details
    # the threshold is chosen on the held-out 20% of the defender's 500 clean images only
    assert d["selection"] == "held-out"
    assert d["holdout_images"] == 100 and d["optimization_images"] == 400
    assert_walk_choice(d, result.pruned)
    assert result.pruned
    assert result.total_units == sum(len(v) for v in d["mask_values"].values())
    assert result.evaluations > 0
    json.dumps(result.to_dict())


def assert_walk_choice(d, pruned):
    """The automatic rule: the longest prefix of the lowest-mask-first order such that it and
    every shorter prefix stay within 2 of the 100 held-out images of the unpruned accuracy;
    the pruned units are the lowest masks, listed in that order."""
    curve = d["holdout_curve"]
    base = round(d["holdout_acc_unpruned"] * 100)  # in images of the 100 held out
    within = [base - round(a * 100) <= 2 for a in curve["accuracy"]]
    n_ok = within.index(False) if False in within else len(within)
    assert len(pruned) == (curve["pruned"][n_ok - 1] if n_ok else 0)
    masks = d["mask_values"]
    values = [masks[g][c] for g, c in pruned]
    chosen = set(pruned)
    rest = [v for g, vals in masks.items() for c, v in enumerate(vals) if (g, c) not in chosen]
    assert values == sorted(values)
    if values:
        assert max(values) <= min(rest) + 1e-4
        assert d["threshold"] == pytest.approx(values[-1], abs=1e-4)  # mask_values: 4 decimals
        assert max(values) <= 0.9 + 1e-6


def _random_set(n=24, c=3, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, side, side, generator=g), torch.arange(n) % 10


@pytest.mark.parametrize("arch", ["vgg_small", "resnet20", "lenet5_nobn"])
def test_perturbation_is_the_papers_bn_perturbation(arch):
    """At a BN hook point the hook computes BN(weight * (m + delta), bias * (1 + xi)); at a
    conv/linear hook point (no BN) the same on its weights and bias; residual groups share one
    mask over all their hook points."""
    torch.manual_seed(0)
    if arch == "lenet5_nobn":
        model = tp.models.create("lenet5", 10, 1, batch_norm=False).eval()
        x = torch.rand(4, 1, 28, 28)
    else:
        model = _randomize_norms(tp.models.create(arch, 10, 3).eval())
        x = torch.rand(4, 3, 32, 32)
    units = discover_units(model, x)
    if arch == "resnet20":
        assert any(g.residual and len(g.hook_points) > 1 for g in units)
    g = torch.Generator().manual_seed(1)
    m = torch.rand(units.total, generator=g)
    delta = (torch.rand(units.total, generator=g) - 0.5) * 0.8
    xi = (torch.rand(units.total, generator=g) - 0.5) * 0.8
    plain = model(x)
    with torch.no_grad(), NeuronMasks(model, units) as nm:
        nm.mask.copy_(m)
        nm.weight_noise.copy_(delta)
        nm.bias_noise.copy_(xi)
        nm.perturbed = True
        perturbed = model(x)
        nm.perturbed = False
        masked = model(x)
    assert torch.equal(model(x), plain), "hooks must be removed"

    def reference(weight_coeff, bias_coeff):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for grp, o in zip(units, units.offsets):
                for point in grp.hook_points:
                    mod = ref.get_submodule(point)
                    idx = torch.tensor(grp.channels_at(point))
                    w = weight_coeff[o:o + grp.size]
                    mod.weight[idx] *= w.view(-1, *[1] * (mod.weight.dim() - 1))
                    if mod.bias is not None:
                        mod.bias[idx] *= bias_coeff[o:o + grp.size]
            return ref(x)

    assert torch.allclose(perturbed, reference(m + delta, 1 + xi), atol=1e-4)
    assert torch.allclose(masked, reference(m, torch.ones_like(m)), atol=1e-4)


def test_anp_on_resnet20_through_residual_groups():
    torch.manual_seed(0)
    model = tp.models.create("resnet20", 10, 3).eval()
    x, y = _random_set()
    state = _state(model)
    result = tp.repair(model, (x, y), method="anp", seed=0, iterations=3, batch_size=8)
    assert _same_state(model, state)
    units = discover_units(model, x)
    masks = result.details["mask_values"]
    assert set(masks) == set(units.names)
    residual = [g.name for g in units if g.residual]
    assert residual and all(len(masks[n]) == units[n].size for n in residual)
    values = torch.tensor([v for vals in masks.values() for v in vals])
    assert ((values >= 0) & (values <= 1)).all() and (values < 1).any()
    assert result.model(x).shape == (len(x), 10)


def test_anp_mask_scores_probe_is_clean_and_deterministic():
    torch.manual_seed(0)
    model = _randomize_norms(tp.models.create("vgg_small", 10, 3).eval())
    x, y = _random_set()
    clean = to_clean_data((x, y), 10, "cpu")
    units = discover_units(model, x)
    state = _state(model)
    model.train()  # the probe must restore train/eval flags too
    opts = {"iterations": 4, "batch_size": 8}
    scores, evaluations = anp_mask_scores(model, units, clean, opts, seed=3)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert _same_state(model, state), "the probe changed weights or BatchNorm statistics"
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    assert scores.shape == (units.total,) and ((scores >= 0) & (scores <= 1)).all()
    assert evaluations == 4  # 4 iterations x 3 forward passes x 8 images / 24 images
    again, _ = anp_mask_scores(model, units, clean, opts, seed=3)
    assert torch.equal(scores, again)


def test_anp_fixed_threshold_and_prune_ratio():
    torch.manual_seed(0)
    model = tp.models.create("lenet5", 10, 1, input_size=16).eval()
    x, y = _random_set(40, 1, 16)
    fixed = tp.repair(model, (x, y), method="anp", seed=0, iterations=5, batch_size=16,
                      threshold="0.9")  # CLI-style string
    d = fixed.details
    assert d["selection"] == "fixed threshold" and d["threshold"] == 0.9
    assert d["holdout_images"] == 0 and d["optimization_images"] == 40
    expected = sorted((g, c) for g, vals in d["mask_values"].items() for c, v in enumerate(vals)
                      if v <= 0.9 + 1e-4)
    assert sorted(fixed.pruned) == expected
    ratio = tp.repair(model, (x, y), method="anp", seed=0, iterations=5, batch_size=16,
                      prune_ratio=0.25)
    assert len(ratio.pruned) == round(0.25 * ratio.total_units)
    assert ratio.details["selection"] == "prune_ratio"


@pytest.mark.parametrize("options,match", [
    (dict(threshold=0.2, prune_ratio=0.1), "not both"),
    (dict(threshold=1.5), "threshold"),
    (dict(holdout=0), "held-out"),
    (dict(eps=-0.1), "eps"),
    (dict(iterations=0), "iterations"),
    (dict(alpha=2), "alpha"),
    (dict(threshold="abc"), "threshold"),
    (dict(no_such_option=1), "unknown option"),
])
def test_anp_bad_options(options, match):
    model = tp.models.create("lenet5", 10, 1, input_size=16).eval()
    x, y = _random_set(20, 1, 16)
    with pytest.raises(ConfigError, match=match):
        tp.repair(model, (x, y), method="anp", **options)


class _NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = tp.models.create("lenet5", 10, 1, input_size=16)

    def forward(self, x):
        return self.inner(x) * float("nan")


def test_anp_nan_is_a_data_error_and_model_untouched():
    torch.manual_seed(0)
    model = _NaNModel().eval()
    state = _state(model)
    x, y = _random_set(20, 1, 16)
    with pytest.raises(DataError, match="NaN or infinity"):
        tp.repair(model, (x, y), method="anp", iterations=5, batch_size=8)
    assert _same_state(model, state)
