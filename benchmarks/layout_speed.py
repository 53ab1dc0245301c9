"""How much faster the reverses' passes run on a channels-last copy (engine/layout.py).

    python benchmarks/layout_speed.py --runs benchmarks/zoo/cifar10-vgg_small-badnets \
        benchmarks/zoo/cifar10-resnet20-badnets --threads 2

One forward and backward pass (gradient with respect to the input only, as in the trigger
reverse) over a batch of random 32x32 images, the model's own weights as saved and a
channels-last copy made by :func:`trojanprune.engine.layout.channels_last_copy`. Seconds per
pass, median of ``--repeats`` after two warm-up passes, and the largest difference of the
logits between the two.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from trojanprune.engine.layout import channels_last_copy
from trojanprune.runs import load_run


def seconds_per_pass(model, x, repeats: int) -> float:
    shift = torch.zeros_like(x).requires_grad_(True)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        torch.autograd.grad(model(x + shift).sum(), [shift])
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--batch", type=int, default=320, help="images per pass (ONP's pixel reverse: 32 x 10 classes)")
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


if __name__ == "__main__":
    main()
