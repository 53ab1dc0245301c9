"""A replay: would ONP's own reward accept moving the BatchNorm statistics by what its pruning
changed (``trojanprune.engine.batchnorm.pruning_shift``, estimated on the probe half of the
clean set)?

For each ONP grid cell (its pruning parsed from the cell's HTML report) this script rebuilds
what the repair saw (the same 500 clean images, split, units and backdoor probe, from the
cell's seed and options) and gives, on the defender's side, the held-out accuracy, the probe's
backdoor score and the reward of the pruning with and without the shift; then, on the test
split with the true trigger (which no defense sees), ACC / ASR / DER of both.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/bn_shift_gate.py \\
        benchmarks/results/grid-cifar10-vgg_small --only badnets --out OUT.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trojanprune import metrics
from trojanprune.engine import MaskEvaluator, apply_masks_permanently
from trojanprune.engine.batchnorm import pruning_shift, statistics_swapped
from trojanprune.runs import load_run

from bn_recalibration import pruned_from_report
from give_back import rebuild
from refine_steps import defender_clean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(ap)
    ap.add_argument("--only", nargs="*", default=None, help="attacks to replay (default: all)")
    ap.add_argument("--no-probe", action="store_true",
                    help="skip the probe (minutes a cell): clean accuracies and test figures only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for cell in onp_cells(args):
        if cell.get("report") and args.only and cell["attack"] not in args.only:
            continue  # --only filters the grid cells; records are replayed as given
        emit(replay(cell, args.data_dir, probe=not args.no_probe), args.out)


def add_cell_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments that name ONP prunings to replay (grids and records), and the run's."""
    ap.add_argument("grids", nargs="*", help="grid output folders: their ONP cells")
    ap.add_argument("--records", nargs="*", default=[],
                    help="ONP repair records (trojanprune repair --json) of zoo models, named "
                         "<arch>-<attack>-seed<S>-...json as in benchmarks/results/onp-stop30")
    ap.add_argument("--zoo", default="benchmarks/zoo")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="JSON lines, one per pruning")


def onp_cells(args) -> list[dict]:
    """The finished ONP cells of ``args.grids``, then ``args.records`` in the same shape."""
    cells = []
    for grid in args.grids:
        for line in Path(grid, "results.jsonl").read_text().splitlines():
            cell = json.loads(line)
            if cell.get("defense") == "onp" and cell["status"] == "ok":
                cells.append(cell)
    return cells + [record_cell(path, args.zoo) for path in args.records]


def emit(row: dict, out: str) -> None:
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def test_figures(cell: dict, model, test_set, attack) -> dict:
    """ACC, ASR (%), ACC drop (points, to 2 decimals) and DER (%) of ``model`` on the test split
    with the true trigger, against the cell's unpruned model."""
    after = metrics.evaluate(model, test_set, attack)
    return {"acc": after["acc"], "asr": after["asr"], "drop": round(cell["acc_before"] - after["acc"], 2),
            "der": 100 * metrics.der(cell["acc_before"] / 100, after["acc"] / 100,
                                     cell["asr_before"] / 100, after["asr"] / 100)}


def record_cell(path: str, zoo: str) -> dict:
    """A repair record in the shape of a grid cell (what ``replay`` reads)."""
    record = json.loads(Path(path).read_text())
    arch, attack = Path(path).name.split("-seed")[0].split("-", 1)
    return {"arch": arch, "attack": attack, "seed": record["seed"], "clean_images": record["clean_images"],
            "options": record["options"], "model_dir": str(Path(zoo) / f"cifar10-{arch}-{attack}"),
            "pruned": [tuple(p) for p in record["pruned"]], "acc_before": record["before"]["acc"],
            "asr_before": record["before"]["asr"], "acc_after": record["after"]["acc"],
            "asr_after": record["after"]["asr"]}


def replay(cell: dict, data_dir, probe: bool = True) -> dict:
    run = load_run(cell["model_dir"])
    x, y = defender_clean(run, cell, {}, data_dir)
    model, _, units, fit, held, measure = rebuild(run, x, y, cell["seed"], cell["options"], probe)
    pruned = cell.get("pruned") or pruned_from_report(cell["report"])
    keep = units.keep_mask(pruned)[None]
    fit_accuracy = MaskEvaluator(model, units, fit.x, fit.y)
    if not probe:
        held_accuracy = MaskEvaluator(model, units, held.x, held.y)
        measure = lambda k: {"acc": held_accuracy.accuracy(k)}  # noqa: E731

    def terms() -> dict:
        return {**{k: float(v[0]) for k, v in measure(keep).items()},
                "fit_acc": float(fit_accuracy.accuracy(keep)[0])}

    plain = terms()
    with statistics_swapped(model, pruning_shift(model, units, pruned, fit.x)):
        shifted = terms()
        shifted_model = apply_masks_permanently(model, units, pruned)
    test_set, attack = run.test_set(data_dir), run.attack()
    test = {name: test_figures(cell, m, test_set, attack)
            for name, m in (("plain", apply_masks_permanently(model, units, pruned)), ("shifted", shifted_model))}
    return {"cell": f"{cell['arch']} {cell['attack']} s{cell['seed']}", "pruned": len(pruned),
            "unpruned": ({k: float(v[0]) for k, v in measure.unpruned.items()} if probe else {}) | {
                "fit_acc": float(fit_accuracy.accuracy(torch.ones_like(keep))[0])},
            "defender": {"plain": plain, "shifted": shifted}, "test": test,
            "grid_cell": {"acc": cell["acc_after"], "asr": cell["asr_after"]}}

if __name__ == "__main__":
    main()
