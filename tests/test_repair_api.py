"""The public repair contract and its bad-input errors (DESIGN.md, Public contract)."""

import json

import pytest
import torch

import trojanprune as tp
from trojanprune.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = tp.models.create("lenet5", 10, 1, input_size=16).eval()
    x = torch.rand(40, 1, 16, 16)
    y = torch.arange(40) % 10
    return model, x, y


def test_available_lists_the_baselines():
    assert {"ft", "fp", "clp", "anp", "rnp"} <= set(tp.defenses.available())


def test_unknown_method_lists_valid(small):
    model, x, y = small
    with pytest.raises(ConfigError, match="valid methods: .*fp"):
        tp.repair(model, (x, y), method="magic")


@pytest.mark.parametrize("make,match", [
    (lambda x, y: (x[:0], y[:0]), "empty"),
    (lambda x, y: (x[:3], y[:3]), "at least"),
    (lambda x, y: (x, y + 10), r"labels must be in 0\.\.9"),
    (lambda x, y: (x * 255, y), r"floats in \[0, 1\]"),
    (lambda x, y: ((x - 0.5) / 0.25, y), r"normalization in front: .*Normalize\(mean, std\)"),
    (lambda x, y: (x[:, 0], y), "4-D"),
    (lambda x, y: (x, y[:5]), "labels"),
    (lambda x, y: (torch.rand(40, 3, 16, 16), y), "cannot run on the clean images"),
])
def test_bad_clean_data(small, make, match):
    model, x, y = small
    with pytest.raises(DataError, match=match):
        tp.repair(model, make(x, y), method="ft")


def test_data_free_call_of_a_data_method(small):
    model, _, _ = small
    with pytest.raises(ConfigError, match="needs clean data.*clp"):
        tp.repair(model, None, method="ft")


def test_unknown_option(small):
    model, x, y = small
    with pytest.raises(ConfigError, match="unknown option.*valid options"):
        tp.repair(model, (x, y), method="ft", no_such_option=1)


def test_result_contract_and_input_untouched(small):
    model, x, y = small
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = tp.repair(model, (x, y), method="ft", seed=0, epochs=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"input model changed at {k}"
    assert result.model is not model
    assert isinstance(result.pruned, list) and result.seconds > 0
    json.dumps(result.to_dict())
    # a Dataset of (x, y) is accepted too
    ds = torch.utils.data.TensorDataset(x, y)
    tp.repair(model, ds, method="ft", seed=0, epochs=1)


def test_a_model_returning_probabilities_is_warned_about_and_log_of_fixes_it(small):
    import warnings

    model, x, y = small
    softmaxed = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    with pytest.warns(UserWarning, match="returns probabilities.*LogOf"):
        tp.repair(softmaxed, (x, y), method="clp")
    fixed = torch.nn.Sequential(softmaxed, tp.models.LogOf()).eval()
    with torch.no_grad():  # log-probabilities: the logits up to a per-image constant
        shift = fixed(x) - model(x)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tp.repair(fixed, (x, y), method="clp")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tp.repair(model, (x, y), method="clp")  # plain logits: no warning


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_float64_or_bfloat16_model_is_repaired_in_float32_and_returned_in_its_dtype(dtype):
    """The trigger reverses once failed on a float64 model (float32 sums of float64 losses)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).to(dtype).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(60, 1, 16, 16), torch.arange(60) % 10
    result = tp.repair(model, (x, y), method="shappruning", force=True, reverse_steps=5,
                       feature_steps=5, permutations=4, warmup=2)
    assert result.pruned
    assert all(p.dtype == dtype for p in result.model.parameters())
    for name, channel in result.pruned:
        assert not result.model.get_submodule(name).weight[channel].any()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_repair_inside_no_grad_gives_the_same_repair_and_inference_mode_is_refused(small):
    model, x, y = small
    plain = tp.repair(model, (x, y), method="ft", seed=0, epochs=1)
    with torch.no_grad():
        inside = tp.repair(model, (x, y), method="ft", seed=0, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), inside.model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.parameters(), model.parameters()))
    with torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
        tp.repair(model, (x, y), method="ft", seed=0, epochs=1)


def test_a_model_returning_a_tuple_is_refused_with_the_wrapper_to_use(small):
    model, x, y = small

    class WithFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, images):
            return self.net(images), images.mean((1, 2, 3))

    pair = WithFeatures().eval()
    with pytest.raises(ConfigError, match=r"returns a tuple.*SelectOutput\(model, key\)"):
        tp.repair(pair, (x, y), method="clp")
    result = tp.repair(tp.models.SelectOutput(pair, 0), (x, y), method="fp", finetune_epochs=1)
    assert result.pruned and all(name.startswith("model.net.") for name, _ in result.pruned)
    with torch.no_grad():
        assert torch.equal(result.model.model(x)[0], result.model(x))
