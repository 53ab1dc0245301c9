"""CLP (Channel Lipschitzness-based Pruning), data-free.

Measured on the ``backdoor_case`` fixture (BadNets on a narrow vgg_small, ACC 98.25, ASR 100),
< 0.1 s, deterministic (no data, no randomness):
- u = 3 (default): no channel exceeds mean + 3 std in any layer; nothing pruned, ACC 98.25,
  ASR 100. This 2-epoch, 16/32/64-wide MNIST model has no Lipschitz outlier at u = 3.
- u = 2.5: 3 channels (features.3 #6, features.7 #9, features.17 #37): ACC 95.9, ASR 20.9.
- u = 2: 8 channels: ACC 85.35, ASR 2.5.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trojanprune as tp
from trojanprune import metrics, models
from trojanprune.defenses.clp import channel_lipschitz_bound
from trojanprune.engine import discover_units
from trojanprune.errors import ConfigError


def reference_uclc(model: nn.Module) -> dict[str, torch.Tensor]:
    """The reference implementation's loop (modules in definition order, each BatchNorm folded
    into the conv defined before it, an SVD per channel), with BN's eps added."""
    out, conv = {}, None
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            std = (m.running_var + m.eps).sqrt()
            lips = []
            for idx in range(m.weight.shape[0]):
                w = conv[1].weight[idx].reshape(conv[1].weight.shape[1], -1) * (m.weight[idx] / std[idx]).abs()
                lips.append(torch.svd(w.detach())[1].max())
            out[conv[0]] = torch.stack(lips)
        elif isinstance(m, nn.Conv2d):
            conv = (name, m)
    return out


def test_clp_on_the_backdoor_fixture(backdoor_case):
    case = backdoor_case
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    result = tp.repair(case.model, None, method="clp")
    for k, v in case.model.state_dict().items():
        assert torch.equal(v, before[k]), f"input model changed: {k}"
    after = metrics.evaluate(result.model, case.test, case.attack)
    assert result.evaluations == 0 and result.details["data_used"] is False
    # Probed: 1 channel from the first conv; vgg_small runs at any size, the first tried is 32.
    assert result.details["input_shape"] == [1, 32, 32] and result.details["input_shape_from"] == "probed"
    # On this fixture few channels (if any) are outliers at u = 3: which ones is borderline and
    # moves with the CPU's floating point (none on one machine, 2 of 448 on another); the rule
    # itself is checked channel by channel against the reference below.
    assert len(result.pruned) <= 0.02 * result.total_units
    if not result.pruned:
        assert after == metrics.evaluate(case.model, case.test, case.attack)

    # UCLC as the reference code computes it, and the mean + u * std rule, channel by channel.
    ref = reference_uclc(case.model)
    groups = result.details["groups"]
    assert set(groups) == set(ref)
    for name, values in ref.items():
        layer = groups[name]["layers"][name]
        torch.testing.assert_close(torch.tensor(layer["uclc"]), values, rtol=1e-4, atol=1e-6)
        assert layer["bn"] is not None

    lower = tp.repair(case.model, None, method="clp", u=2.5)
    expected = []
    for name, values in ref.items():
        thr = values.mean() + 2.5 * values.std()
        expected += [(name, int(c)) for c in torch.nonzero(values > thr).flatten()]
    # how many channels pass u = 2.5 moves with the CPU's floating point, as above (3 on one
    # machine, 4 on another); what must hold is the rule, and that it prunes a few
    assert sorted(lower.pruned) == sorted(expected)
    assert 1 <= len(expected) <= 0.02 * lower.total_units
    low = metrics.evaluate(lower.model, case.test, case.attack)
    # measured: ASR 20.9% / ACC 95.9 on one machine (3 channels), 54.7% / 97.5 on another (4);
    # the unpruned fixture is at ~100%
    assert low["asr"] < 70 and low["acc"] > case.before["acc"] - 5, low

    # Given clean data, CLP ignores it (only its shape is used).
    with_data = tp.repair(case.model, case.clean, method="clp", u=2.5)
    assert with_data.pruned == lower.pruned and with_data.details["input_shape_from"] == "clean data"


def test_clp_on_resnet20_prunes_groups_and_planted_outliers():
    torch.manual_seed(0)
    model = models.create("resnet20", 10, 3).eval()
    with torch.no_grad():
        model.layer2[1].conv1.weight[5] *= 20  # a plain conv -> its own group
        model.layer1[1].conv2.weight[3] *= 20  # one producer of the stage-1 residual stream
    units = discover_units(model, torch.rand(1, 3, 32, 32), include_linear=False)
    result = tp.repair(model, None, method="clp")
    assert result.pruned, "no channel pruned"
    assert {g for g, _ in result.pruned} <= set(units.names)
    assert ("layer2.1.conv1", 5) in result.pruned
    stream = next(g for g in units if "layer1.1.conv2" in g.producers)
    assert stream.residual and (stream.name, 3) in result.pruned
    layers = result.details["groups"][stream.name]["layers"]
    assert set(layers) == set(stream.producers) and len(layers) >= 3
    assert 3 in layers["layer1.1.conv2"]["flagged"]
    assert result.total_units == units.total
    # Pruned channels output exactly zero wherever the group is read.
    seen = {}
    hooks = [result.model.get_submodule(p).register_forward_hook(
        lambda m, a, out, p=p: seen.__setitem__(p, out)) for p in stream.hook_points]
    result.model(torch.rand(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    for p in stream.hook_points:
        assert float(seen[p][:, 3].abs().max()) == 0


def test_clp_convs_without_batchnorm_and_other_architectures():
    torch.manual_seed(0)
    preact = models.create("preact_resnet18", 10, 3).eval()
    r = tp.repair(preact, None, method="clp")
    layers = {k: v for g in r.details["groups"].values() for k, v in g["layers"].items()}
    assert layers["layer1.0.conv1"]["bn"] == "layer1.0.bn2"
    assert layers["layer1.0.conv2"]["bn"] is None  # added to the skip path: kernel alone
    conv2 = preact.layer1[0].conv2.weight
    expected = torch.linalg.matrix_norm(conv2.reshape(64, 64, 9), ord=2)
    torch.testing.assert_close(torch.tensor(layers["layer1.0.conv2"]["uclc"]), expected)

    lenet = models.create("lenet5", 10, 1, batch_norm=False).eval()
    r = tp.repair(lenet, None, method="clp")
    assert r.details["input_shape"] == [1, 28, 28]
    r = tp.repair(lenet, None, method="clp", include_linear=True, input_shape="1,28,28")
    assert r.details["input_shape_from"] == "input_shape option"
    assert "classifier.1" in r.details["groups"]  # hidden linear layers scored too
    lin = lenet.classifier[1].weight
    torch.testing.assert_close(torch.tensor(r.details["groups"]["classifier.1"]["layers"]["classifier.1"]["uclc"]),
                               lin.norm(dim=1))
    assert channel_lipschitz_bound(nn.ReLU()) is None


def test_clp_bad_inputs(backdoor_case):
    case = backdoor_case
    assert "clp" in tp.defenses.available() and not tp.defenses.get("clp").needs_data
    with pytest.raises(ConfigError, match="unknown option.*threshold"):
        tp.repair(case.model, None, method="clp", threshold=3)
    with pytest.raises(ConfigError, match="input_shape"):
        tp.repair(case.model, None, method="clp", input_shape="big")
    with pytest.raises(ConfigError, match="does not run"):
        lenet = models.create("lenet5", 10, 1).eval()
        tp.repair(lenet, None, method="clp", input_shape="1,64,64")
    with pytest.raises(ConfigError, match="takes a number"):
        tp.repair(case.model, None, method="clp", u="three")
