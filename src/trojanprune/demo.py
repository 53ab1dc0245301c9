"""``trojanprune demo``: the whole story in under two minutes on a laptop CPU, with no data
files and no network. scikit-learn's handwritten digits (an installed package's real data)
train a LeNet-5 with a BadNets backdoor; every available defense then repairs a copy using
clean images from the training split, and a table shows ACC/ASR/RA/DER before and after."""

from __future__ import annotations

import time

import torch

from rich.table import Table

from . import attacks, data, defenses, metrics, models
from .data import DEFAULT_DEMO_DATASET
from .progress import console, log
from .repair import repair
from .training import TrainConfig, train
from .utils import seed_everything

DEMO_CLEAN_IMAGES = 300


def run_demo(seed: int = 0, epochs: int = 30, methods: list[str] | None = None) -> list[dict]:
    start = time.perf_counter()
    # LeNet-5 on 16x16 images is too small to gain from a second thread, and OpenMP threads
    # that wait on a busy core make it many times slower.
    torch.set_num_threads(1)
    seed_everything(seed)
    train_set = data.load_dataset(DEFAULT_DEMO_DATASET, "train")
    test_set = data.load_dataset(DEFAULT_DEMO_DATASET, "test")
    attack = attacks.create("badnets", train_set.image_shape, train_set.num_classes, target=0,
                            seed=seed)
    poisoned, index = attack.poison(train_set, rate=0.1, seed=seed)
    log(f"[bold]1. attack[/bold]: BadNets (3x3 white patch, target class 0) poisons {len(index)} "
        f"of {len(train_set)} {DEFAULT_DEMO_DATASET} training images")
    model = models.create("lenet5", train_set.num_classes, train_set.image_shape[0],
                          input_size=train_set.image_shape[1])
    train(model, poisoned, TrainConfig(epochs=epochs, lr=0.05, batch_size=64, seed=seed))
    before = metrics.evaluate(model, test_set, attack)
    log(f"[bold]2. backdoored model[/bold]: ACC {before['acc']:.1f}%  ASR {before['asr']:.1f}%  "
        f"RA {before['ra']:.1f}% on {len(test_set)} test images")
    clean = data.clean_subset(train_set, n=DEMO_CLEAN_IMAGES, seed=seed)
    rows = [{"method": "none (backdoored)", **before, "der": None, "pruned": 0, "seconds": 0.0}]
    methods = methods if methods is not None else defenses.available()
    log(f"[bold]3. repair[/bold] with {len(clean)} clean training images: {', '.join(methods) or 'no defenses yet'}")
    for method in methods:
        defense = defenses.get(method)
        needs_data = defense.needs_data or defense.per_class_images > 0
        given = clean
        if defense.per_class_images:  # a few-shot method gets its paper's setting
            given = data.clean_subset(train_set, per_class=defense.per_class_images, seed=seed)
        result = repair(model, given if needs_data else None, method=method, seed=seed,
                        progress=False)
        after = metrics.evaluate(result.model, test_set, attack)
        der = metrics.der(before["acc"] / 100, after["acc"] / 100, before["asr"] / 100,
                          after["asr"] / 100)
        setting = (" (data-free)" if not needs_data else
                   f" ({defense.per_class_images}/class)" if defense.per_class_images else "")
        rows.append({"method": method + setting, **after,
                     "der": 100 * der, "pruned": len(result.pruned), "seconds": result.seconds})
    table = Table(title=f"BadNets on {DEFAULT_DEMO_DATASET} / LeNet-5 (seed {seed})")
    for col in ("defense", "ACC %", "ASR %", "RA %", "DER %", "pruned", "seconds"):
        table.add_column(col, justify="left" if col == "defense" else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['acc']:.1f}", f"{r['asr']:.1f}", f"{r['ra']:.1f}",
                      "-" if r["der"] is None else f"{r['der']:.1f}", str(r["pruned"]),
                      f"{r['seconds']:.1f}")
    console.print(table)
    log(f"demo finished in {time.perf_counter() - start:.0f} s")
    return rows
