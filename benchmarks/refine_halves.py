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
import json, sys
from pathlib import Path
import torch
from trojanprune import data
from trojanprune.defenses.base import CleanData
from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.runs import load_run
from trojanprune.utils import derive_seed
torch.set_num_threads(1)
if sys.argv[1] == "--summarize":
    import statistics
    rows = [line.split() for line in open(sys.argv[2]) if line.strip()]
    test = [float(r[7]) for r in rows]
    for name, col in (("fit half", 3), ("held-out half", 5)):
        gap = [t - float(r[col]) for t, r in zip(test, rows)]
        print(f"{name}: test drop minus its drop, mean {statistics.mean(gap):.2f} sd "
              f"{statistics.stdev(gap):.2f} points over {len(gap)} prunings")
    sys.exit()
cache = {}
for path in sys.argv[1:]:
    rec = json.loads(Path(path).read_text())
    steps = rec["details"]["choice"].get("refine", {}).get("steps", [])
    run = load_run(Path("benchmarks/zoo") / f"cifar10-{Path(path).name.split('-seed')[0]}")
    model = run.model.eval()
    if "train" not in cache:
        cache["train"] = data.load_dataset("cifar10", "train")
    cs = data.clean_subset(cache["train"], n=rec["clean_images"], seed=rec["seed"])
    x, y = cs.tensors()
    clean = CleanData(x, y, 10)
    fit, held = clean.split(0.5, seed=derive_seed(rec["seed"], "onp-holdout"))
    tx, ty = run.test_set().tensors()
    units = discover_units(model, x[:1])
    final = [tuple(p) for p in rec["pruned"]]
    masks = torch.stack([units.keep_mask([p for p in final if p not in {tuple(s["unit"]) for s in steps[k:]}])
                         for k in range(len(steps) + 1)]).float()
    full = torch.ones(1, units.total)
    rows = []
    for name, (xx, yy) in {"fit": (fit.x, fit.y), "held": (held.x, held.y), "test": (tx, ty)}.items():
        ev = MaskEvaluator(model, units, xx, yy)
        rows.append((name, 100 * (ev.accuracy(full)[0] - ev.accuracy(masks))))
    for k in range(len(steps) + 1):
        print(Path(path).stem, k, " ".join(f"{n} {float(d[k]):.2f}" for n, d in rows), flush=True)
