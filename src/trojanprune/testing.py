"""A small model that really carries a backdoor, for the test suite and quick experiments.

The test suite's defenses are checked on it (tests/conftest.py ``backdoor_case``), and
``benchmarks/onp_fixture_seeds.py`` measures ONP on it over several seeds; both build it here so
the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from . import attacks, data, metrics, models
from .training import TrainConfig, train
from .utils import derive_seed

#: ONP on :func:`mnist_badnets_case` as the test suite runs it: 128 episodes, and shorter trigger
#: reverses than Neural Cleanse's 300 steps x 32 images per class (on the fixture they still flag
#: the real target, class 0).
ONP_FIXTURE_OPTIONS = dict(episodes=128, reverse_steps=150, reverse_batch_size=8, feature_steps=150,
                           feature_per_class=5, warp_steps=30)


def mnist_badnets_case(data_dir: str | Path | None = None) -> SimpleNamespace:
    """A narrow vgg_small (widths 16/32/64) trained for 2 epochs on 10,000 MNIST training
    images with BadNets (3x3 white patch, target 0, 10% poisoning); ~15 s on one core.

    Returns ``model`` (eval mode), ``attack``, ``clean`` (500 images from the training split,
    disjoint from the 10,000 the model was trained on: the defender's data), ``test`` (2,000 test
    images), ``train`` (the unpoisoned training subset) and ``before`` (metrics before any defense).
    """
    return mnist_case("badnets", data_dir)


def mnist_wanet_case(data_dir: str | Path | None = None) -> SimpleNamespace:
    """As :func:`mnist_badnets_case` with WaNet (BackdoorBench's k=4, s=0.5, noise mode, target
    0, 10% poisoning) instead of BadNets; ~30 s on one core (ASR 96.6%, ACC 97.5%)."""
    return mnist_case("wanet", data_dir)


def mnist_case(attack_name: str, data_dir: str | Path | None = None) -> SimpleNamespace:
    """The narrow MNIST vgg_small of :func:`mnist_badnets_case` backdoored by ``attack_name``
    (at the attack's defaults, target 0, 10% poisoning)."""
    full = data.load_dataset("mnist", "train", data_dir=data_dir)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(derive_seed(0, "t")))
    train_set = full.subset(order[:10000])
    clean = data.clean_subset(full.subset(order[10000:20000]), n=500, seed=0)
    test = data.load_dataset("mnist", "test", data_dir=data_dir).subset(range(0, 10000, 5))
    attack = attacks.create(attack_name, train_set.image_shape, 10, target=0, seed=0)
    poisoned, _ = attack.poison(train_set, rate=0.1, seed=1)
    torch.manual_seed(0)
    model = models.create("vgg_small", 10, 1, dataset="mnist", widths=((16, 16), (32, 32), (64, 64)))
    # NCHW: the layout the figures quoted in the defense tests were measured on (the trainer's
    # default, channels-last, gives a slightly different model; it is tested in test_training.py)
    train(model, poisoned, TrainConfig(epochs=2, lr=0.05, seed=0, channels_last=False), progress=False)
    before = metrics.evaluate(model, test, attack)
    return SimpleNamespace(model=model.eval(), attack=attack, clean=clean, test=test,
                           before=before, train=train_set)
