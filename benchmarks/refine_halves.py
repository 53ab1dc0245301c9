"""Where the winner's curse sits: each refinement step's accuracy drop on the defender's two halves.

ONP splits its clean images into a fit half (probe, graph features) and a held-out half (the
reward and the final choice). For every step of recorded repairs (as ``refine_steps.py``:
step 0 is the agent's choice) this prints the accuracy drop in points on the fit half, on the
held-out half and on the test split, all against the unpruned model:

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/refine_halves.py RECORD.json ... > halves.txt
    python benchmarks/refine_halves.py --summarize halves.txt   # mean test drop minus each half's

Record names as in ``refine_steps.py`` (``<arch>-<attack>-seed<S>-<variant>.json``); the zoo
is ``benchmarks/zoo``, the dataset CIFAR-10. The split is ONP's own
(``CleanData.split(holdout=0.5, seed=derive_seed(seed, "onp-holdout"))``).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from trojanprune.defenses.base import CleanData
from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.runs import load_run
from trojanprune.utils import derive_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refine_steps import defender_clean, step_masks  # noqa: E402  (the same steps and clean set)


def summarize(path: str) -> None:
    rows = [line.split() for line in open(path) if line.strip()]
    test = [float(r[7]) for r in rows]
    for name, col in (("fit half", 3), ("held-out half", 5)):
        gap = [t - float(r[col]) for t, r in zip(test, rows)]
        print(f"{name}: test drop minus its drop, mean {statistics.mean(gap):.2f} sd "
              f"{statistics.stdev(gap):.2f} points over {len(gap)} prunings")


def main(records: list[str]) -> None:
    torch.set_num_threads(1)
    train = {}
    for path in records:
        rec = json.loads(Path(path).read_text())
        run = load_run(Path("benchmarks/zoo") / f"cifar10-{Path(path).name.split('-seed')[0]}")
        model = run.model.eval()
        x, y = defender_clean(run, rec, train)
        fit, held = CleanData(x, y, 10).split(0.5, seed=derive_seed(rec["seed"], "onp-holdout"))
        tx, ty = run.test_set().tensors()
        units = discover_units(model, x[:1])
        masks = step_masks(rec, units)
        full = torch.ones(1, units.total)
        drops = []
        for name, (xx, yy) in {"fit": (fit.x, fit.y), "held": (held.x, held.y), "test": (tx, ty)}.items():
            ev = MaskEvaluator(model, units, xx, yy)
            drops.append((name, 100 * (ev.accuracy(full)[0] - ev.accuracy(masks))))
        for k in range(len(masks)):
            print(Path(path).stem, k, " ".join(f"{n} {float(d[k]):.2f}" for n, d in drops), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    else:
        main(sys.argv[1:])
