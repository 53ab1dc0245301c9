"""Backdoor attacks: triggers as pure functions on images, plus training-set poisoning.

    from trojanprune import attacks
    attack = attacks.create("badnets", image_shape=(3, 32, 32), num_classes=10)
    poisoned, index = attack.poison(train_set, rate=0.1, seed=0)
    x_bd, y_bd, keep = attack.asr_inputs(x_test, y_test)
    same = attacks.from_config(attack.config())   # what run.json stores

Registered: ``badnets``, ``blended``, ``wanet``, ``sig`` (see each module for the paper and the
BackdoorBench defaults). A new attack subclasses :class:`Attack` and is registered with
``ATTACKS.register("name")(MyAttack)``.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..registry import Registry
from .badnets import BadNets, BadNetsOptions
from .base import Attack, to_uint8
from .blended import Blended, BlendedOptions
from .sig import SIG, SIGOptions
from .wanet import WaNet, WaNetOptions

ATTACKS: Registry[type[Attack]] = Registry("attack")
for _cls in (BadNets, Blended, WaNet, SIG):
    ATTACKS.register(_cls.name)(_cls)
del _cls


def create(name: str, image_shape: tuple[int, int, int], num_classes: int, target: int = 0,
           mode: str = "all-to-one", seed: int = 0, **options: Any) -> Attack:
    """Build a registered attack; ``options`` are the attack's own (see its ``Options``)."""
    return ATTACKS.get(name)(image_shape=image_shape, num_classes=num_classes, target=target,
                             mode=mode, seed=seed, **options)


def available() -> list[str]:
    """Names of the registered attacks."""
    return ATTACKS.available()


def from_config(d: dict) -> Attack:
    """Rebuild the exact attack that produced ``d = attack.config()``."""
    if not isinstance(d, dict) or "name" not in d:
        raise ConfigError(f"an attack config must be a dict with a 'name', got {d!r}")
    return ATTACKS.get(d["name"]).from_config(d)


__all__ = ["ATTACKS", "Attack", "BadNets", "BadNetsOptions", "Blended", "BlendedOptions", "SIG",
           "SIGOptions", "WaNet", "WaNetOptions", "available", "create", "from_config",
           "to_uint8"]
