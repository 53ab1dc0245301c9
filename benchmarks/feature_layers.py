"""Which classes the feature-space trigger reverse flags at each layer of a zoo model.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/feature_layers.py \
        --runs benchmarks/zoo/cifar10-resnet20-wanet benchmarks/zoo/cifar10-resnet20-sig \
        --layers layer2.2.conv1 layer3.0.conv2 layer3.1.conv1 layer3.2.conv1

A diagnostic for ONP's ``suspects`` probe (BENCHMARKS.md, "ONP on resnet20"): the defender's
500 clean training images (seed 0), ONP's fit half, its 10 images per class, the reverse with
ONP's defaults (300 steps, seed as ONP derives it) at each named unit group. One line per
(model, layer): the low-side flags (what the probe uses), the mask norms, and, for evaluation
only, the true target's anomaly index and on which side of the median its norm lies. The
defense never sees the true target.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from onp_inputs import onp_inputs
from trojanprune.defenses.onp import Options
from trojanprune.onp.probes import per_class_subset
from trojanprune.reverse import reverse_feature_triggers
from trojanprune.utils import derive_seed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--layers", nargs="+", required=True, help="unit group names (skipped where absent)")
    ap.add_argument("--clean", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    options = Options()
    for path in args.runs:
        case = onp_inputs(path, options, clean=args.clean, seed=args.seed)
        units, true = case.units, case.true_target
        fx, fy = per_class_subset(case.fit, options.feature_per_class)
        for layer in [g.name for g in units if g.name in args.layers]:
            start = time.perf_counter()
            found = reverse_feature_triggers(case.model, units, fx, fy, case.num_classes, layer=layer,
                                             steps=options.feature_steps,
                                             seed=derive_seed(args.seed, "onp-feature"))
            norms = found.mask_norms
            side = "low" if norms[true] < norms.median() else "high"
            print(Path(path).name, layer, units[layer].size, "flag", found.flagged, "norms",
                  [round(float(v), 2) for v in norms],
                  f"AI{true} {float(found.anomaly_index[true]):.2f}", side,
                  f"{time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
