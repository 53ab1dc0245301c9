"""The defense registry. ``available()`` lists the method names ``repair`` accepts."""

from __future__ import annotations

from ..registry import Registry
from .base import CleanData, Defense, RepairResult

DEFENSES: Registry = Registry("method")


def register(cls):
    DEFENSES.register(cls.name)(cls)
    return cls


def available() -> list[str]:
    _load_builtin()
    return DEFENSES.available()


def get(name: str) -> type[Defense]:
    _load_builtin()
    return DEFENSES.get(name)


_LOADED = False


def _load_builtin() -> None:
    # Imported lazily so that ``import trojanprune`` stays fast and free of optional deps.
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib

    for module in BUILTIN:
        importlib.import_module(f"{__name__}.{module}")


BUILTIN: tuple[str, ...] = ("ft", "fp", "clp", "anp", "rnp", "shappruning", "onp")

__all__ = ["available", "get", "register", "CleanData", "Defense", "RepairResult", "DEFENSES"]
