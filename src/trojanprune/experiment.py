"""Making a backdoored model: poison the training split, train, evaluate, save the run."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from . import attacks, data, metrics, models
from .progress import log
from .runs import ModelSpec, save_run
from .sources import describe
from .training import DEFAULT_AUGMENT, TrainConfig, train
from .utils import derive_seed, resolve_device, seed_everything


def make_backdoored_run(attack_name: str, dataset: str, arch: str, out: str | Path | None,
                        *, epochs: int = 15, poison_rate: float = 0.1, target: int = 0,
                        mode: str = "all-to-one", seed: int = 0, lr: float = 0.01,
                        batch_size: int = 128, augment: str | None = None,
                        train_size: int | None = None, image_size: int | None = None,
                        attack_options: dict | None = None, data_dir=None, device="cpu",
                        force: bool = False, progress: bool = True, model_kwargs=None,
                        return_model: bool = False):
    """Train ``arch`` on ``dataset`` poisoned by ``attack_name``; save to ``out`` (if given).

    Returns the run record (and the model and test set when ``return_model``).
    """
    seed_everything(seed)
    size = (image_size, image_size) if image_size else None
    train_set = data.load_dataset(dataset, "train", data_dir=data_dir, image_size=size)
    test_set = data.load_dataset(dataset, "test", data_dir=data_dir, image_size=size)
    if train_size is not None and train_size < len(train_set):
        pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(
            derive_seed(seed, "train-subset")))
        train_set = train_set.subset(pick[:train_size])
    attack = attacks.create(attack_name, train_set.image_shape, train_set.num_classes,
                            target=target, mode=mode, seed=seed, **(attack_options or {}))
    poisoned, poisoned_index = attack.poison(train_set, rate=poison_rate,
                                             seed=derive_seed(seed, "poison-index"))
    c = train_set.image_shape[0]
    spec = ModelSpec(train_set.num_classes, c, arch=arch,
                     kwargs=models.arch_kwargs(arch, train_set.image_shape, dataset, **(model_kwargs or {})))
    model = spec.build()
    config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                         augment=augment or DEFAULT_AUGMENT.get(dataset, "none"))
    dev = resolve_device(device)
    log(f"training {arch} on {dataset} ({len(poisoned)} images, {len(poisoned_index)} poisoned "
        f"by {attack_name}) for {epochs} epochs on {dev}")
    stats = train(model, poisoned, config, device=dev, progress=progress, log=log)
    start = time.perf_counter()
    scores = metrics.evaluate(model, test_set, attack)
    record = {
        "dataset": describe(train_set, dataset, image_size=size),
        "model": spec.to_dict(),
        "attack": attack.config(),
        "poison": {"rate": poison_rate, "count": len(poisoned_index)},
        "training": {**stats, "train_size": len(train_set),
                     "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        "seed": seed,
        "metrics": {k: round(v, 4) for k, v in scores.items()},
        "eval_seconds": round(time.perf_counter() - start, 3),
    }
    if out is not None:
        save_run(out, model.cpu(), record, force=force)
    if return_model:
        return record, model, test_set, attack
    return record

