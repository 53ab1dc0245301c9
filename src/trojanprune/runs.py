"""Run directories: ``model.safetensors`` + ``run.json``, everything needed to rebuild the model
and its trigger, written atomically (a run either exists complete or not at all)."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .errors import CheckpointError, TrojanPruneError
from .utils import atomic_directory, write_json_atomic

RUN_FORMAT = "trojanprune-run"
# The newest format, which this code reads and writes. Version 2 adds the model adapter (input
# normalization, output selection); a run written without one stays version 1, readable by
# older trojanprune.
RUN_FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "run.json"


def versions() -> dict[str, str]:
    return {"trojanprune": __version__, "torch": torch.__version__,
            "python": platform.python_version()}


def processor() -> dict[str, str]:
    """The CPU a run computed on: its model name and the vector instructions torch's CPU
    kernels use (e.g. "AVX2", "AVX512"). Why record it: the same code, torch version and thread
    count can sum floating-point numbers in another order on another CPU, and a search that
    sits on a knife edge (a ten-image trigger reverse, ONP's agent) then ends elsewhere; the
    same ShapPruning command on the vgg_small SIG model (same commit, two threads) gave 0.07%
    ASR in one session and 99.78% in a later one (BENCHMARKS.md, "Stop 44")."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            name = next((line.split(":", 1)[1].strip() for line in info
                         if line.startswith("model name")), name)
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return {"cpu": name, "cpu_capability": capability}


@dataclass
class ModelSpec:
    """How to rebuild a model: a registered architecture, or the user's ``file.py:Class``, and
    the adapter (:class:`~trojanprune.models.Adapted` arguments) it is used through, if any.
    :meth:`build` makes the bare model, whose weights are what a run saves; :meth:`adapt`
    wraps it."""

    num_classes: int
    in_channels: int
    arch: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    model_def: str | None = None
    adapter: dict[str, Any] | None = None

    def build(self) -> nn.Module:
        from . import models

        if self.arch:
            return models.create(self.arch, self.num_classes, self.in_channels, **self.kwargs)
        if self.model_def:
            return models.build_user_model(self.model_def, self.kwargs)
        raise CheckpointError("the run record names neither an architecture nor a model definition")

    def adapt(self, model: nn.Module) -> nn.Module:
        """The bare ``model`` as the toolkit uses it (itself when there is no adapter)."""
        from .models import Adapted

        return Adapted(model, **self.adapter) if self.adapter else model

    def bare(self, model: nn.Module) -> nn.Module:
        """The user's model inside an adapted one: the weights a run saves."""
        from .models import Adapted

        return model.model if self.adapter and isinstance(model, Adapted) else model

    def to_dict(self) -> dict:
        d = {"arch": self.arch, "model_def": self.model_def, "num_classes": self.num_classes,
             "in_channels": self.in_channels, "kwargs": self.kwargs}
        if self.adapter:
            d["adapter"] = self.adapter
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(num_classes=d["num_classes"], in_channels=d["in_channels"], arch=d.get("arch"),
                   kwargs=d.get("kwargs") or {}, model_def=d.get("model_def"),
                   adapter=d.get("adapter") or None)


def contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone keeps the user's model apart.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_run(out_dir: str | Path, model: nn.Module, record: dict, force: bool = False,
             extra_files: dict[str, Any] | None = None) -> Path:
    """Write a run directory atomically. ``extra_files`` maps file names to a tensor dict
    (.safetensors), a CHW image (.png), text (a ``str``, written as UTF-8, e.g. an HTML
    report) or JSON-able data (anything else)."""
    adapted = bool((record.get("model") or {}).get("adapter"))
    record = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION if adapted else 1,
              **{k: v for k, v in record.items() if k != "format_version"}, "versions": versions()}
    with atomic_directory(out_dir, force=force) as tmp:
        save_file(contiguous_state(model), str(tmp / WEIGHTS_FILE))
        for name, content in (extra_files or {}).items():
            if name.endswith(".safetensors"):
                save_file(content, str(tmp / name))
            elif name.endswith(".png"):
                save_png(content, tmp / name)
            elif isinstance(content, str):
                (tmp / name).write_text(content, encoding="utf-8")
            else:
                write_json_atomic(tmp / name, content)
        write_json_atomic(tmp / RECORD_FILE, record)
    return Path(out_dir)


def save_png(image: torch.Tensor, path: Path) -> None:
    """A CHW float image in [0, 1] (1 or 3 channels) as a PNG."""
    from PIL import Image

    array = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    Image.fromarray(array.numpy()).save(path)


@dataclass
class Run:
    path: Path
    record: dict
    model: nn.Module

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.record["model"])

    def attack(self):
        """The run's attack, rebuilt from its record (None for a clean run)."""
        from . import attacks

        cfg = self.record.get("attack")
        return attacks.from_config(cfg) if cfg else None

    def test_set(self, data_dir=None):
        from . import data

        ds = self.record["dataset"]
        return data.load_dataset(ds["name"], "test", data_dir=data_dir,
                                 image_size=ds.get("image_size"))


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / RECORD_FILE).is_file()


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.exists():
        raise TrojanPruneError(f"{path} does not exist")
    if not is_run_dir(path):
        raise TrojanPruneError(f"{path} is not a run directory (no {RECORD_FILE}); pass a run "
                               f"made by 'trojanprune attack', or a weights file with --arch")
    try:
        record = json.loads((path / RECORD_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / RECORD_FILE} is not valid JSON: {exc}") from None
    if record.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{path / RECORD_FILE} is not a trojanprune run record")
    if record.get("format_version", 0) > RUN_FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer trojanprune (format "
                              f"{record['format_version']}); upgrade trojanprune to read it")
    from .models import load_weights

    spec = ModelSpec.from_dict(record["model"])
    model = spec.build()
    load_weights(model, path / WEIGHTS_FILE)
    return Run(path, record, spec.adapt(model).eval())
