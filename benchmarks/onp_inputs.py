"""What ONP's probes see on a zoo run, rebuilt for the diagnostic scripts (probe_vote.py,
feature_layers.py): the defender's clean training images, split as ONP splits them."""

from __future__ import annotations

from types import SimpleNamespace

from trojanprune import data
from trojanprune.defenses.onp import Options
from trojanprune.engine import discover_units
from trojanprune.repair import to_clean_data
from trojanprune.runs import load_run
from trojanprune.utils import derive_seed


def onp_inputs(path, options: Options, *, clean: int = 500, seed: int = 0, data_dir=None) -> SimpleNamespace:
    """The run at ``path``: its model (eval mode) and units, ``clean`` images from the training
    split (seeded as ``trojanprune repair --clean`` draws them), ONP's fit and held-out halves,
    the class count, and the true target (for evaluation only; no probe sees it)."""
    run = load_run(path)
    train = data.load_dataset(run.record["dataset"]["name"], "train", data_dir=data_dir)
    defender = to_clean_data(data.clean_subset(train, n=clean, seed=seed), train.num_classes, "cpu")
    fit, held = defender.split(options.holdout, seed=derive_seed(seed, "onp-holdout"))
    model = run.model.eval()
    return SimpleNamespace(model=model, units=discover_units(model, defender.x[:1]), fit=fit,
                           held=held, num_classes=train.num_classes,
                           true_target=int(run.record["attack"]["target"]))
