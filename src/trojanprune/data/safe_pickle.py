"""Unpickling of numpy-only data pickles (CIFAR-10's python batches) without running code.

CIFAR-10's official python release stores its batches as pickled dicts of numpy arrays, a
fixed, well-known format. A plain ``pickle.load`` would still run whatever callable a tampered
file names, so this unpickler resolves only the handful of numpy functions needed to rebuild
an ndarray and a dtype, and refuses every other global. Lists, dicts, bytes, str and numbers
need no globals at all.
"""

from __future__ import annotations

import importlib
import io
import pickle
from typing import Any

from ..errors import DataError

# (module, name) pairs an ndarray pickle refers to, across numpy 1.x and 2.x and protocols.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
# numpy 2 renamed numpy.core to numpy._core; old pickles name the old one.
_RENAMED = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy.core.numeric": "numpy._core.numeric"}


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode`` that only performs the text-to-bytes encodings."""
    if encoding.lower().replace("-", "").replace("_", "") not in {"latin1", "utf8", "ascii"}:
        raise pickle.UnpicklingError(f"refusing codec {encoding!r}")
    return text.encode(encoding)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose ``find_class`` only returns whitelisted numpy globals."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode  # how Python 3 writes bytes into a protocol-2 pickle
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        target = _RENAMED.get(module, module)
        try:
            return getattr(importlib.import_module(target), name)
        except (ImportError, AttributeError):
            return getattr(importlib.import_module(module), name)


def load_numpy_pickle(data: bytes, label: str) -> Any:
    """Unpickle ``data`` allowing only numpy arrays and plain containers.

    ``encoding='latin1'`` is what numpy arrays pickled by Python 2 (the CIFAR release) need:
    their raw buffers were byte strings.
    """
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{label}: not a plain numpy data pickle ({exc})") from exc
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            ImportError) as exc:
        raise DataError(f"{label}: corrupt pickle ({type(exc).__name__}: {exc})") from exc
