"""ONP's greedy refinement step by step: test ACC and ASR after each step of recorded repairs.

A repair record (``trojanprune repair ... --method onp --json --out OUT``: ``OUT/repair.json``)
keeps the final pruning and, under ``details.choice.refine.steps``, the channels the
refinement added after the agent's choice, in order. This script rebuilds the pruning after
each step (the final one minus the later steps' channels; step 0 is the agent's choice alone,
i.e. the repair with ``refine_steps=0``) and measures it on the zoo model's test split with
the true trigger, which the defense never sees.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/refine_steps.py \\
        benchmarks/results/onp-stop29/*-refine6.json --out benchmarks/results/onp-stop29/refine-steps.md

A record's file name starts with the zoo run's name without ``cifar10-`` and ends in
``-seed<S>-<variant>.json`` (e.g. ``resnet20-badnets-seed1-refine6.json``);
``--zoo`` is where the runs are (benchmarks/zoo).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.runs import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+")
    ap.add_argument("--zoo", default="benchmarks/zoo")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["| record | step | channel added | backdoor score | test ACC drop | test ASR % |",
             "|---|---|---|---|---|---|"]
    for path in args.records:
        record = json.loads(Path(path).read_text())
        choice = record["details"]["choice"]
        steps = choice.get("refine", {}).get("steps", [])
        run = load_run(Path(args.zoo) / f"{args.dataset}-{Path(path).name.split('-seed')[0]}")
        model, attack = run.model.eval(), run.attack()
        x, y = run.test_set(args.data_dir).tensors()
        units = discover_units(model, x[:1])
        clean = MaskEvaluator(model, units, x, y)
        triggered = MaskEvaluator(model, units, attack.apply(x[y != attack.target]))
        final = [tuple(p) for p in record["pruned"]]
        masks = []
        for k in range(len(steps) + 1):
            later = {tuple(s["unit"]) for s in steps[k:]}
            masks.append(units.keep_mask([p for p in final if p not in later]))
        masks = torch.stack(masks).float()
        base = float(clean.accuracy(torch.ones(1, units.total))[0])
        acc, asr = clean.accuracy(masks), triggered.target_rate(masks, attack.target)
        for k in range(len(steps) + 1):
            added = "(the agent's choice)" if k == 0 else f"{steps[k - 1]['unit'][0]} {steps[k - 1]['unit'][1]}"
            score = choice["backdoor_score"] if k == 0 else steps[k - 1]["backdoor_score"]
            lines.append(f"| {Path(path).stem} | {k} | {added} | {score:.4f} | "
                         f"{100 * (base - float(acc[k])):.2f} | {100 * float(asr[k]):.2f} |")
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
