"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The read-only real datasets (``<repo>/../shared/datasets``); skips the test if absent."""
    path = REPO_ROOT.parent / "shared" / "datasets"
    if not path.is_dir():
        pytest.skip(f"shared datasets not found at {path}")
    return path


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Two OpenMP threads on a shared 2-core machine make small forward passes ~100x slower
    when anything else runs; tests use one."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def backdoor_case(shared_data_dir, tmp_path_factory):
    """A model that really carries a backdoor, trained in the test setup (~15 s on one core):
    a narrow vgg_small (widths 16/32/64) on 10,000 MNIST training images, BadNets (3x3 white
    patch, target 0, 10% poisoning), 2 epochs. Also: 500 clean images from the training split
    (the defender's data), 2,000 test images, and the metrics before any defense."""
    import os
    from types import SimpleNamespace

    import torch

    from trojanprune import attacks, data, metrics, models
    from trojanprune.training import TrainConfig, train
    from trojanprune.utils import derive_seed

    os.environ.setdefault("TROJANPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    full = data.load_dataset("mnist", "train", data_dir=shared_data_dir)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(derive_seed(0, "t")))
    train_set = full.subset(order[:10000])
    clean = data.clean_subset(full.subset(order[10000:20000]), n=500, seed=0)
    test = data.load_dataset("mnist", "test", data_dir=shared_data_dir).subset(range(0, 10000, 5))
    attack = attacks.create("badnets", train_set.image_shape, 10, target=0, seed=0)
    poisoned, _ = attack.poison(train_set, rate=0.1, seed=1)
    torch.manual_seed(0)
    model = models.create("vgg_small", 10, 1, dataset="mnist",
                          widths=((16, 16), (32, 32), (64, 64)))
    # NCHW: the layout the figures quoted in the defense tests were measured on (the trainer's
    # default, channels-last, gives a slightly different model; it is tested in test_training.py)
    train(model, poisoned, TrainConfig(epochs=2, lr=0.05, seed=0, channels_last=False), progress=False)
    before = metrics.evaluate(model, test, attack)
    assert before["asr"] > 90 and before["acc"] > 90, before
    return SimpleNamespace(model=model.eval(), attack=attack, clean=clean, test=test,
                           before=before, train=train_set)
