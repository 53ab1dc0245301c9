"""What every defense shares: its options dataclass, the clean data it gets, the result."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, DataError


@dataclass
class CleanData:
    """The defender's clean images (float [0,1], NCHW) and labels, on the working device."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return self.x.shape[0]

    def split(self, fraction: float, seed: int) -> tuple["CleanData", "CleanData"]:
        """A seeded, class-stratified split: (first part, held-out part of ``fraction``)."""
        g = torch.Generator().manual_seed(seed)
        held = []
        for c in self.y.unique().tolist():
            idx = (self.y == c).nonzero().flatten().cpu()
            idx = idx[torch.randperm(len(idx), generator=g)]
            held.append(idx[: int(round(len(idx) * fraction))])
        held_idx = torch.cat(held)
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[held_idx] = False
        keep_idx = keep.nonzero().flatten()
        dev = self.x.device
        return (CleanData(self.x[keep_idx.to(dev)], self.y[keep_idx.to(dev)], self.num_classes),
                CleanData(self.x[held_idx.to(dev)], self.y[held_idx.to(dev)], self.num_classes))

    def batches(self, batch_size: int, generator: torch.Generator):
        """Endless shuffled mini-batches (for mask optimization loops)."""
        while True:
            order = torch.randperm(len(self), generator=generator).to(self.x.device)
            for start in range(0, len(self), batch_size):
                idx = order[start:start + batch_size]
                yield self.x[idx], self.y[idx]


@dataclass
class RepairResult:
    """What a defense returns. ``pruned`` lists (module name, channel index) pairs; for a
    residual group the module name is the group's representative conv."""

    model: nn.Module
    method: str
    pruned: list[tuple[str, int]] = field(default_factory=list)
    seconds: float = 0.0
    evaluations: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    verdict: str | None = None  # "backdoor detected" / "no backdoor detected" for detectors
    target: int | None = None
    details: dict[str, Any] = field(default_factory=dict)  # method-specific, JSON-able
    total_units: int | None = None
    #: pictures worth showing a person (e.g. a reversed trigger's mask and pattern): name ->
    #: CHW float tensor in [0, 1]; the CLI saves each as <name>.png
    images: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def decision(self) -> str | None:
        """The method's own one-line account of its choice (why it stopped, why it pruned
        nothing), when its details carry one."""
        return method_decision(self.details)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "seed": self.seed, "seconds": round(self.seconds, 3),
            "evaluations": self.evaluations, "pruned_count": len(self.pruned),
            "total_units": self.total_units,
            "pruned": [[name, int(ch)] for name, ch in self.pruned],
            "verdict": self.verdict, "target": self.target,
            "options": _jsonable(self.options), "details": _jsonable(self.details),
        }


def method_decision(details: Any) -> str | None:
    """A result's (or a saved record's) ``details``: the method's one-line account of its
    choice, where a defense writes one (``reason``, ``mitigation.reason``, ``forced``,
    ``choice.reason``)."""
    for path in (("reason",), ("mitigation", "reason"), ("forced",), ("choice", "reason")):
        value = details
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if isinstance(value, str) and value:
            return value
    return None


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, float):
        return round(value, 6)
    return value


class Defense:
    """Base of every defense. A subclass sets ``name``, ``Options`` (a dataclass with
    paper-sourced, documented defaults), ``needs_data``/``min_images`` and implements
    :meth:`run` on a private copy of the model. ``per_class_images`` is the few-shot setting a
    method is designed for (images per class), 0 when it is meant for a larger clean set."""

    name: ClassVar[str]
    Options: ClassVar[type]
    needs_data: ClassVar[bool] = True
    min_images: ClassVar[int] = 10
    per_class_images: ClassVar[int] = 0
    summary: ClassVar[str] = ""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu", progress: bool = False,
                 **options: Any):
        self.seed = seed
        self.device = torch.device(device)
        self.progress = progress
        self.options = make_options(self.Options, options, self.name)

    def run(self, model: nn.Module, clean: CleanData | None) -> RepairResult:
        raise NotImplementedError

    def repair(self, model: nn.Module, clean: CleanData | None) -> RepairResult:
        start = time.perf_counter()
        result = self.run(model, clean)
        result.seconds = time.perf_counter() - start
        result.options = dataclasses.asdict(self.options)
        result.seed = self.seed
        result.method = self.name
        return result


def make_options(cls: type, values: dict[str, Any], method: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for method {method!r}; valid options: "
                          f"{', '.join(sorted(names)) or '(none)'}")
    coerced = {}
    for key, value in values.items():
        default = getattr(cls, key, None) if not isinstance(names[key].default, dataclasses._MISSING_TYPE) else None
        if isinstance(default, bool) and isinstance(value, str):
            word = value.strip().lower()
            if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ConfigError(f"option {key} of {method} is true or false, got {value!r}")
            value = word in ("1", "true", "yes", "on")
        elif names[key].type in ("Any", Any):
            pass  # an option typed Any parses its own words (a number or "off"): see its __post_init__
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
            try:
                value = type(default)(value)
            except ValueError:
                raise ConfigError(f"option {key} of {method} takes a number, got {value!r}") from None
        coerced[key] = value
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad options for {method}: {exc}") from None


def optional_number(value, name: str, *, integer: bool = False, none_words=("", "none")):
    """An option whose default None means "off" or "the method decides" (the CLI passes it as
    a string): None or one of ``none_words`` -> None, else a number (an integer if
    ``integer``). A bool is refused, not read as 0 or 1."""
    if value is None or (isinstance(value, str) and value.strip().lower() in none_words):
        return None
    what = "an integer" if integer else "a number"
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if integer:
            if number != int(number):
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"option {name} takes {what} or '{none_words[-1]}', got {value!r}") from None


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise DataError(f"NaN or infinity appeared in {what}; the input model is untouched. Try a "
                        f"smaller learning rate or check the clean data")
