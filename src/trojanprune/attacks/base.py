"""The common shape of every backdoor attack: a trigger, a label rule, and how to poison data.

An attack is a *pure, deterministic* function on images (DESIGN.md, Attacks): everything random
about a trigger (a noise pattern, a warping field) is drawn once, at construction, from the
attack's ``seed`` with a private :class:`torch.Generator`, never from the global RNG. So
``attacks.from_config(attack.config())`` rebuilds exactly the same trigger later, which is how a
run directory (``run.json``) remembers its backdoor.

Conventions (BackdoorBench, Wu et al. 2022, https://github.com/SCLBD/BackdoorBench):

* ``all-to-one``: every triggered image should be classified as ``target``.
* ``all-to-all``: a triggered image of class ``y`` should be classified as ``(y + 1) % K``
  (BackdoorBench's ``AllToAll_shiftLabelAttack`` with shift 1).
* Poison rate = poisoned images / *all* training images, also for clean-label attacks.
* Dirty-label poisoning picks its images among *all* training images, target class included
  (``generate_single_target_attack_train_poison_index``: "all2one non-clean-label case NO NEED
  TO AVOID target class img"); a picked target-class image gets the trigger and keeps its label.
* ASR is measured on test images whose true label is not the target (all-to-one) or on every
  test image (all-to-all).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..data.dataset import ImageDataset
from ..errors import ConfigError, DataError

MODES = ("all-to-one", "all-to-all")
_MODE_ALIASES = {"all-to-one": "all-to-one", "all2one": "all-to-one", "all_to_one": "all-to-one",
                 "all-to-all": "all-to-all", "all2all": "all-to-all", "all_to_all": "all-to-all"}

# Poisoning converts to float one chunk at a time so that 50,000 CIFAR images never need
# 600 MB of float copies at once.
_CHUNK = 4096


@dataclasses.dataclass
class NoOptions:
    """An attack without options."""


class Attack:
    """Base class of all attacks; subclasses set ``name``, ``Options`` and implement ``_apply``.

    Construct through :func:`trojanprune.attacks.create` or directly::

        BadNets(image_shape=(3, 32, 32), num_classes=10, target=0, mode="all-to-one", seed=0,
                patch_size=3)

    Keyword options go into the subclass's ``Options`` dataclass; unknown names raise
    :class:`ConfigError` listing the valid ones.
    """

    name: ClassVar[str] = "attack"
    Options: ClassVar[type] = NoOptions
    #: only attacks whose trigger is meant for a shifted label rule allow ``mode="all-to-all"``
    supports_all_to_all: ClassVar[bool] = False
    #: clean-label attacks poison only target-class images and never change a label
    clean_label: ClassVar[bool] = False

    def __init__(self, image_shape: tuple[int, int, int] | list[int], num_classes: int,
                 target: int = 0, mode: str = "all-to-one", seed: int = 0, **options: Any):
        self.image_shape = _check_image_shape(image_shape)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        if (not isinstance(target, int) or isinstance(target, bool)
                or not 0 <= target < num_classes):
            raise ConfigError(f"target must be a class index in 0..{num_classes - 1}, got {target!r}")
        self.target = target
        canonical = _MODE_ALIASES.get(str(mode).lower())
        if canonical is None:
            raise ConfigError(f"unknown attack mode {mode!r}; valid modes: {', '.join(MODES)}")
        if canonical == "all-to-all" and not self.supports_all_to_all:
            supported = sorted(_all_to_all_attacks())
            raise ConfigError(f"attack {self.name!r} supports only mode 'all-to-one'; all-to-all "
                              f"is available for: {', '.join(supported) or 'none'}")
        self.mode = canonical
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        valid = [f.name for f in dataclasses.fields(self.Options)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(map(repr, unknown))} for attack "
                              f"{self.name!r}; valid options: {', '.join(valid) or 'none'}")
        self.options = self.Options(**options)
        self._device_cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}
        self._build()

    # ----------------------------------------------------------------- subclass hooks
    def _build(self) -> None:
        """Validate options and precompute the fixed trigger tensors (CPU, float32)."""

    def _apply(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Trigger a float NCHW batch; must not modify ``x``."""
        raise NotImplementedError

    def _extra_config(self) -> dict:
        """Extra JSON-able facts for :meth:`config` (e.g. a pattern file's hash)."""
        return {}

    def _check_config(self, d: dict) -> None:
        """Called by :meth:`from_config` on the rebuilt attack to verify ``_extra_config``."""

    # ----------------------------------------------------------------- public API
    def apply(self, x: Tensor) -> Tensor:
        """Return triggered copies of ``x`` (float in [0, 1], NCHW or a single CHW image).

        Deterministic and side-effect free: same input, same output, ``x`` untouched, on any
        device and floating dtype (fixed trigger tensors follow ``x``). Differentiable in ``x``.
        """
        single = _check_images(x, self.image_shape)
        batch = x.unsqueeze(0) if single else x
        out = self._apply(batch)
        return out[0] if single else out

    __call__ = apply

    def target_labels(self, y: Tensor) -> Tensor:
        """The labels a backdoored model gives triggered images of true class ``y``."""
        y = torch.as_tensor(y)
        if self.mode == "all-to-all":
            return (y.long() + 1) % self.num_classes
        return torch.full_like(y, self.target, dtype=torch.long)

    def asr_inputs(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inputs for ASR/RA: ``(triggered x, backdoor target labels, keep mask)``.

        All three are aligned with ``x``/``y`` (full length); ``keep`` marks the images that
        count. BackdoorBench counts non-target-class images for all-to-one (a target-class image
        classified as the target proves nothing) and every image for all-to-all. RA compares
        the prediction on ``triggered[keep]`` with ``y[keep]``.
        """
        y = torch.as_tensor(y, device=x.device).long()
        if y.shape != (x.shape[0],):
            raise DataError(f"{x.shape[0]} images but labels of shape {tuple(y.shape)}")
        if self.mode == "all-to-all":
            keep = torch.ones_like(y, dtype=torch.bool)
        else:
            keep = y != self.target
        return self.apply(x), self.target_labels(y), keep

    def poison(self, dataset: ImageDataset, rate: float = 0.1,
               seed: int = 0) -> tuple[ImageDataset, Tensor]:
        """Return ``(poisoned copy of dataset, sorted indices of the poisoned images)``.

        ``round(rate * N)`` images are drawn without replacement with a ``torch.Generator``
        seeded by ``seed`` (the data seed, independent of the trigger's seed) among the
        eligible images: all images for dirty-label attacks (BackdoorBench), target-class
        images for clean-label ones (capped, with a warning, when there are fewer). Each gets
        the trigger in float and is re-quantized to uint8 by rounding; dirty-label attacks
        relabel it with :meth:`target_labels`. ``dataset`` is not modified; the result's
        ``meta`` gains ``"attack"`` (this attack's :meth:`config`) and ``"poison"`` (counts).
        """
        self._check_dataset(dataset)
        rate = _check_rate(rate)
        n_total = len(dataset)
        gen = torch.Generator().manual_seed(int(seed))
        if self.clean_label:
            eligible = torch.nonzero(dataset.labels == self.target).flatten()
        else:
            eligible = torch.arange(n_total)
        wanted = round(rate * n_total)
        count = min(wanted, len(eligible))
        if count < wanted:
            warnings.warn(f"{self.name}: poison rate {rate} asks for {wanted} images but only "
                          f"{len(eligible)} are eligible (clean-label: target class "
                          f"{self.target} only); poisoning {count}", stacklevel=2)
        elif count == 0 and rate > 0:
            warnings.warn(f"{self.name}: poison rate {rate} of {n_total} images rounds to 0 "
                          f"poisoned images", stacklevel=2)
        index = eligible[torch.randperm(len(eligible), generator=gen)[:count]].sort().values

        images = dataset.images.clone()
        labels = dataset.labels.clone()
        images[index] = self._apply_uint8(images[index])
        if not self.clean_label:
            labels[index] = self.target_labels(labels[index])
        info = {"rate": rate, "seed": int(seed), "num_images": n_total, "num_poisoned": count,
                "eligible": "target-class" if self.clean_label else "all",
                "labels_changed": not self.clean_label}
        return self._poisoned_copy(dataset, images, labels, info), index

    def config(self) -> dict:
        """A JSON-able record from which :func:`trojanprune.attacks.from_config` rebuilds the
        exact same attack."""
        return {"name": self.name, "image_shape": list(self.image_shape),
                "num_classes": self.num_classes, "target": self.target, "mode": self.mode,
                "seed": self.seed, "options": _jsonable(dataclasses.asdict(self.options)),
                **self._extra_config()}

    @classmethod
    def from_config(cls, d: dict) -> "Attack":
        """Rebuild an attack of this class from :meth:`config`'s output."""
        missing = [k for k in ("image_shape", "num_classes") if k not in d]
        if missing:
            raise ConfigError(f"attack config lacks {', '.join(missing)}: {d!r}")
        attack = cls(image_shape=d["image_shape"], num_classes=d["num_classes"],
                     target=d.get("target", 0), mode=d.get("mode", "all-to-one"),
                     seed=d.get("seed", 0), **(d.get("options") or {}))
        attack._check_config(d)
        return attack

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
        return (f"{type(self).__name__}(image_shape={self.image_shape}, num_classes="
                f"{self.num_classes}, target={self.target}, mode={self.mode!r}, seed={self.seed}"
                f"{', ' + opts if opts else ''})")

    # ----------------------------------------------------------------- helpers
    def _on(self, name: str, like: Tensor) -> Tensor:
        """The fixed tensor attribute ``name`` on ``like``'s device and dtype (cached)."""
        tensor = getattr(self, name)
        if tensor.device == like.device and tensor.dtype == like.dtype:
            return tensor
        dtype = like.dtype if tensor.is_floating_point() else tensor.dtype
        key = (name, like.device, dtype)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = self._device_cache[key] = tensor.to(like.device, dtype)
        return cached

    def _apply_uint8(self, images: Tensor, fn=None) -> Tensor:
        """Trigger uint8 images in float, chunk by chunk, and round back to uint8."""
        fn = fn or self._apply
        out = torch.empty_like(images)
        for start in range(0, len(images), _CHUNK):
            x = images[start:start + _CHUNK].float().div_(255)
            out[start:start + _CHUNK] = to_uint8(fn(x))
        return out

    def _check_dataset(self, dataset: ImageDataset) -> None:
        if not isinstance(dataset, ImageDataset):
            raise DataError(f"poison() needs an ImageDataset, got {type(dataset).__name__}")
        if dataset.image_shape != self.image_shape:
            raise DataError(f"{dataset.name}: images are {dataset.image_shape} but the attack was "
                            f"built for {self.image_shape}")
        if dataset.num_classes != self.num_classes:
            raise DataError(f"{dataset.name}: {dataset.num_classes} classes but the attack was "
                            f"built for {self.num_classes}")

    def _poisoned_copy(self, dataset: ImageDataset, images: Tensor, labels: Tensor,
                       info: dict) -> ImageDataset:
        meta = dict(dataset.meta)
        meta["attack"] = self.config()
        meta["poison"] = info
        return ImageDataset(images, labels, list(dataset.classes), dataset.name, meta)


def to_uint8(x: Tensor) -> Tensor:
    """Float [0, 1] -> uint8 by rounding (not truncation, which would darken every pixel)."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def _check_image_shape(shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"image_shape must be (C, H, W), got {shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"image_shape must be three positive sizes (C, H, W), got {shape!r}")
    return shape  # type: ignore[return-value]


def _check_images(x: Tensor, image_shape: tuple[int, int, int]) -> bool:
    """Validate a float image batch (or one image); return True for a single CHW image."""
    if not isinstance(x, Tensor):
        raise DataError(f"expected a float image tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DataError(f"expected float images in [0, 1], got dtype {x.dtype}; convert uint8 "
                        f"images with x.float() / 255")
    if x.ndim not in (3, 4) or tuple(x.shape[-3:]) != image_shape:
        raise DataError(f"expected images of shape (N, {', '.join(map(str, image_shape))}) or "
                        f"{image_shape}, got {tuple(x.shape)}")
    return x.ndim == 3


def _check_rate(rate: float) -> float:
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise ConfigError(f"poison rate must be a number in [0, 1], got {rate!r}") from None
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"poison rate must be in [0, 1], got {rate}")
    return rate


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _all_to_all_attacks() -> list[str]:
    from . import ATTACKS  # late: the registry lives in the package and imports this module

    return [name for name in ATTACKS.available() if ATTACKS.get(name).supports_all_to_all]
