"""Where datasets are read from and where decoded arrays are cached.

The data root may be a shared, read-only folder (CI mounts ``shared/datasets``), so decoded
caches never go next to the data: they live in their own cache folder.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "TROJANPRUNE_DATA"
CACHE_ENV = "TROJANPRUNE_CACHE"


def _user_cache_home() -> Path:
    """``$XDG_CACHE_HOME`` when set (as on Linux desktops and some CI), else ``~/.cache``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() if xdg else Path.home() / ".cache"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: the argument (``--data-dir``), else ``$TROJANPRUNE_DATA``, else a cache folder.

    The folder is not required to exist: the loaders say which files to put where.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return _user_cache_home() / "trojanprune" / "data"


def cache_dir() -> Path:
    """Folder for decoded-array caches: ``$TROJANPRUNE_CACHE``, else ``~/.cache/trojanprune/cache``.

    Not created here; the cache writer creates it when it first stores something.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return _user_cache_home() / "trojanprune" / "cache"
