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
    :func:`trojanprune.testing.mnist_badnets_case` (MNIST, BadNets, target 0), with its 500 clean
    training images (the defender's data), 2,000 test images and the metrics before any defense."""
    return _trained_case("badnets", shared_data_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def wanet_case(shared_data_dir, tmp_path_factory):
    """The same narrow MNIST model with a WaNet backdoor (a fixed warp, target 0), trained in the
    test setup (~30 s on one core): :func:`trojanprune.testing.mnist_wanet_case`."""
    return _trained_case("wanet", shared_data_dir, tmp_path_factory)


def _trained_case(attack: str, shared_data_dir, tmp_path_factory):
    """:func:`trojanprune.testing.mnist_case` for ``attack``, checked to really carry it."""
    import os

    os.environ.setdefault("TROJANPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    from trojanprune.testing import mnist_case

    case = mnist_case(attack, shared_data_dir)
    assert case.before["asr"] > 90 and case.before["acc"] > 90, case.before
    return case
