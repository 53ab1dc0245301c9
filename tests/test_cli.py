"""The CLI end to end: every error path gives one clear line and a non-zero exit."""

import json
import shutil
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import trojanprune
from trojanprune import models
from trojanprune.cli import app
from trojanprune.utils import default_mode

runner = CliRunner()


def invoke(*args, stdout_only=False):
    result = runner.invoke(app, [str(a) for a in args])
    if stdout_only:
        return result.exit_code, result.stdout
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits-badnets"
    code, text = invoke("attack", "badnets", "--dataset", "digits", "--arch", "lenet5",
                        "--epochs", "20", "--lr", "0.05", "--batch-size", "64", "--out", out)
    assert code == 0, text
    return out


@pytest.mark.parametrize("cmd", [[], ["attack"], ["eval"], ["demo"]])
def test_help(cmd):
    code, text = invoke(*cmd, "--help")
    assert code == 0 and "Usage" in text


def test_attack_writes_run_and_eval_reads_it(digits_run):
    record = json.loads((digits_run / "run.json").read_text())
    assert record["attack"]["name"] == "badnets" and record["seed"] == 0
    assert (digits_run / "model.safetensors").is_file()
    code, text = invoke("eval", digits_run, "--json", stdout_only=True)
    assert code == 0, text
    out = json.loads(text)
    assert {"acc", "asr", "ra"} <= set(out) and out["acc"] > 90 and out["asr"] > 90
    assert out["acc"] == pytest.approx(record["metrics"]["acc"], abs=1e-3)
    assert out["dataset"]["name"] == "digits"


def test_eval_per_class(digits_run):
    code, text = invoke("eval", digits_run, "--json", "--per-class", stdout_only=True)
    assert code == 0, text
    out = json.loads(text)
    per_class = out["acc_per_class"]
    assert len(per_class) == 10 and all(0 <= a <= 100 for a in per_class)
    # the digits test split is balanced to within a few images: the mean of the classes is ACC
    assert sum(per_class) / 10 == pytest.approx(out["acc"], abs=1.0)
    code, text = invoke("eval", digits_run, "--per-class")
    assert code == 0 and "per class:" in text


def test_refuses_to_overwrite_run(digits_run):
    before = (digits_run / "model.safetensors").read_bytes()
    code, text = invoke("attack", "badnets", "--dataset", "digits", "--arch", "lenet5",
                        "--epochs", "1", "--out", digits_run)
    assert code != 0 and "already exists" in text and "--force" in text
    assert (digits_run / "model.safetensors").read_bytes() == before


def test_eval_weights_file_with_arch(digits_run, tmp_path):
    code, text = invoke("eval", digits_run / "model.safetensors", "--arch", "lenet5",
                        "--dataset", "digits", "--attack", "badnets", "--json", stdout_only=True)
    assert code == 0, text
    assert json.loads(text)["asr"] > 90


@pytest.mark.parametrize("args,expect", [
    (["attack", "nosuch", "--dataset", "digits", "--out", "X"], "valid attacks: badnets"),
    (["attack", "badnets", "--dataset", "digits", "--arch", "vgg_huge", "--out", "X"],
     "valid architectures:"),
    (["attack", "badnets", "--dataset", "nosuch", "--out", "X"], "digits"),
    (["attack", "blended", "--dataset", "digits", "--mode", "all-to-all", "--out", "X"], "badnets"),
    (["attack", "badnets", "--dataset", "digits", "--set", "nope=1", "--out", "X"], "patch_size"),
])
def test_bad_names_list_valid_ones(args, expect, tmp_path):
    args = [str(tmp_path / "o") if a == "X" else a for a in args]
    code, text = invoke(*args)
    assert code == 2, text
    assert "error:" in text and expect in text
    assert "Traceback" not in text
    assert not (tmp_path / "o").exists()


def test_missing_data_says_where_to_put_files(tmp_path):
    code, text = invoke("attack", "badnets", "--dataset", "mnist", "--data-dir", tmp_path,
                        "--out", tmp_path / "o")
    assert code == 2 and "train-images-idx3-ubyte.gz" in text and str(tmp_path) in text


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, text = invoke("attack", "badnets", "--dataset", "digits", "--arch", "lenet5",
                        "--epochs", "1", "--out", blocker / "run")
    assert code == 2 and "cannot write" in text


def test_checkpoint_mismatch_names_keys(tmp_path):
    model = models.create("lenet5", 10, 1, input_size=16)
    model.classifier[5] = torch.nn.Linear(84, 7)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    code, text = invoke("eval", tmp_path / "w.safetensors", "--arch", "lenet5", "--dataset", "digits")
    assert code == 2 and "classifier.5.weight" in text and "shape mismatch" in text


def test_malicious_checkpoint_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    code, text = invoke("eval", tmp_path / "evil.pt", "--arch", "lenet5", "--dataset", "digits")
    assert code == 2 and "execute code" in text
    assert not (tmp_path / "pwned").exists()


def _eval_user_linear_model(tmp_path, classes: int, returns: str):
    """``trojanprune eval`` of a user's one-layer model with ``classes`` outputs whose forward
    returns ``returns`` (an expression of ``logits`` and ``x``)."""
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        f"    def __init__(self, k={classes}):\n"
        "        super().__init__(); self.fc = nn.Linear(256, k)\n"
        f"    def forward(self, x):\n        logits = self.fc(x.flatten(1))\n        return {returns}\n")
    from trojanprune.models import build_user_model

    net = build_user_model(f"{tmp_path}/net.py:Net")
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    return invoke("eval", tmp_path / "w.safetensors", "--model-def", f"{tmp_path}/net.py:Net",
                  "--dataset", "digits")


def test_num_classes_mismatch_user_model(tmp_path):
    code, text = _eval_user_linear_model(tmp_path, 4, "logits")
    assert code == 2 and "num_classes mismatch" in text and "10 classes" in text


def test_user_model_returning_a_tuple_gets_a_clear_error(tmp_path):
    code, text = _eval_user_linear_model(tmp_path, 10, "logits, x")
    assert code == 2 and "returns a tuple, not a logits tensor" in text


_NORMALIZED_NET = """
from torch import nn
from trojanprune.models import LeNet5

class Net(nn.Module):
    # a user's model as trained elsewhere: its pipeline normalizes the images, and forward
    # returns (logits, features)
    def __init__(self):
        super().__init__()
        lenet = LeNet5(10, 1, input_size=16)
        self.features, self.classifier = lenet.features, lenet.classifier

    def forward(self, x):
        h = self.features(x)
        return self.classifier(h), h
"""


def test_user_model_behind_its_own_normalization_is_repaired_and_saved_in_its_own_layout(
        digits_run, tmp_path):
    """The digits run's model, taken apart into a user's model that expects normalized images
    and returns (logits, features): the CLI options rebuild the run's function exactly, and the
    repaired weights load back into the user's class."""
    from safetensors.torch import load_file

    from trojanprune.models import build_user_model

    (tmp_path / "net.py").write_text(_NORMALIZED_NET)
    state = {k: v for k, v in load_file(str(digits_run / "model.safetensors")).items()
             if not k.startswith("normalize.")}
    save_file(state, str(tmp_path / "w.safetensors"))
    as_user = [tmp_path / "w.safetensors", "--model-def", f"{tmp_path}/net.py:Net",
               "--dataset", "digits", "--attack", "badnets"]
    adapter = ["--input-mean", "0.5", "--input-std", "0.5", "--output-key", "0"]
    code, text = invoke("eval", *as_user, *adapter, "--json", stdout_only=True)
    assert code == 0, text
    run_metrics = json.loads((digits_run / "run.json").read_text())["metrics"]
    measured = json.loads(text)
    assert abs(measured["acc"] - run_metrics["acc"]) < 1e-6
    assert abs(measured["asr"] - run_metrics["asr"]) < 1e-6
    # without the options: a clear error for the tuple, and other predictions unnormalized
    code, text = invoke("eval", *as_user)
    assert code == 2 and "--output-key 0" in text
    code, text = invoke("eval", *as_user, "--output-key", "0", "--json", stdout_only=True)
    assert code == 0 and json.loads(text)["acc"] != measured["acc"]

    out = tmp_path / "repaired"
    code, text = invoke("repair", *as_user, *adapter, "--method", "fp", "--out", out, "--json",
                        "--threads", "1", stdout_only=True)
    assert code == 0, text
    record = json.loads(text)
    assert record["environment"]["torch_threads"] == 1 and record["environment"]["device"] == "cpu"
    assert record["environment"]["trojanprune"] == trojanprune.__version__
    # the CPU too: another one can sum in another order (BENCHMARKS.md, "Stop 44")
    assert record["environment"]["cpu"] and record["environment"]["cpu_capability"] == \
        torch.backends.cpu.get_cpu_capability()
    run = json.loads((out / "run.json").read_text())
    assert run["format_version"] == 2  # a run without an adapter stays readable by older code:
    assert json.loads((digits_run / "run.json").read_text())["format_version"] == 1
    assert run["model"]["adapter"] == {"mean": [0.5], "std": [0.5], "output_key": 0}
    # the repaired weights are in the user's own layout: they load strictly into Net ...
    build_user_model(f"{tmp_path}/net.py:Net", weights=str(out / "model.safetensors"))
    assert set(load_file(str(out / "model.safetensors"))) == set(state)
    # ... and the run directory evaluates to what the repair measured
    code, text = invoke("eval", out, "--json", stdout_only=True)
    assert code == 0 and abs(json.loads(text)["acc"] - record["after"]["acc"]) < 1e-6
    # a run directory records its adapter; wrong or half options are named
    code, text = invoke("eval", out, "--input-mean", "0.5", "--input-std", "0.5")
    assert code == 2 and "run directory" in text
    code, text = invoke("eval", *as_user, "--input-mean", "0.5,0.5", "--input-std", "0.5,0.5")
    assert code == 2 and "need 1 values" in text
    code, text = invoke("eval", *as_user, "--input-mean", "0.5")
    assert code == 2 and "--input-std" in text


def test_user_model_whose_constructor_fails_gets_a_clear_error(tmp_path):
    (tmp_path / "net.py").write_text("from torch import nn\nclass Net(nn.Module):\n"
                                     "    def __init__(self, size=8):\n"
                                     "        raise ValueError(f'needs 12x12 inputs, got {size}')\n")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    code, text = invoke("eval", tmp_path / "w.safetensors", "--model-def", f"{tmp_path}/net.py:Net",
                        "--dataset", "digits")
    assert code == 2 and "ValueError: needs 12x12 inputs, got 8" in text and "--model-args" in text


def test_ctrl_c_during_training_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    # Epochs enough that no machine finishes before the interrupt arrives.
    proc = subprocess.Popen(
        [sys.executable, "-m", "trojanprune.cli", "attack", "badnets", "--dataset", "digits",
         "--arch", "lenet5", "--epochs", "100000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A CI runner may start us as a background job, where SIGINT is inherited as ignored
        # and Python then never raises KeyboardInterrupt: give the child the default handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Interrupt once training has really started: its first epoch line is on stderr.
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("epoch "):
            break
    assert proc.poll() is None, "".join(seen)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    err = "".join(seen) + rest
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert not any(p.name.startswith(".run") for p in tmp_path.iterdir())


def test_end_to_end_mnist_lenet_badnets(shared_data_dir, tmp_path):
    """A real backdoor on real data: LeNet-5 + BadNets on an MNIST subset."""
    code, text = invoke("attack", "badnets", "--dataset", "mnist", "--data-dir", shared_data_dir,
                        "--arch", "lenet5", "--epochs", "3", "--lr", "0.05", "--train-size",
                        "8000", "--out", tmp_path / "mnist-run", "--json", stdout_only=True)
    assert code == 0, text
    record = json.loads(text)
    assert record["metrics"]["asr"] > 90, record["metrics"]
    assert record["metrics"]["acc"] > 95, record["metrics"]
    assert record["poison"]["count"] == 800


def test_repair_writes_weights_mask_record_and_is_evaluable(digits_run, tmp_path):
    out = tmp_path / "repaired"
    code, text = invoke("repair", digits_run, "--method", "fp", "--clean", "300", "--out", out,
                        "--json", stdout_only=True)
    assert code == 0, text
    record = json.loads(text)
    assert {"acc", "asr", "ra"} <= set(record["before"]) and "der" in record
    assert record["clean_images"] == 300 and record["evaluations"] > 0
    for name in ("model.safetensors", "mask.safetensors", "repair.json", "run.json"):
        assert (out / name).is_file(), name
        # written through private temporary files, published with ordinary permissions
        assert stat.S_IMODE((out / name).stat().st_mode) == default_mode(), name
    assert stat.S_IMODE(out.stat().st_mode) == default_mode(directory=True)
    from safetensors.torch import load_file

    masks = load_file(str(out / "mask.safetensors"))
    assert sum(int((m == 0).sum()) for m in masks.values()) == record["pruned_count"]
    code, text = invoke("eval", out, "--json", stdout_only=True)
    assert code == 0, text
    assert json.loads(text)["acc"] == pytest.approx(record["after"]["acc"], abs=1e-3)
    # the output exists now: a second repair refuses to overwrite it
    code, text = invoke("repair", digits_run, "--method", "fp", "--out", out)
    assert code == 2 and "already exists" in text


def test_repair_data_free_and_bad_method(digits_run, tmp_path):
    code, text = invoke("repair", digits_run, "--method", "clp", "--data-free", "--out",
                        tmp_path / "clp", "--json", stdout_only=True)
    assert code == 0, text
    assert json.loads(text)["clean_images"] == 0
    code, text = invoke("repair", digits_run, "--method", "nope", "--out", tmp_path / "x")
    assert code == 2 and "valid methods" in text and "fp" in text
    code, text = invoke("repair", digits_run, "--method", "fp", "--data-free", "--out", tmp_path / "y")
    assert code == 2 and "needs clean data" in text
    code, text = invoke("repair", digits_run, "--method", "fp", "--set", "bogus=1", "--out", tmp_path / "z")
    assert code == 2 and "unknown option" in text
    # a bad option value is named before any data is looked for: here the run's dataset is
    # one the (empty) data folder does not hold
    elsewhere = tmp_path / "mnist-run"
    shutil.copytree(digits_run, elsewhere)
    record = json.loads((elsewhere / "run.json").read_text())
    record["dataset"]["name"] = "mnist"
    (elsewhere / "run.json").write_text(json.dumps(record))
    code, text = invoke("repair", elsewhere, "--method", "onp", "--set", "small_mask_ratio=0.5",
                        "--data-dir", tmp_path / "no-data-here", "--out", tmp_path / "z")
    assert code == 2 and "small_mask_ratio must be a number above 1" in text, text
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
