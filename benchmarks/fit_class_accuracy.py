"""Each zoo model's accuracy per class on ONP's fit images (the defender's clean data).

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/fit_class_accuracy.py \
        --runs benchmarks/zoo/cifar10-{vgg_small,resnet20}-{badnets,blended,wanet,sig}

What ONP's ``large_mask_accuracy_ratio`` rule looks at (BENCHMARKS.md, "Stop 15"): 500 clean
training images (seed 0), ONP's fit half, one forward pass. Output of the stop-15 run:
benchmarks/results/onp-probes/fit-class-accuracy.txt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from onp_inputs import onp_inputs

from trojanprune.defenses.onp import Options
from trojanprune.metrics import class_accuracies, predict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True)
    args = ap.parse_args()
    for path in args.runs:
        case = onp_inputs(path, Options())
        acc = class_accuracies(predict(case.model, case.fit.x), case.fit.y, case.num_classes)
        print(Path(path).name, "per class", [round(a / 100, 2) for a in acc],
              "median", round(float(torch.tensor(acc).median()) / 100, 2), flush=True)


if __name__ == "__main__":
    main()
