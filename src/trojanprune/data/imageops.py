"""Small image operations shared by the loaders: option parsing, decoding, resizing, channels.

Everything works on uint8 numpy arrays; PIL does the decoding and the (bilinear) resizing so
that an image gets the same pixels whichever loader produced it.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError

ImageSize = tuple[int, int]  # (height, width)

# PIL modes that hold a single grey channel; everything else is decoded as RGB.
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def parse_image_size(value: int | str | Sequence[int] | None) -> ImageSize | None:
    """Normalize ``image_size`` to ``(H, W)``: an int (square), ``"32"``, ``"32x28"`` or a pair."""
    if value is None:
        return None
    size: tuple
    try:
        if isinstance(value, str):
            parts = value.lower().replace(",", "x").split("x")
            size = tuple(int(p) for p in parts)
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            size = (int(value), int(value))
        else:
            size = tuple(int(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        size = ()
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2 or min(size) < 1 or max(size) > 4096:
        raise ConfigError(f"image_size must be a positive int or (height, width) up to 4096, "
                          f"e.g. 32 or (32, 32) or '32x32'; got {value!r}")
    return size  # type: ignore[return-value]


def parse_channels(value: int | None) -> int | None:
    """``channels`` may be None (keep what the data has), 1 (grey) or 3 (RGB)."""
    if value is None:
        return None
    if value not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3 (or None to keep the data's); got {value!r}")
    return int(value)


def decode_image(data: bytes, size: ImageSize | None, channels: int | None,
                 expect_size: ImageSize | None = None, label: str = "image") -> np.ndarray:
    """Decode encoded image bytes to a uint8 (H, W, C) array.

    ``size`` resizes (PIL bilinear); without it, ``expect_size`` (the first image's size) must
    match, since a batch tensor needs one size, and the error says how to fix it.
    ``channels=None`` keeps grey images grey (C=1) and makes everything else RGB (C=3).
    """
    try:
        image = Image.open(io.BytesIO(data))
        if size is None and expect_size is not None and (image.height, image.width) != expect_size:
            raise DataError(
                f"images differ in size ({expect_size[0]}x{expect_size[1]} first, "
                f"{image.height}x{image.width} for {label}); pass image_size=(H, W) "
                f"(--image-size) to resize them all")
        mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if image.mode in _GREY_MODES else "RGB")
        if image.mode.startswith("I;16") and mode == "L":
            # 16-bit grey: scale to 8 bits instead of letting convert() clip at 255.
            image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
        image = image.convert(mode)
        if size is not None and (image.height, image.width) != size:
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot decode {label}: {exc}") from exc
    return array[:, :, None] if array.ndim == 2 else array


def resize_images(images: np.ndarray, size: ImageSize | None) -> np.ndarray:
    """Resize a uint8 NCHW array with PIL bilinear (the same filter as for decoded files)."""
    if size is None or tuple(images.shape[2:]) == tuple(size):
        return images
    out = np.empty((images.shape[0], images.shape[1], size[0], size[1]), dtype=np.uint8)
    for i, image in enumerate(images):
        for c, plane in enumerate(image):
            resized = Image.fromarray(plane).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            out[i, c] = np.asarray(resized)
    return out


def convert_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    """Grey <-> RGB for a uint8 NCHW array; grey uses PIL's ITU-R 601-2 luma weights."""
    have = images.shape[1]
    if channels is None or channels == have:
        return images
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=1)
    if have == 3 and channels == 1:
        weights = np.array([299, 587, 114], dtype=np.uint32).reshape(1, 3, 1, 1)
        grey = (images.astype(np.uint32) * weights).sum(axis=1, keepdims=True)
        return ((grey + 500) // 1000).astype(np.uint8)
    raise DataError(f"cannot convert {have}-channel images to {channels} channels")
