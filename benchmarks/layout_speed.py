"""How much faster the reverses' passes run on a channels-last copy (engine/layout.py).

    python benchmarks/layout_speed.py --runs benchmarks/zoo/cifar10-vgg_small-badnets \
        benchmarks/zoo/cifar10-resnet20-badnets --threads 2

One forward and backward pass (gradient with respect to the input only, as in the trigger
reverse) over a batch of random 32x32 images, the model's own weights as saved and a
channels-last copy made by :func:`trojanprune.engine.layout.channels_last_copy`. Seconds per
pass, median of ``--repeats`` after two warm-up passes, and the largest difference of the
logits between the two.

A second table times :class:`trojanprune.engine.MaskEvaluator` as ONP's episodes use it: 16 keep
masks over all of the model's channels (each channel removed with probability 0.03) on
``--held`` images, with ``fast_layout=False`` (the model as saved) and ``True`` (its
channels-last copy); seconds per call, median of ``--repeats`` after one warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.engine.layout import channels_last_copy
from trojanprune.runs import load_run


def median_seconds(call, repeats: int, warmup: int) -> float:
    """Median wall time of ``call()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        call()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def seconds_per_pass(model, x, repeats: int) -> float:
    shift = torch.zeros_like(x).requires_grad_(True)
    return median_seconds(lambda: torch.autograd.grad(model(x + shift).sum(), [shift]), repeats, warmup=2)


def seconds_per_evaluation(evaluator, masks, repeats: int) -> float:
    return median_seconds(lambda: evaluator.logits(masks), repeats, warmup=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--batch", type=int, default=320, help="images per pass (ONP's pixel reverse: 32 x 10 classes)")
    ap.add_argument("--held", type=int, default=250, help="images per masked evaluation (ONP: held-out half of 500)")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    print("| model | as saved (s) | channels-last copy (s) | speed-up | largest logit difference |")
    print("|---|---|---|---|---|")
    for path in args.runs:
        model = load_run(path).model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        fast = channels_last_copy(model, x[:8])
        base, quick = seconds_per_pass(model, x, args.repeats), seconds_per_pass(fast, x, args.repeats)
        with torch.no_grad():
            diff = float((model(x) - fast(x)).abs().max())
        print(f"| {Path(path).name} | {base:.3f} | {quick:.3f} | {base / quick:.2f}x | {diff:.1e} |", flush=True)
    print("\n| model | MaskEvaluator, as saved (s) | fast_layout (s) | speed-up | largest logit difference |")
    print("|---|---|---|---|---|")
    held = torch.rand(args.held, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for path in args.runs:
        model = load_run(path).model.eval()
        units = discover_units(model, held[:1])
        masks = (torch.rand(16, units.total, generator=torch.Generator().manual_seed(2)) > 0.03).float()
        plain = MaskEvaluator(model, units, held, fast_layout=False)
        fast = MaskEvaluator(model, units, held)
        base, quick = seconds_per_evaluation(plain, masks, args.repeats), seconds_per_evaluation(fast, masks, args.repeats)
        diff = float((plain.logits(masks) - fast.logits(masks)).abs().max())
        print(f"| {Path(path).name} | {base:.3f} | {quick:.3f} | {base / quick:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
