import pickle

import pytest
import torch
from safetensors.torch import save_file

from trojanprune import models
from trojanprune.errors import CheckpointError, ConfigError


@pytest.mark.parametrize("name,shape", [("vgg_small", (3, 32, 32)), ("resnet20", (3, 32, 32)),
                                        ("lenet5", (1, 28, 28)), ("preact_resnet18", (3, 32, 32))])
def test_create_and_forward(name, shape):
    model = models.create(name, num_classes=7, in_channels=shape[0]).eval()
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, 7)
    assert isinstance(model.normalize, models.Normalize)


def test_vgg_small_size():
    n = sum(p.numel() for p in models.create("vgg_small", 10).parameters())
    assert 0.25e6 < n < 0.35e6


def test_unknown_arch_lists_valid():
    with pytest.raises(ConfigError, match="vgg_small"):
        models.create("vgg_huge", 10)


def test_safetensors_roundtrip_and_mismatch(tmp_path):
    model = models.create("lenet5", 10, 1)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    other = models.create("lenet5", 10, 1)
    models.load_weights(other, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    with pytest.raises(CheckpointError, match=r"shape mismatch: classifier\.5\.weight"):
        models.load_weights(models.create("lenet5", 5, 1), path)
    with pytest.raises(CheckpointError, match="missing in checkpoint"):
        models.load_weights(models.create("vgg_small", 10, 1), path)


def test_pt_with_nested_key_and_module_prefix(tmp_path):
    model = models.create("lenet5", 10, 1)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "w.pt")
    models.load_weights(models.create("lenet5", 10, 1), tmp_path / "w.pt")
    torch.save({"net": model.state_dict()}, tmp_path / "k.pth")
    models.load_weights(models.create("lenet5", 10, 1), tmp_path / "k.pth", key="net")
    with pytest.raises(CheckpointError, match="no key 'nope'"):
        models.load_weights(models.create("lenet5", 10, 1), tmp_path / "k.pth", key="nope")


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/trojanprune-pwned",))


def test_malicious_pickle_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    torch.save({"x": Evil()}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(CheckpointError, match="execute code"):
            models.load_weights(models.create("lenet5", 10, 1), p)


def test_whole_model_pickle_refused(tmp_path):
    torch.save(models.create("lenet5", 10, 1), tmp_path / "full.pt")
    with pytest.raises(CheckpointError, match="refusing"):
        models.load_weights(models.create("lenet5", 10, 1), tmp_path / "full.pt")


@pytest.mark.parametrize("compile_", ["script", "trace"])
def test_torchscript_archive_refused_with_what_to_do(tmp_path, compile_):
    model = models.create("lenet5", 10, 1).eval()
    compiled = (torch.jit.script(model) if compile_ == "script"
                else torch.jit.trace(model, torch.rand(1, 1, 28, 28)))
    torch.jit.save(compiled, tmp_path / "compiled.pt")
    with pytest.raises(CheckpointError, match=r"TorchScript archive.*state_dict\(\)"):
        models.load_weights(models.create("lenet5", 10, 1), tmp_path / "compiled.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pt")  # a plain zip checkpoint still loads
    models.load_weights(models.create("lenet5", 10, 1), tmp_path / "weights.pt")


def test_torchscript_model_refused_by_repair():
    import trojanprune as tp

    model = models.create("lenet5", 10, 1).eval()
    for compiled, where in [(torch.jit.script(model), "the model"),
                            (torch.nn.Sequential(torch.jit.script(model)), "submodule '0'")]:
        with pytest.raises(ConfigError, match=f"{where} is a TorchScript module.*load_state_dict"):
            tp.repair(compiled, None, method="clp", input_shape="1,28,28")


def test_torch_compiled_model_is_repaired_as_its_eager_module():
    import trojanprune as tp

    model = models.create("lenet5", 10, 1).eval()
    compiled = torch.compile(model)  # compiles lazily, on a first call that never comes
    x, y = torch.rand(20, 1, 28, 28), torch.arange(20) % 10
    with pytest.warns(UserWarning, match="torch.compile"):
        result = tp.repair(compiled, (x, y), method="fp", finetune_epochs=0)
    assert type(result.model) is type(model)
    assert result.pruned, "Fine-Pruning found no conv layer behind the wrapper"


USER_MODEL = '''
import torch
from torch import nn

class Weird(nn.Module):
    def __init__(self, classes=10, width=8):
        super().__init__()
        self.blocks = nn.ModuleDict({"stem_c0": nn.Conv2d(3, width, 3, padding=1),
                                     "head": nn.Linear(width, classes)})
    def forward(self, x):
        x = torch.relu(self.blocks["stem_c0"](x)).mean((2, 3))
        return self.blocks["head"](x)
'''


def test_user_model_def(tmp_path):
    (tmp_path / "mynet.py").write_text(USER_MODEL)
    model = models.build_user_model(f"{tmp_path}/mynet.py:Weird", '{"classes": 4}')
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 4)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    again = models.build_user_model(f"{tmp_path}/mynet.py:Weird", {"classes": 4},
                                    weights=str(tmp_path / "w.safetensors"))
    assert torch.equal(again.blocks["head"].weight, model.blocks["head"].weight)
    with pytest.raises(ConfigError, match="no nn.Module class 'Nope'.*Weird"):
        models.build_user_model(f"{tmp_path}/mynet.py:Nope")
    with pytest.raises(ConfigError, match="JSON"):
        models.build_user_model(f"{tmp_path}/mynet.py:Weird", "{bad")
