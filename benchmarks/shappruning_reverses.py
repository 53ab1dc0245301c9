"""What each of ShapPruning's trigger reverses flags on the few images, and how long it takes.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/shappruning_reverses.py \
        benchmarks/zoo/cifar10-vgg_small-wanet [more runs] --threads 2

For each run: one clean image per class from the training split (seed 0; ``--per-class`` for
more), as ``benchmarks/shappruning.py`` draws them. On those images it runs the pixel-space
reverse (Neural Cleanse) and the feature-space reverse, with ShapPruning's default options and
seeds, and prints each one's wall time, flagged classes and MAD anomaly indices. It also prints
what ``reverse=auto`` would follow, and, where nothing else decides, what the clean-label rule
(``suspect_large_masks``) sees. This is the evidence behind both rules (BENCHMARKS.md). Run it
from another checkout (``PYTHONPATH=that/src``) to time two versions of the reverses back to
back on the same day.
"""

from __future__ import annotations

import argparse
import time

import torch

from trojanprune import data
from trojanprune.defenses.shappruning import Options
from trojanprune.engine import discover_units
from trojanprune.reverse import reverse_feature_triggers, reverse_triggers
from trojanprune.reverse.feature import default_layer
from trojanprune.runs import load_run
from trojanprune.utils import derive_seed

try:
    from trojanprune.defenses.shappruning import _follow_feature
except ImportError:  # a checkout from before reverse=auto became the default: timings only
    _follow_feature = None
try:
    from trojanprune.defenses.shappruning import _clean_label_target
except ImportError:  # a checkout from before the clean-label rule (stop 24)
    _clean_label_target = None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--per-class", type=int, default=1)
    ap.add_argument("--data-dir", default=None, help="dataset root (default: TROJANPRUNE_DATA)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    o = Options()
    for path in args.runs:
        run = load_run(path)
        ds = run.record["dataset"]
        train = data.load_dataset(ds["name"], "train", data_dir=args.data_dir, image_size=ds.get("image_size"))
        x, y = data.clean_subset(train, per_class=args.per_class, seed=0).tensors()
        model = run.model.eval()
        k = int(model(x[:1]).shape[1])
        start = time.perf_counter()
        pixel = reverse_triggers(model, x, y, k, steps=o.reverse_steps, lr=o.reverse_lr,
                                 init_cost=o.init_cost, cost_schedule=o.cost_schedule,
                                 success_threshold=o.success_threshold,
                                 anomaly_threshold=o.anomaly_threshold,
                                 seed=derive_seed(0, "trigger reverse"))
        pixel_s = time.perf_counter() - start
        all_units = discover_units(model, x[:1])
        units = all_units.select(o.layers, kind=o.kind)
        layer = default_layer(all_units)
        start = time.perf_counter()
        feature = reverse_feature_triggers(model, units, x, y, k,
                                           layer=layer if layer in units else units.names[0],
                                           steps=o.feature_steps, seed=derive_seed(0, "feature reverse"),
                                           anomaly_threshold=o.anomaly_threshold)
        feature_s = time.perf_counter() - start
        target = getattr(run.attack(), "target", "?")
        if _follow_feature is None:
            auto = "(this checkout has no reverse=auto rule)"
        elif len(pixel.flagged) == 1:
            auto = f"pixel {pixel.target} (one flag: the feature reverse is not run)"
        elif _follow_feature(pixel, feature):
            auto = f"feature {feature.target}"
        elif pixel.target is not None:
            auto = f"pixel {pixel.target}"
        elif _clean_label_target is not None and o.suspect_large_masks:
            seen = {}
            taken = _clean_label_target(model, pixel, x, y, k, o, seen, {}).target
            auto = (f"pixel {taken} (clean-label rule: {seen['clean_label']})" if taken is not None
                    else f"no backdoor detected (clean-label rule: {seen['clean_label']})")
        else:
            auto = "no backdoor detected"
        print(f"{run.name if hasattr(run, 'name') else path}: true target {target}\n"
              f"  pixel:   {pixel_s:.1f} s, {pixel.steps} steps, flags {pixel.flagged}, index "
              f"{[round(float(v), 2) for v in pixel.anomaly_index]}, norms "
              f"{[round(float(v), 2) for v in pixel.mask_norms]}\n"
              f"  feature: {feature_s:.1f} s at {feature.layer}, flags {feature.flagged}, index "
              f"{[round(float(v), 2) for v in feature.anomaly_index]}\n"
              f"  reverse=auto follows: {auto}", flush=True)


if __name__ == "__main__":
    main()
