"""Wall time of each trigger reverse in ONP's default (``suspects``) probe, and what it flags.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/probe_reverse_times.py \
        benchmarks/zoo/cifar10-vgg_small-badnets --threads 2

The defender's 500 clean training images (seed 0), split as ONP splits them; the pixel-space
reverse on the fit half (with the batched stop, ONP's default, unless ``--per-class-stop``)
and the feature-space reverse at the two layers the probe uses, each with ONP's
default options and seeds; then the warp reverse (``suspect_warps``, on by default
since stop 38) on the same fit half. The flags are the classes each reverse's MAD test names.
"""

from __future__ import annotations

import argparse
import time

import torch

from onp_inputs import onp_inputs
from trojanprune.defenses.onp import Options
from trojanprune.onp.probes import feature_reverse, pixel_reverse, warp_reverse
from trojanprune.reverse.feature import default_layer, last_conv_layer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--clean", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--feature-steps", type=int, default=None,
                    help="fewer feature-reverse steps than ONP's (time per step only)")
    ap.add_argument("--skip-pixel", action="store_true")
    ap.add_argument("--skip-features", action="store_true")
    ap.add_argument("--skip-warp", action="store_true")
    ap.add_argument("--per-class-stop", action="store_true",
                    help="the pixel reverse freezes each class as it settles (ONP's "
                         "reverse_per_class_stop; not its default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    options = Options()
    if args.feature_steps:
        options.feature_steps = args.feature_steps
    case = onp_inputs(args.run, options, clean=args.clean, seed=args.seed)
    if not args.skip_pixel:
        start = time.perf_counter()
        found = pixel_reverse(case.model, case.fit, options, args.seed, False,
                              per_class_stop=args.per_class_stop)
        print(f"pixel{' (per-class stop)' if args.per_class_stop else ''}: "
              f"{time.perf_counter() - start:.1f} s, {found.steps} steps, "
              f"{found.evaluations} class-steps, flags {found.flagged}, "
              f"norms {[round(float(v), 1) for v in found.mask_norms]}", flush=True)
    layers = [] if args.skip_features else [default_layer(case.units), last_conv_layer(case.units)]
    for layer in dict.fromkeys(layers):
        start = time.perf_counter()
        found = feature_reverse(case.model, case.units, case.fit, options, args.seed, False, layer)
        seconds = time.perf_counter() - start
        print(f"feature {layer}: {seconds:.1f} s, {seconds / found.steps:.2f} s/step, "
              f"flags {found.flagged}", flush=True)
    if options.suspect_warps and not args.skip_warp:
        start = time.perf_counter()
        found = warp_reverse(case.model, case.fit, options, args.seed, False)
        seconds = time.perf_counter() - start
        print(f"warp: {seconds:.1f} s, {found.steps} steps, flags {found.flagged}", flush=True)


if __name__ == "__main__":
    main()
