"""FP (Fine-Pruning).

Measured on the ``backdoor_case`` fixture (BadNets on a narrow vgg_small, ACC 98.25, ASR 100;
last conv layer ``features.17``, 64 channels), seeds 0/1/2, one CPU thread:
- defaults: 9/7/9 channels pruned (seed 0: held-out accuracy 0.98 -> 0.95 at k=9, 0.93 at
  k=10), then 10 epochs of fine-tuning: ACC 97.95/97.9/97.9, ASR 49.0/61.9/46.9, ~3-8 s.
- pruning only (finetune_epochs=0): ACC 95.3/96.7/95.3, ASR 9.7/18.3/9.7, ~0.2 s.
Fine-tuning on 500 images brings back part of the backdoor that pruning had removed (along with
the accuracy): on this fixture the pruning stage does the work.
"""

from __future__ import annotations

import pytest
import torch

import trojanprune as tp
from trojanprune import metrics, models
from trojanprune.defenses.fp import last_conv_group
from trojanprune.engine import discover_units
from trojanprune.errors import ConfigError


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fp_defaults_lower_asr_and_keep_accuracy(backdoor_case):
    case = backdoor_case
    before = state(case.model)
    result = tp.repair(case.model, case.clean, method="fp", seed=0)
    after = metrics.evaluate(result.model, case.test, case.attack)
    for k, v in case.model.state_dict().items():
        assert torch.equal(v, before[k]), f"input model changed: {k}"
    assert after["acc"] > case.before["acc"] - 2, after
    assert after["asr"] < 60, after  # 49.0 measured

    d = result.to_dict()["details"]
    assert d["layer"] == "features.17" and d["layer_channels"] == 64
    assert d["activation_source"] == "input of classifier"
    k = d["chosen_k"]
    assert 1 <= k <= d["k_max"] == 51 and len(result.pruned) == k
    assert d["stopped_by"] == "acc_drop" and d["curve"]["k"][-1] == k + 1
    base, curve = d["baseline_heldout_acc"], d["curve"]["heldout_acc"]
    assert all(base - a <= 0.04 + 1e-6 for a in curve[:-1]) and base - curve[-1] > 0.04
    assert d["holdout_images"] == 100 and d["activation_images"] == 400
    # Pruned in increasing order of mean activation (dormant first).
    acts = torch.tensor(d["mean_activation"])
    chans = [c for _, c in result.pruned]
    assert {g for g, _ in result.pruned} == {"features.17"}
    assert acts[chans].max() <= acts[[c for c in range(64) if c not in chans]].min()
    # one pass for the activations, one chunk of 32 pruning depths, 10 fine-tuning epochs
    assert k + 2 <= 32 and result.evaluations == 1 + 32 + 10
    # The pruned channels are really gone in the returned model.
    bn = result.model.features[18]
    assert float(bn.weight[chans].abs().max()) == 0 and float(bn.bias[chans].abs().max()) == 0


def test_fp_pruning_stage_alone_removes_the_backdoor(backdoor_case):
    case = backdoor_case
    result = tp.repair(case.model, case.clean, method="fp", seed=0, finetune_epochs=0)
    after = metrics.evaluate(result.model, case.test, case.attack)
    assert after["asr"] < 20, after  # 9.7 measured
    assert after["acc"] > case.before["acc"] - 5, after  # 95.3 measured
    assert result.details["finetune"] is None


def test_fp_choice_sees_only_the_clean_images(backdoor_case):
    """Every image the model runs on during the repair is one of the defender's clean images:
    no test image, no triggered image (augmentation off so that the inputs are the images)."""
    case = backdoor_case
    clean_x, _ = case.clean.tensors()
    with torch.no_grad():
        allowed = {row.numpy().tobytes() for row in case.model.normalize(clean_x)}
    seen = []
    active = [True]

    def spy(module, args):
        if active[0] and isinstance(args[0], torch.Tensor):  # not torch.fx's tracing proxies
            seen.append(args[0].detach().clone())

    # A hook on the first conv survives the deep copy the repair works on and also sees the
    # masked evaluations (the evaluator calls the layers, not the model's forward).
    handle = case.model.features[0].register_forward_pre_hook(spy)
    try:
        result = tp.repair(case.model, case.clean, method="fp", seed=0, finetune_epochs=1,
                           augment="none")
    finally:
        active[0] = False
        handle.remove()
    rows = [row.numpy().tobytes() for batch in seen for row in batch]
    # activations (400), held-out curve (100), fine-tuning (500), a few probes
    assert len(rows) > 1000
    assert set(rows) <= allowed
    assert result.details["finetune"]["augment"] == "none"


def test_fp_stopping_rules(backdoor_case):
    case = backdoor_case
    r = tp.repair(case.model, case.clean, method="fp", finetune_epochs=0, acc_drop=1.0,
                  max_ratio=0.1)
    assert r.details["stopped_by"] == "max_ratio" and r.details["chosen_k"] == 6 == len(r.pruned)
    assert r.details["curve"]["k"] == list(range(7))
    strict = tp.repair(case.model, case.clean, method="fp", finetune_epochs=0, acc_drop=0.0)
    assert strict.details["stopped_by"] == "acc_drop"
    default = tp.repair(case.model, case.clean, method="fp", finetune_epochs=0)
    assert strict.details["chosen_k"] < default.details["chosen_k"]
    assert "acc_drop=0.0" in strict.details["reason"]


def test_fp_with_one_image_per_class_uses_all_images_for_the_choice(backdoor_case):
    case = backdoor_case
    x, y = case.clean.tensors()
    first = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(10)])
    r = tp.repair(case.model, (x[first], y[first]), method="fp", finetune_epochs=1)
    assert r.details["holdout_fallback"] is True and r.details["holdout_images"] == 10


def test_fp_prunes_the_residual_stream_of_a_resnet():
    torch.manual_seed(0)
    model = models.create("resnet20", 10, 3).eval()
    x, y = torch.rand(30, 3, 32, 32), torch.arange(30) % 10
    group = last_conv_group(model, discover_units(model, x[:1], include_linear=False), x[:1])
    assert group.residual and "layer3.2.conv2" in group.producers
    r = tp.repair(model, (x, y), method="fp", finetune_epochs=0)
    assert r.details["layer"] == group.name and r.details["activation_source"] == "input of linear"
    assert {g for g, _ in r.pruned} <= {group.name}


def test_fp_bad_inputs(backdoor_case):
    case = backdoor_case
    with pytest.raises(ConfigError, match="needs clean data.*clp"):
        tp.repair(case.model, None, method="fp")
    with pytest.raises(ConfigError, match="unknown option.*prune_ratio"):
        tp.repair(case.model, case.clean, method="fp", prune_ratio=0.5)
    with pytest.raises(ConfigError, match="fraction"):
        tp.repair(case.model, case.clean, method="fp", acc_drop=4)  # percent, not a fraction
    with pytest.raises(ConfigError, match="holdout"):
        tp.repair(case.model, case.clean, method="fp", holdout=1.0)
    with pytest.raises(ConfigError, match="max_ratio"):
        tp.repair(case.model, case.clean, method="fp", max_ratio=0)
