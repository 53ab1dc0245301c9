"""ImageFolder datasets, from a directory or straight from a tar archive.

Accepted layouts (``<class>`` folders are sorted by name to give the labels, as torchvision's
ImageFolder does):

- split layout: ``train/<class>/*``, ``test/<class>/*`` (also ``val``/``valid``/``validation``);
  the class list is the union over all split folders, so train and test labels always agree;
- plain layout: ``<class>/*``, a single unsplit set (loadable as split ``train`` or None);
- either one wrapped in a single top folder (``cifar10/train/...``), as archives often are.

Images in sub-folders of a class folder count for that class. Hidden files (``.*``, macOS
``__MACOSX``) are skipped. Decoded arrays are cached (see :mod:`.cache`): CIFAR-10's 60,000
JPEGs are decoded once, later loads read one ``.npz``.
"""

from __future__ import annotations

import logging
import os
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import DataError
from .cache import DecodedArrays, load_or_build, source_fingerprint
from .dataset import ImageDataset
from .imageops import ImageSize, decode_image, parse_channels, parse_image_size

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff",
                    ".webp", ".gif"}
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class _Entry:
    parts: tuple[str, ...]  # path inside the folder or archive, split into components
    ref: object  # a Path (folder) or a TarInfo (archive)


def _is_image(parts: Sequence[str]) -> bool:
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return os.path.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS


def _list_folder(root: Path) -> list[_Entry]:
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root).parts
        for name in files:
            parts = (*rel, name)
            if _is_image(parts):
                entries.append(_Entry(parts, Path(folder) / name))
    return entries


def _list_tar(tar: tarfile.TarFile) -> list[_Entry]:
    entries = []
    for member in tar.getmembers():
        parts = tuple(p for p in member.name.replace("\\", "/").split("/") if p not in ("", "."))
        if member.isfile() and parts and _is_image(parts):
            entries.append(_Entry(parts, member))
    return entries


@dataclass
class _Layout:
    classes: list[str]
    entries: list[_Entry]  # the images of the chosen split
    labels: list[int]


def _resolve_layout(entries: list[_Entry], split: str | None, where: str) -> _Layout:
    """Find the split and class folders in a listing (see the module docstring)."""
    entries = [e for e in entries if len(e.parts) >= 2]  # an image must sit in a class folder
    if not entries:
        raise DataError(f"no images found in {where}: expected class folders <class>/*.png or "
                        f"train/<class>/*.png, test/<class>/*.png")
    depth = 0  # leading wrapper folders to skip
    while True:
        heads = {e.parts[depth] for e in entries}
        if heads & set(SPLIT_NAMES):
            break
        if len(heads) == 1 and min(len(e.parts) for e in entries) - depth >= 3:
            depth += 1
            continue
        break
    splits = sorted(heads & set(SPLIT_NAMES))
    if splits:
        in_splits = [e for e in entries if e.parts[depth] in splits and len(e.parts) - depth >= 3]
        classes = sorted({e.parts[depth + 1] for e in in_splits})
        if split is None:
            raise DataError(f"{where} has split folders {', '.join(splits)}: choose one with "
                            f"split=... (--split)")
        if split not in splits:
            raise DataError(f"{where} has no {split}/ folder (found {', '.join(splits)}/)")
        chosen = [e for e in in_splits if e.parts[depth] == split]
        class_index = {c: i for i, c in enumerate(classes)}
        return _Layout(classes, chosen, [class_index[e.parts[depth + 1]] for e in chosen])
    if split not in (None, "train"):
        raise DataError(f"{where} is one unsplit folder of class folders, so it has no {split!r} "
                        f"split; arrange it as train/<class>/ and {split}/<class>/")
    classes = sorted({e.parts[depth] for e in entries})
    class_index = {c: i for i, c in enumerate(classes)}
    return _Layout(classes, entries, [class_index[e.parts[depth]] for e in entries])


def _decode_all(blobs: Iterator[tuple[int, bytes, str]], count: int, size: ImageSize | None,
                channels: int | None) -> np.ndarray:
    """Decode ``count`` images (yielded as index, bytes, name) into one uint8 NCHW array."""
    decoded: list[np.ndarray | None] = [None] * count
    expect: ImageSize | None = None
    for index, data, name in blobs:
        image = decode_image(data, size, channels, expect_size=expect, label=name)
        expect = expect or (image.shape[0], image.shape[1])
        decoded[index] = image
    if any(image is None for image in decoded):
        raise DataError("some images could not be read from the archive")
    if len({image.shape[2] for image in decoded}) > 1:  # grey and colour files mixed: all RGB
        decoded = [np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im for im in decoded]
    return np.ascontiguousarray(np.stack(decoded).transpose(0, 3, 1, 2))


def _read_folder(root: Path, split: str | None, size: ImageSize | None,
                 channels: int | None) -> DecodedArrays:
    layout = _resolve_layout(_list_folder(root), split, str(root))

    def blobs() -> Iterator[tuple[int, bytes, str]]:
        for i, entry in enumerate(layout.entries):
            path: Path = entry.ref  # type: ignore[assignment]
            try:
                yield i, path.read_bytes(), str(path)
            except OSError as exc:
                raise DataError(f"cannot read {path}: {exc}") from exc

    images = _decode_all(blobs(), len(layout.entries), size, channels)
    return DecodedArrays(images, np.asarray(layout.labels, dtype=np.int64), layout.classes)


def _read_tar(path: Path, split: str | None, size: ImageSize | None,
              channels: int | None) -> DecodedArrays:
    try:
        with tarfile.open(path, "r:*") as tar:
            layout = _resolve_layout(_list_tar(tar), split, str(path))
            # Read in archive order: a compressed tar can only seek forward cheaply.
            order = sorted(range(len(layout.entries)),
                           key=lambda i: layout.entries[i].ref.offset_data)  # type: ignore

            def blobs() -> Iterator[tuple[int, bytes, str]]:
                for i in order:
                    member: tarfile.TarInfo = layout.entries[i].ref  # type: ignore[assignment]
                    f = tar.extractfile(member)
                    if f is None:
                        raise DataError(f"{path}: cannot read member {member.name}")
                    yield i, f.read(), f"{path}:{member.name}"

            images = _decode_all(blobs(), len(layout.entries), size, channels)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{path}: not a readable (or a truncated) tar archive ({exc})") from exc
    return DecodedArrays(images, np.asarray(layout.labels, dtype=np.int64), layout.classes)


def load_image_folder(path: str | os.PathLike, split: str | None = None,
                      image_size: int | Sequence[int] | str | None = None,
                      channels: int | None = None, name: str | None = None,
                      use_cache: bool = True) -> ImageDataset:
    """Load an ImageFolder (directory or ``.tar``/``.tar.gz``/``.tgz``) as an ImageDataset.

    ``split`` picks ``train``/``test``/... in a split layout (required there); an unsplit
    folder of class folders loads with ``split=None`` or ``"train"``. ``image_size`` (H, W)
    resizes every image (PIL bilinear); without it all images must share one size.
    ``channels`` forces grey (1) or RGB (3); by default grey files stay grey.
    """
    source = Path(path).expanduser()
    size = parse_image_size(image_size)
    channels = parse_channels(channels)
    if not source.exists():
        raise DataError(f"image folder {source} does not exist")
    archive = source.is_file()
    if archive and not (is_archive(source) or tarfile.is_tarfile(source)):
        raise DataError(f"{source} is neither a folder nor a tar archive (.tar, .tar.gz, .tgz)")
    label = name or _default_name(source)
    key = {"kind": "imagefolder", "source": source_fingerprint(source), "split": split,
           "image_size": size, "channels": channels}

    def build() -> DecodedArrays:
        start = time.perf_counter()
        log.info("decoding %s (split %s); the result is cached for later runs", source, split)
        arrays = (_read_tar if archive else _read_folder)(source, split, size, channels)
        log.info("decoded %d images in %.1f s", len(arrays.labels), time.perf_counter() - start)
        return arrays

    arrays, cache_file, hit = load_or_build(f"{label}-{split or 'all'}", key, build, use_cache)
    meta = {"source": str(source), "split": split, "format": "imagefolder",
            "cache": str(cache_file) if cache_file else None, "cache_hit": hit}
    return ImageDataset(torch.from_numpy(arrays.images), torch.from_numpy(arrays.labels),
                        list(arrays.classes), label, meta)


def _default_name(source: Path) -> str:
    stem = source.name
    for suffix in ARCHIVE_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem
