"""Mask-evaluation speed: MaskEvaluator vs a naive loop (one forward pass per mask).

    PYTHONPATH=src python benchmarks/engine_speed.py --threads 1

vgg_small with random weights, 32x32x3 inputs, 10 classes. Masks are random 0/1 vectors
(about 1 unit in 10 removed) over the last 2 conv groups (a typical search) or over all
groups. "naive" installs the masks with ChannelMasks and runs one forward per mask;
"batched" folds the masks into the batch (MaskEvaluator with reuse_prefix=False); "evaluator"
adds prefix reuse (the default). Every method's logits are checked against the naive loop.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from trojanprune import models
from trojanprune.engine import ChannelMasks, MaskEvaluator, discover_units


def naive(model, units, images, masks):
    out = []
    with torch.no_grad(), ChannelMasks(model, units) as cm:
        for mask in masks:
            cm.set(mask)
            out.append(model(images))
    return torch.stack(out)


def rate(fn, n_masks: int, min_seconds: float) -> tuple[float, torch.Tensor]:
    """Masks per second of ``fn`` (repeated until ``min_seconds`` have passed)."""
    result = fn()  # warm-up; also fills the evaluator's prefix cache as a search's first call would
    start, reps = time.perf_counter(), 0
    while True:
        fn()
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return reps * n_masks / elapsed, result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[10, 500])
    p.add_argument("--masks", type=int, default=256, help="masks per evaluator call at 10 images "
                   "(scaled down as 2560/images, at least 8, for larger image sets)")
    p.add_argument("--naive-masks", type=int, default=32, help="masks for the naive loop at 10 images")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each measurement at least this long")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--chunk", type=int, default=None, help="MaskEvaluator chunk (images per forward; "
                   "default: the evaluator's, 128 on CPU)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = models.create("vgg_small", 10, 3).to(args.device).eval()
    units = discover_units(model, torch.rand(1, 3, 32, 32, device=args.device))
    selections = {"last 2 convs": units.select("last:2", kind="conv"), "all layers": units}
    g = torch.Generator().manual_seed(1)

    rows = []
    for n_images in args.images:
        images = torch.rand(n_images, 3, 32, 32, generator=g).to(args.device)
        m_eval = max(8, args.masks * 10 // n_images) if n_images > 10 else args.masks
        m_naive = max(4, args.naive_masks * 10 // n_images) if n_images > 10 else args.naive_masks
        for label, sub in selections.items():
            masks = (torch.rand(m_eval, sub.total, generator=g) > 0.1).float().to(args.device)
            naive_rate, ref = rate(lambda: naive(model, sub, images, masks[:m_naive]), m_naive, args.min_seconds)
            row = {"images": n_images, "units": f"{label} ({sub.total})", "naive": naive_rate}
            for key, reuse in (("batched", False), ("evaluator", True)):
                ev = MaskEvaluator(model, sub, images, chunk=args.chunk, reuse_prefix=reuse)
                row[key], got = rate(lambda: ev.logits(masks), m_eval, args.min_seconds)
                err = (got[:m_naive] - ref).abs().max().item()
                if err > 1e-4:
                    sys.exit(f"mismatch with the naive loop: max abs diff {err}")
            rows.append(row)
            print(f"  done: {n_images} images, {label}", file=sys.stderr)

    print(f"\nvgg_small, random weights, 32x32x3, 10 classes; device {args.device}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, {platform.machine()}\n")
    print("| images | masked units | naive loop (masks/s) | batched, no reuse (masks/s) "
          "| MaskEvaluator (masks/s) | speed-up vs naive |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']} | {r['units']} | {r['naive']:.1f} | {r['batched']:.1f} | "
              f"{r['evaluator']:.1f} | {r['evaluator'] / r['naive']:.1f}x |")
    print(f"\ncommand: PYTHONPATH=src python benchmarks/engine_speed.py {' '.join(argv or sys.argv[1:])}")


if __name__ == "__main__":
    main()
