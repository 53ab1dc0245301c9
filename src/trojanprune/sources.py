"""Turning what a user points at (a run directory, or a weights file plus an architecture) into
a model, its dataset description and, when known, its attack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import attacks, models
from .errors import ConfigError, TrojanPruneError
from .runs import ModelSpec, is_run_dir, load_run


@dataclass
class ModelSource:
    model: nn.Module
    spec: ModelSpec
    dataset: dict  # name, image_shape, num_classes, classes, image_size
    attack: object | None
    record: dict


def open_model(path: str | Path, *, arch: str | None = None, model_def: str | None = None,
               model_args: str | dict | None = None, weights_key: str | None = None,
               dataset: str | None = None, data_dir=None, attack: str | None = None,
               target: int = 0, attack_seed: int = 0, attack_options: dict | None = None,
               adapter: dict | None = None) -> ModelSource:
    """A run directory, or a weights file described by --arch/--model-def and --dataset;
    ``adapter``: :class:`~trojanprune.models.Adapted` arguments for a weights file's model (a
    run directory records its own)."""
    path = Path(path)
    if is_run_dir(path):
        if adapter:
            raise ConfigError(f"{path} is a run directory, which records how its model is used; "
                              f"the input normalization and output options are for a weights file")
        run = load_run(path)
        ds = dict(run.record["dataset"])
        if dataset and dataset != ds["name"]:
            ds = _describe_dataset(dataset, data_dir)
        return ModelSource(run.model, run.spec, ds, run.attack(), run.record)
    if path.is_dir():
        raise TrojanPruneError(f"{path} is a directory but not a run (no run.json)")
    if not path.exists():
        raise TrojanPruneError(f"{path} does not exist: pass a run directory or a weights file")
    if not dataset:
        raise ConfigError("a weights file needs --dataset (to know the classes and test set)")
    ds = _describe_dataset(dataset, data_dir)
    c = ds["image_shape"][0]
    if model_def:
        spec = ModelSpec(ds["num_classes"], c, model_def=model_def, kwargs=_parse_args(model_args))
        model = models.build_user_model(model_def, spec.kwargs, weights=str(path),
                                        weights_key=weights_key)
    elif arch:
        spec = ModelSpec(ds["num_classes"], c, arch=arch,
                         kwargs=models.arch_kwargs(arch, ds["image_shape"], dataset,
                                                   **_parse_args(model_args)))
        model = spec.build()
        models.load_weights(model, path, weights_key)
    else:
        raise ConfigError(f"a weights file needs --arch (one of {', '.join(models.available())}) "
                          f"or --model-def path/file.py:Class")
    if adapter:
        if "mean" in adapter and len(adapter["mean"]) != c:
            raise ConfigError(f"--input-mean/--input-std need {c} values (one per channel of "
                              f"{ds['name']} images), got {len(adapter['mean'])}")
        spec.adapter = dict(adapter)
        model = spec.adapt(model)
    atk = None
    if attack:
        atk = attacks.create(attack, tuple(ds["image_shape"]), ds["num_classes"], target=target,
                             seed=attack_seed, **(attack_options or {}))
    return ModelSource(model.eval(), spec, ds, atk, {})


def _parse_args(model_args) -> dict:
    if not model_args:
        return {}
    if isinstance(model_args, dict):
        return model_args
    import json

    try:
        parsed = json.loads(model_args)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-args must be a JSON object: {exc}") from None
    if not isinstance(parsed, dict):
        raise ConfigError("--model-args must be a JSON object")
    return parsed


def _describe_dataset(name: str, data_dir=None) -> dict:
    from . import data

    test = data.load_dataset(name, "test", data_dir=data_dir)
    return describe(test, name)


def describe(ds, name: str | None = None, image_size=None) -> dict:
    return {"name": name or ds.name, "image_shape": list(ds.image_shape),
            "num_classes": ds.num_classes, "classes": list(ds.classes), "image_size": image_size}
