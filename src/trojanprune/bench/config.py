"""A benchmark grid's configuration, read from YAML and validated completely before any work.

    name: smoke
    datasets: [digits]
    archs: [lenet5]
    attacks: [badnets, blended]
    defenses: all                  # or a list; "all" = every registered defense
    seeds: [0]
    train: {epochs: 30, lr: 0.05, batch_size: 64, poison_rate: 0.1}
    clean: {images: 500}           # or {per_class: 10}; from the TRAINING split
    clean_for: {shappruning: {per_class: 1}, clp: none}   # per-defense override
    defense_options: {anp: {iterations: 200}}
    attack_options: {blended: {alpha: 0.2}}
    test_images: 2000              # evaluate on a fixed seeded subset (default: whole test split)
    models_dir: benchmarks/zoo     # reuse run dirs <models_dir>/<dataset>-<arch>-<attack>
    device: cpu

Every problem found (unknown names, unknown options, bad values) is reported in ONE
:class:`ConfigError` listing the valid names, so a typo never costs an hour of training first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

TRAIN_KEYS = {"epochs": int, "lr": float, "batch_size": int, "poison_rate": float, "target": int,
              "mode": str, "augment": str, "train_size": int, "image_size": int}
TRAIN_DEFAULTS = {"epochs": 15, "lr": 0.05, "batch_size": 128, "poison_rate": 0.1, "target": 0,
                  "mode": "all-to-one"}
TOP_KEYS = {"name", "datasets", "archs", "attacks", "defenses", "seeds", "train", "clean",
            "clean_for", "defense_options", "attack_options", "model_options", "test_images",
            "models_dir", "model_pattern", "device"}
DEFAULT_MODEL_PATTERN = "{dataset}-{arch}-{attack}"


@dataclass(frozen=True)
class CleanSetting:
    """The defender's clean data for one defense: ``images`` in all, ``per_class``, or none."""

    images: int | None = 500
    per_class: int | None = None
    data_free: bool = False

    def describe(self) -> str:
        if self.data_free:
            return "none (data-free)"
        if self.per_class is not None:
            return f"{self.per_class}/class from train"
        return f"{self.images} from train"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BenchConfig:
    name: str
    datasets: list[str]
    archs: list[str]
    attacks: list[str]
    defenses: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    train: dict[str, Any] = field(default_factory=lambda: dict(TRAIN_DEFAULTS))
    clean: CleanSetting = field(default_factory=CleanSetting)
    clean_for: dict[str, CleanSetting] = field(default_factory=dict)
    defense_options: dict[str, dict] = field(default_factory=dict)
    attack_options: dict[str, dict] = field(default_factory=dict)
    model_options: dict[str, dict] = field(default_factory=dict)
    test_images: int | None = None
    models_dir: str | None = None
    model_pattern: str = DEFAULT_MODEL_PATTERN
    device: str = "cpu"
    source: str | None = None  # the YAML file it came from

    def clean_setting(self, defense: str) -> CleanSetting:
        """The config's per-defense override, else the defense's own setting (data-free methods
        get none; a few-shot method its ``per_class_images``), else the grid default."""
        from .. import defenses

        if defense in self.clean_for:
            return self.clean_for[defense]
        cls = defenses.get(defense)
        if cls.per_class_images:
            return CleanSetting(images=None, per_class=cls.per_class_images)
        if not cls.needs_data:
            return CleanSetting(images=None, data_free=True)
        return self.clean

    def settings(self) -> dict:
        """What every cell's numbers depend on besides its own grid coordinates; a results file
        made under other settings must not be extended with these."""
        return {"train": self.train, "clean": self.clean.to_dict(),
                "attack_options": self.attack_options, "model_options": self.model_options,
                "test_images": self.test_images}

    def to_dict(self) -> dict:
        return {"name": self.name, "datasets": self.datasets, "archs": self.archs,
                "attacks": self.attacks, "defenses": self.defenses, "seeds": self.seeds,
                "train": self.train, "clean": self.clean.to_dict(),
                "clean_for": {k: v.to_dict() for k, v in self.clean_for.items()},
                "defense_options": self.defense_options, "attack_options": self.attack_options,
                "model_options": self.model_options, "test_images": self.test_images,
                "models_dir": self.models_dir, "model_pattern": self.model_pattern,
                "device": self.device}


def load_config(path: str | Path) -> BenchConfig:
    """Read and validate a YAML grid; raises one ConfigError listing every problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    config = parse_config(raw, source=str(path), base_dir=path.parent)
    return config


def parse_config(raw: Any, source: str = "<config>", base_dir: Path | None = None) -> BenchConfig:
    from .. import attacks, data, defenses, models

    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a benchmark config must be a YAML mapping, got "
                          f"{type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        errors.append(f"unknown key(s) {unknown} (valid keys: {', '.join(sorted(TOP_KEYS))})")

    def names(key: str, valid: list[str], kind: str, allow_all: bool = False,
              check=None) -> list[str]:
        value = raw.get(key)
        if value is None:
            errors.append(f"'{key}' is missing (a list of {kind} names: {', '.join(valid)})")
            return []
        if allow_all and value == "all":
            return list(valid)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            errors.append(f"'{key}' must be a non-empty list of {kind} names")
            return []
        bad = [v for v in value if not (check(v) if check else v in valid)]
        if bad:
            errors.append(f"unknown {kind}(s) {', '.join(map(repr, bad))}; valid {kind}s: "
                          f"{', '.join(valid)}{' (or all)' if allow_all else ''}")
        if len(set(value)) != len(value):
            errors.append(f"'{key}' lists a name twice: {value}")
        return [v for v in value if v not in bad]

    def dataset_ok(name: str) -> bool:
        return (name in data.available_datasets() or name.startswith("imagefolder:"))

    datasets = names("datasets", data.available_datasets() + ["imagefolder:PATH"], "dataset",
                     check=dataset_ok)
    archs = names("archs", models.available(), "architecture")
    attack_names = names("attacks", attacks.available(), "attack")
    defense_names = names("defenses", defenses.available(), "defense", allow_all=True)

    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool)
                                                      and s >= 0 for s in seeds)):
        errors.append(f"'seeds' must be a non-empty list of non-negative integers, got {seeds!r}")
        seeds = []

    train = dict(TRAIN_DEFAULTS)
    raw_train = raw.get("train") or {}
    if not isinstance(raw_train, dict):
        errors.append("'train' must be a mapping (epochs, lr, batch_size, ...)")
        raw_train = {}
    for key, value in raw_train.items():
        kind = TRAIN_KEYS.get(key)
        if kind is None:
            errors.append(f"unknown train option {key!r} (valid: {', '.join(sorted(TRAIN_KEYS))})")
        elif value is not None and not _is(value, kind):
            errors.append(f"train option {key} takes {kind.__name__}, got {value!r}")
        else:
            train[key] = float(value) if kind is float and value is not None else value
    if isinstance(train.get("epochs"), int) and train["epochs"] < 1:
        errors.append("train.epochs must be at least 1")
    if isinstance(train.get("poison_rate"), float) and not 0 < train["poison_rate"] < 1:
        errors.append("train.poison_rate must be between 0 and 1")

    clean = _clean_setting(raw.get("clean", {"images": 500}), "clean", errors) or CleanSetting()
    clean_for = {}
    raw_clean_for = raw.get("clean_for") or {}
    if not isinstance(raw_clean_for, dict):
        errors.append("'clean_for' must map defense names to a clean setting")
        raw_clean_for = {}
    for name, value in raw_clean_for.items():
        if name not in defenses.available():
            errors.append(f"clean_for names unknown defense {name!r}; valid defenses: "
                          f"{', '.join(defenses.available())}")
            continue
        setting = _clean_setting(value, f"clean_for.{name}", errors)
        if setting is not None:
            if setting.data_free and defenses.get(name).needs_data:
                errors.append(f"clean_for.{name}: {name} needs clean data, it cannot be data-free")
            clean_for[name] = setting

    defense_options = _option_map(raw, "defense_options", defenses.available(), "defense", errors)
    for name, options in defense_options.items():
        from ..defenses.base import make_options

        try:
            make_options(defenses.get(name).Options, options, name)
        except ConfigError as exc:
            errors.append(f"defense_options.{name}: {exc}")
    attack_options = _option_map(raw, "attack_options", attacks.available(), "attack", errors)
    for name, options in attack_options.items():
        valid = [f.name for f in dataclasses.fields(attacks.ATTACKS.get(name).Options)]
        bad = sorted(set(options) - set(valid))
        if bad:
            errors.append(f"attack_options.{name}: unknown option(s) {bad}; valid options: "
                          f"{', '.join(valid) or '(none)'}")
    model_options = _option_map(raw, "model_options", models.available(), "architecture", errors)

    test_images = raw.get("test_images")
    if test_images is not None and not (_is(test_images, int) and test_images > 0):
        errors.append(f"'test_images' must be a positive integer, got {test_images!r}")
    device = raw.get("device", "cpu")
    if device not in ("cpu", "cuda", "auto") and not str(device).startswith("cuda:"):
        errors.append(f"'device' must be cpu, cuda, cuda:N or auto, got {device!r}")
    models_dir = raw.get("models_dir")
    if models_dir is not None:
        if not isinstance(models_dir, str):
            errors.append("'models_dir' must be a path")
            models_dir = None
        elif base_dir is not None and not Path(models_dir).is_absolute() \
                and not Path(models_dir).exists() and (base_dir / models_dir).exists():
            models_dir = str(base_dir / models_dir)
    pattern = raw.get("model_pattern", DEFAULT_MODEL_PATTERN)
    try:
        str(pattern).format(dataset="d", arch="a", attack="t", seed=0)
    except (KeyError, IndexError, ValueError) as exc:
        errors.append(f"'model_pattern' may use {{dataset}}, {{arch}}, {{attack}}, {{seed}}; "
                      f"got {pattern!r} ({exc})")
    name = raw.get("name") or (Path(source).stem if source else "bench")

    if errors:
        raise ConfigError(f"{source}: {len(errors)} problem(s): " + "; ".join(errors))
    return BenchConfig(name=str(name), datasets=datasets, archs=archs, attacks=attack_names,
                       defenses=defense_names, seeds=seeds, train=train, clean=clean,
                       clean_for=clean_for, defense_options=defense_options,
                       attack_options=attack_options, model_options=model_options,
                       test_images=test_images, models_dir=models_dir, model_pattern=str(pattern),
                       device=str(device), source=source)


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _clean_setting(value: Any, where: str, errors: list[str]) -> CleanSetting | None:
    if value in ("none", None, "data-free", False):
        return CleanSetting(images=None, data_free=True)
    if not isinstance(value, dict) or set(value) - {"images", "per_class"} or len(value) != 1:
        errors.append(f"'{where}' must be {{images: N}}, {{per_class: K}} or none, got {value!r}")
        return None
    (key, n), = value.items()
    if not _is(n, int) or n < 1:
        errors.append(f"'{where}.{key}' must be a positive integer, got {n!r}")
        return None
    return CleanSetting(images=n) if key == "images" else CleanSetting(images=None, per_class=n)


def _option_map(raw: dict, key: str, valid: list[str], kind: str, errors: list[str]) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        errors.append(f"'{key}' must map {kind} names to option mappings")
        return {}
    out = {}
    for name, options in value.items():
        if name not in valid:
            errors.append(f"{key} names unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")
        elif not isinstance(options, dict):
            errors.append(f"{key}.{name} must be a mapping of option: value")
        else:
            out[name] = dict(options)
    return out
