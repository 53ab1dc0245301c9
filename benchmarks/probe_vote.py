"""Which class each trigger reverse flags on the zoo, and what ONP's ``auto`` probe chooses.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/probe_vote.py \
        --runs benchmarks/zoo/cifar10-vgg_small-badnets benchmarks/zoo/cifar10-vgg_small-blended \
        --out benchmarks/results/probe-vote.md

For each run: the defender's 500 clean training images (seed 0), split as ONP splits them
(fit / held-out halves), then :class:`trojanprune.onp.probes.AutoProbe` with ONP's default
options: the pixel-space (Neural Cleanse) and the feature-space reverse on the fit half, their
flagged classes and anomaly indices, and the probe it keeps. The run's true target is printed
beside them for evaluation only; the probes never see it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from onp_inputs import onp_inputs
from trojanprune.defenses.onp import Options
from trojanprune.onp.probes import create_probe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--clean", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for path in args.runs:
        options = Options(probe="auto")
        case = onp_inputs(path, options, clean=args.clean, seed=args.seed, data_dir=args.data_dir)
        start = time.perf_counter()
        probe = create_probe("auto", case.model, case.units, case.fit, case.held, options, seed=args.seed)
        seconds = time.perf_counter() - start
        pixel = probe.parts[0].reversed
        feature = probe.parts[1].features
        true = case.true_target

        def verdict(rev):
            flagged = rev.target
            index = float(rev.anomaly_index[flagged]) if flagged is not None else float(rev.anomaly_index.max())
            return f"{flagged if flagged is not None else 'none'} ({index:.2f})"

        rows.append(f"| {Path(path).name} | {true} | {verdict(pixel)} | {verdict(feature)} | "
                    f"{probe.vote['chosen']} | {probe.target} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    table = ("| run | true target (eval only) | pixel reverse flags (index) | feature reverse flags "
             "(index) | auto keeps | presumed target | seconds |\n|---|---|---|---|---|---|---|\n"
             + "\n".join(rows) + "\n")
    print(table)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(table)
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
