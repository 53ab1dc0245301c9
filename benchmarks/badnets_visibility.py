"""How much of BadNets' missing attack success is images the stamp hardly changes.

BackdoorBench's BadNets stamps a 3x3 WHITE square in the bottom-right corner. On a test image
whose corner is already near-white the stamp changes almost nothing, and no model can tell the
triggered image from the clean one. This script measures, on a BadNets run directory, how
many non-target test images the stamp changes by less than a given mean absolute amount, the
attack success on those and on the rest, and so the ceiling the white-patch protocol puts on
ASR.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/badnets_visibility.py \
        benchmarks/zoo/cifar10-vgg_small-badnets benchmarks/zoo-30ep/cifar10-vgg_small-badnets
"""

from __future__ import annotations

import argparse

import torch

from trojanprune import metrics
from trojanprune.runs import load_run


def visibility_table(run_dir: str, thresholds=(0.05, 0.1, 0.2)) -> list[str]:
    run = load_run(run_dir)
    attack = run.attack()
    if attack is None or attack.name != "badnets":
        raise SystemExit(f"{run_dir} is not a BadNets run")
    test = run.test_set()
    x = test.images.float() / 255
    stamped, targets, keep = attack.asr_inputs(x, test.labels)  # ASR counts non-target images
    x_eval, stamped = x[keep], stamped[keep]
    hit = metrics.predict(run.model, stamped) == targets[keep]
    # mean absolute change inside the patch, per image
    change = ((stamped - x_eval).abs().sum((1, 2, 3)) / (attack.mask.sum() * x.shape[1]))
    lines = [f"### {run_dir}", "",
             f"ASR {100 * hit.float().mean():.2f}% over {len(hit)} non-target test images; "
             f"{int((~hit).sum())} misses", "",
             "| stamp changes the patch by less than | images | ASR on them | share of all misses "
             "| ASR on the others |",
             "|---:|---:|---:|---:|---:|"]
    for th in thresholds:
        faint = change < th
        lines.append(
            f"| {th:.2f} | {100 * faint.float().mean():.2f}% | {100 * hit[faint].float().mean():.1f}% "
            f"| {100 * (faint & ~hit).sum() / max(1, int((~hit).sum())):.1f}% "
            f"| {100 * hit[~faint].float().mean():.2f}% |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for run_dir in args.runs:
        print("\n".join(visibility_table(run_dir)))


if __name__ == "__main__":
    main()
