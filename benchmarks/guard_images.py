"""Which clean images see a channel's accuracy cost? A diagnosis for ShapPruning's clean guard.

ShapPruning's guard judges each pruning step on the defender's ten images (one per class) and,
optionally, their shifted copies (``kl_tolerance``). With every channel playing
(``layers=all``) the game ranks early channels whose cost those images do not show (BENCHMARKS,
"Stop 31"). This script asks, channel by channel, whether a larger set of images the defender
could have without more data -- images synthesized from the model (the data-free mode's data
reverse, ``trojanprune.reverse.synthesize``) -- tracks the test cost better.

For a zoo run, every channel of every layer is removed alone; its cost is measured as

- the test accuracy drop on ``--images`` test images (the truth, which no defense sees);
- on each guard set: the accuracy drop and the mean KL divergence of the predictions from the
  unpruned model's. Guard sets: the ten images (one per class, the training split, ``--seed``
  draws them as the repair would), the ten and their eight shifted copies, and
  ``--synth-per-class`` synthesized images per class (and their shifted copies).

It prints the Spearman rank correlation of each guard signal with the test drop, over all
channels and over the channels whose test drop is at least 0.5 points, and the signals of the
channel sets named with ``--sets`` (``group:channel,...``; e.g. the costly early channels of a
``layers=all`` repair and a harmless one). A diagnosis: the true test split is used.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/guard_images.py \\
        benchmarks/zoo/cifar10-vgg_small-badnets --sets features.3:17,features.3:8 \\
        --out benchmarks/results/shappruning-stop33/guard-images-vgg_small-badnets.txt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from trojanprune import data
from trojanprune.defenses.shappruning import mean_kl, shifted_views
from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.reverse import synthesize
from trojanprune.runs import load_run
from trojanprune.utils import derive_seed

from oracle_pruning import channel_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a zoo run directory")
    ap.add_argument("--images", type=int, default=2000, help="test images for the true cost")
    ap.add_argument("--synth-per-class", type=int, default=5)
    ap.add_argument("--synth-steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0, help="the draw of the ten images and the synthesis")
    ap.add_argument("--sets", nargs="*", default=[], metavar="GROUP:CHANNEL,...")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)  # the synthesis turns gradients on for itself

    run = load_run(args.run)
    model = run.model.eval()
    x, y = run.test_set(args.data_dir).tensors()
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:args.images]
    x, y = x[pick], y[pick]
    units = discover_units(model, x[:1])
    k = int(model(x[:1]).shape[1])
    train = data.load_dataset(run.record["dataset"]["name"], "train", data_dir=args.data_dir,
                              image_size=run.record["dataset"].get("image_size"))
    fx, fy = data.clean_subset(train, per_class=1, seed=args.seed).tensors()
    start = time.perf_counter()
    synth = synthesize(model, k, tuple(x.shape[1:]), per_class=args.synth_per_class,
                       steps=args.synth_steps, seed=derive_seed(args.seed, "data reverse"))
    synth_seconds = time.perf_counter() - start
    guards = {
        "ten images": (fx, fy),
        "ten + shifted": (shifted_views(fx), fy.repeat(9)),
        f"synthesized ({args.synth_per_class}/class)": (synth.x, synth.y),
        "synthesized + shifted": (shifted_views(synth.x), synth.y.repeat(9)),
        "ten + synthesized": (torch.cat([fx, synth.x]), torch.cat([fy, synth.y])),
    }
    masks = torch.ones(units.total + 1, units.total)
    masks[torch.arange(1, units.total + 1), torch.arange(units.total)] = 0  # row 0: unpruned
    test_ev = MaskEvaluator(model, units, x, y)
    guard_evs = {name: MaskEvaluator(model, units, gx, gy) for name, (gx, gy) in guards.items()}
    test = test_ev.accuracy(masks)
    test_drop = 100 * (test[0] - test[1:])
    lines = [f"{args.run}: {units.total} channels, {args.images} test images, synthesis "
             f"{args.synth_per_class}/class in {synth_seconds:.0f} s (synthesized images classified "
             f"as their class: {100 * float((model(synth.x).argmax(-1) == synth.y).float().mean()):.1f}%)",
             "", "| guard set | images | signal | Spearman with test drop, all channels | "
                 "channels with test drop >= 0.5 |", "|---|---|---|---|---|"]
    costly = test_drop >= 0.5
    for name, (gx, gy) in guards.items():
        logits = guard_evs[name].logits(masks)
        ref = F.log_softmax(logits[0], -1)
        kl = (ref.exp() * (ref - F.log_softmax(logits[1:], -1))).sum(-1).mean(-1)
        acc = (logits.argmax(-1) == gy).float().mean(-1)
        for sig, v in (("accuracy drop", 100 * (acc[0] - acc[1:])), ("mean KL", kl)):
            lines.append(f"| {name} | {len(gx)} | {sig} | {spearman(v, test_drop):.3f} | "
                         f"{spearman(v[costly], test_drop[costly]):.3f} (n={int(costly.sum())}) |")
    for spec in args.sets:
        keep = units.keep_mask([channel_of(item) for item in spec.split(",")])[None].float()
        t = test_ev.accuracy(torch.cat([torch.ones(1, units.total), keep]))
        parts = [f"test drop {100 * float(t[0] - t[1]):.2f}"]
        for name, (gx, gy) in guards.items():
            lg = guard_evs[name].logits(torch.cat([torch.ones(1, units.total), keep]))
            kl = mean_kl(F.log_softmax(lg[0], -1), lg[1])
            acc = (lg.argmax(-1) == gy).float().mean(-1)
            parts.append(f"{name}: drop {100 * float(acc[0] - acc[1]):.2f}, KL {kl:.4f}")
        lines.append(f"\n{spec}: " + "; ".join(parts))
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (ties share their mean rank); NaN for a constant signal."""
    if len(a) < 3 or bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return float("nan")
    return float(spearmanr(a.double().numpy(), b.double().numpy()).statistic)


if __name__ == "__main__":
    main()
