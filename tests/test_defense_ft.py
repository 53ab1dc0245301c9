"""FT (fine-tuning) and the shared fine-tuning helper ``defenses.finetune.finetune``.

Measured on the ``backdoor_case`` fixture (BadNets on a narrow vgg_small, ACC 98.25, ASR 100),
seeds 0/1/2, one CPU thread:
- defaults (20 epochs, lr 0.01, crop): ACC 97.85/98.05/97.8, ASR 79.7/86.0/68.0, ~7 s. Plain
  fine-tuning on 500 clean images only dents this backdoor; that is the honest behaviour.
- lr 0.05, 10 epochs: ACC 97.6/97.25/97.8, ASR 2.1/5.6/1.7, ~4 s.
"""

from __future__ import annotations

import copy

import pytest
import torch

import trojanprune as tp
from trojanprune import metrics, models
from trojanprune.defenses.base import CleanData
from trojanprune.defenses.finetune import finetune
from trojanprune.engine import ChannelMasks, apply_masks_permanently, discover_units
from trojanprune.errors import ConfigError, DataError


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [p.requires_grad for p in model.parameters()], model.training)


def assert_unchanged(model, snap):
    state, grads, training = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"input model changed: {k}"
    assert [p.requires_grad for p in model.parameters()] == grads
    assert model.training == training


def test_ft_defaults_keep_accuracy_and_do_not_raise_asr(backdoor_case):
    case = backdoor_case
    snap = snapshot(case.model)
    result = tp.repair(case.model, case.clean, method="ft", seed=0)
    after = metrics.evaluate(result.model, case.test, case.attack)
    assert_unchanged(case.model, snap)
    assert result.pruned == []
    assert result.evaluations == 20
    stats = result.details["finetune"]
    assert stats["epochs"] == 20 and stats["steps"] == 20 * 8 and stats["augment"] == "crop"
    assert after["acc"] > case.before["acc"] - 2
    # Plain fine-tuning with the reference settings only dents this backdoor (79.7 measured).
    assert after["asr"] < 90, after
    assert result.to_dict()["options"]["lr"] == 0.01


def test_ft_with_a_larger_learning_rate_removes_the_backdoor(backdoor_case):
    case = backdoor_case
    result = tp.repair(case.model, case.clean, method="ft", seed=0, lr=0.05, epochs=10)
    after = metrics.evaluate(result.model, case.test, case.attack)
    assert after["asr"] < 20, after  # 2.1 measured
    assert after["acc"] > case.before["acc"] - 3, after  # 97.6 measured


def test_ft_can_keep_the_batchnorm_statistics(backdoor_case):
    case = backdoor_case
    result = tp.repair(case.model, case.clean, method="ft", seed=0, epochs=2, batchnorm="keep")
    assert result.details["finetune"]["batchnorm"] == "keep"
    before, after = case.model.state_dict(), result.model.state_dict()
    running = [k for k in before if "running" in k]
    assert running and all(torch.equal(before[k], after[k]) for k in running)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    updated = tp.repair(case.model, case.clean, method="ft", seed=0, epochs=2).model.state_dict()
    assert any(not torch.equal(before[k], updated[k]) for k in running)


def test_ft_bad_inputs(backdoor_case):
    case = backdoor_case
    with pytest.raises(ConfigError, match="needs clean data.*clp"):
        tp.repair(case.model, None, method="ft")
    with pytest.raises(ConfigError, match="unknown option.*learning_rate"):
        tp.repair(case.model, case.clean, method="ft", learning_rate=0.1)
    with pytest.raises(ConfigError, match="augment"):
        tp.repair(case.model, case.clean, method="ft", augment="rotate")
    with pytest.raises(ConfigError, match="batchnorm must be one of update, keep"):
        tp.repair(case.model, case.clean, method="fp", batchnorm="frozen")
    with pytest.raises(ConfigError, match="epochs"):
        tp.repair(case.model, case.clean, method="ft", epochs=0)
    with pytest.raises(ConfigError, match="takes a number"):
        tp.repair(case.model, case.clean, method="ft", lr="fast")
    assert "ft" in tp.defenses.available()


def _small():
    torch.manual_seed(0)
    model = models.create("vgg_small", 10, 1, widths=((8,), (8,), (16,))).eval()
    x = torch.rand(40, 1, 16, 16)
    y = torch.arange(40) % 10
    return model, CleanData(x, y, 10)


def test_finetune_keeps_masked_channels_at_zero():
    model, clean = _small()
    units = discover_units(model, clean.x[:1])
    group = units[1]
    keep = torch.ones(group.size)
    keep[[0, 3]] = 0
    seen = []  # what the next layer reads of the group's channels, during training too
    consumer = model.get_submodule(group.consumers[0])
    handle = consumer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    before = copy.deepcopy(model)
    with ChannelMasks(model, units, {group.name: keep}) as cm:
        stats = finetune(model, clean, epochs=2, lr=0.05, batch_size=8, seed=0, masks=cm)
        masked_out = model(clean.x)
    handle.remove()
    assert stats["steps"] == 10 and stats["final_loss"] is not None
    assert len(seen) == 11  # 10 training steps and one evaluation
    assert all(float(t[:, [0, 3]].abs().max()) == 0 for t in seen), "masked channels leaked"
    assert all(float(t[:, 1].abs().max()) > 0 for t in seen)
    assert not torch.equal(model.state_dict()[group.root + ".weight"],
                           before.state_dict()[group.root + ".weight"]), "nothing was trained"
    assert not model.training and all(p.requires_grad for p in model.parameters())  # as before
    pruned = apply_masks_permanently(model, units, [(group.name, 0), (group.name, 3)])
    torch.testing.assert_close(pruned(clean.x), masked_out)


def test_finetune_can_keep_the_batchnorm_statistics():
    model, clean = _small()
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert running
    kept = copy.deepcopy(model)
    stats = finetune(kept, clean, epochs=1, lr=0.05, batch_size=8, seed=0, batchnorm="keep")
    assert stats["batchnorm"] == "keep"
    state = kept.state_dict()
    for k, v in running.items():
        assert torch.equal(state[k], v), f"{k} moved with batchnorm='keep'"
    assert any(not torch.equal(state[k], v) for k, v in model.state_dict().items()
               if k.endswith("weight")), "nothing was trained"
    updated = copy.deepcopy(model)
    finetune(updated, clean, epochs=1, lr=0.05, batch_size=8, seed=0)
    assert any(not torch.equal(updated.state_dict()[k], v) for k, v in running.items())
    with pytest.raises(ConfigError, match="batchnorm"):
        finetune(model, clean, epochs=1, lr=0.01, batch_size=8, seed=0, batchnorm="freeze")


def test_finetune_is_seeded_and_rejects_bad_input():
    model, clean = _small()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    finetune(a, clean, epochs=1, lr=0.01, batch_size=8, seed=3, augment="crop")
    finetune(b, clean, epochs=1, lr=0.01, batch_size=8, seed=3, augment="crop")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert finetune(model, clean, epochs=0, lr=0.01, batch_size=8, seed=0)["steps"] == 0

    other, _ = _small()
    units = discover_units(other, clean.x[:1])
    with ChannelMasks(other, units) as cm, pytest.raises(ConfigError, match="installed"):
        finetune(model, clean, epochs=1, lr=0.01, batch_size=8, seed=0, masks=cm)
    with ChannelMasks(model, units, {units[0].name: torch.ones(2, units[0].size)}) as cm, \
            pytest.raises(ConfigError, match="one mask per group"):
        finetune(model, clean, epochs=1, lr=0.01, batch_size=8, seed=0, masks=cm)
    with pytest.raises(ConfigError, match="augment"):
        finetune(model, clean, epochs=1, lr=0.01, batch_size=8, seed=0, augment="blur")
    nan = CleanData(clean.x.clone(), clean.y, 10)
    nan.x[0, 0, 0, 0] = float("nan")
    snap = [p.requires_grad for p in model.parameters()]
    with pytest.raises(DataError, match="NaN"):
        finetune(model, nan, epochs=1, lr=0.01, batch_size=40, seed=0)
    assert [p.requires_grad for p in model.parameters()] == snap and not model.training
