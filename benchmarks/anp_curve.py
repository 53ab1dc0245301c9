"""ANP's pruning order on a zoo model, judged on the test split: could any pruning count reach
BackdoorBench's operating point (ASR ~1% at a 5-7 point accuracy cost)?

Runs ANP's mask optimization exactly as ``trojanprune repair --method anp`` does (defaults, the
same 400 of 500 clean training images, seed), then prunes 1, 2, ... units in ANP's pruning order
and measures ACC and ASR on test images at each count, beside the held-out accuracy the
automatic rule sees and the counts that the paper's fixed threshold (0.2) and our rule pick.
The test split and the true trigger are used for this diagnosis only; no defense sees them.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/anp_curve.py \
        benchmarks/zoo/cifar10-vgg_small-blended --out benchmarks/results/anp-curves/blended.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trojanprune import data
from trojanprune.defenses.anp import Options
from trojanprune.defenses.neuron_perturbation import (optimize_anp_masks, pruning_order,
                                                      select_pruning, split_for_selection)
from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.repair import to_clean_data
from trojanprune.runs import load_run
from trojanprune.utils import seed_everything

COUNTS = [0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 130, 160, 200]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--clean", type=int, default=500)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    run = load_run(args.run_dir)
    model, attack = run.model, run.attack()
    train = data.load_dataset(run.record["dataset"]["name"], "train")
    # the defender's images exactly as the CLI draws them
    clean_ds = data.clean_subset(train, n=args.clean, seed=args.seed)
    clean = to_clean_data(clean_ds, run.record["dataset"]["num_classes"], "cpu")
    test = run.test_set()
    test = test.subset(torch.linspace(0, len(test) - 1, args.test_images).long())

    seed_everything(args.seed)
    o = Options()
    units = discover_units(model, clean.x[:1])
    fit, held, _ = split_for_selection(clean, o, args.seed, "anp-holdout")
    scores, _, history = optimize_anp_masks(model, units, fit, o, args.seed)
    order = pruning_order(scores, history.mask_mean)
    auto, _, selection, _ = select_pruning(model, units, scores, held, acc_tolerance=o.acc_tolerance,
                                           tiebreak=history.mask_mean)
    x, y = test.tensors()
    stamped, targets, keep = attack.asr_inputs(x, y)
    clean_eval = MaskEvaluator(model, units, x, y)
    trig_eval = MaskEvaluator(model, units, stamped[keep], targets[keep])
    held_eval = MaskEvaluator(model, units, held.x, held.y)
    counts = [k for k in COUNTS if k <= units.total]
    masks = torch.ones(len(counts), units.total)
    for row, k in enumerate(counts):
        masks[row, order[:k]] = 0
    rows = []
    for chunk in range(0, len(counts), 4):
        m = masks[chunk:chunk + 4]
        for k, acc, asr, hacc in zip(counts[chunk:chunk + 4], clean_eval.accuracy(m),
                                     trig_eval.accuracy(m), held_eval.accuracy(m)):
            rows.append({"pruned": k, "mask_value": float(scores[order[k - 1]]) if k else None,
                         "test_acc": round(100 * float(acc), 2), "test_asr": round(100 * float(asr), 2),
                         "held_out_acc": round(100 * float(hacc), 2)})
            print(rows[-1], flush=True)
    record = {"run": args.run_dir, "units": units.total, "curve": rows,
              "auto_pruned": int(auto.sum()), "auto_reason": selection.get("reason"),
              "threshold_0.2_pruned": int((scores <= 0.2).sum()),
              "masks_at_most_0.9": int((scores <= 0.9).sum()),
              "masks_at_0": int((scores <= 1e-6).sum()),
              "test_images": args.test_images}
    print({k: v for k, v in record.items() if k != "curve"})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
