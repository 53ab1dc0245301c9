"""A diagnosis, not a defense: the best k-channel prunings a greedy ORACLE finds.

The oracle knows what no defense may use: the true trigger and the test split. At each step it
adds the channel whose removal leaves the lowest attack success rate on triggered test images,
among the channels that keep clean test accuracy within ``--max-drop`` points of the unpruned
model's. It answers one question about a pruning budget: can ANY defense that prunes k channels
of these layers meet a target (e.g. issue 4's ASR <= 5% at a drop of at most 3 points)? Greedy
is not exhaustive, so a miss is strong evidence, not a proof; a hit is a proof.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/oracle_pruning.py \
        benchmarks/zoo/cifar10-vgg_small-badnets --layers last:2 --images 2000 --steps 8 \
        --out benchmarks/results/oracle-pruning/vgg_small-badnets-last2.txt

``--evaluate`` skips the search and reports ACC / ASR after pruning each given set of channels
(e.g. what a defense pruned, or a subset of it), on the same test images:

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/oracle_pruning.py \
        benchmarks/zoo/cifar10-vgg_small-blended --layers all \
        --evaluate features.3:1 features.3:1,features.14:20,features.14:64,features.14:93

``--unseen CASE`` takes a model of ``benchmarks/unseen_models.py`` instead of a run directory
(loaded from ``--models-dir`` when that script saved it there, trained otherwise), with its
2,000 test images:

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/oracle_pruning.py --unseen mlp \
        --layers all --max-drop 2 --steps 40 --models-dir /tmp/unseen/models

Cost: one masked evaluation of every remaining channel per step on 2 x ``--images`` images
(vgg_small, last:2, 2,000 images: ~190 s a step on one thread).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from trojanprune.defenses.shappruning import _players
from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.runs import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", help="a run directory (its attack record gives the true trigger)")
    ap.add_argument("--unseen", metavar="CASE", help="a model of benchmarks/unseen_models.py instead")
    ap.add_argument("--models-dir", default=None, help="with --unseen: where unseen_models.py saved it")
    ap.add_argument("--layers", default="last:2", help="players, as ShapPruning's layers option")
    ap.add_argument("--images", type=int, default=2000,
                    help="clean test images, and as many triggered non-target ones")
    ap.add_argument("--steps", type=int, default=8, help="channels to add, one per step")
    ap.add_argument("--rank", choices=["asr", "target-prob"], default="asr",
                    help="what each step minimises on the triggered images: the attack success rate, "
                         "or the mean probability of the target (it keeps moving where every "
                         "channel leaves the ASR at 100%%, and ties then go to no channel in particular)")
    ap.add_argument("--max-drop", type=float, default=3.0, help="accuracy drop allowed, in points")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="also write the lines to this file")
    ap.add_argument("--evaluate", nargs="+", metavar="GROUP:CHANNEL,...", default=None,
                    help="no search: ACC / ASR after pruning each comma-separated set of channels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if (args.run is None) == (args.unseen is None):
        ap.error("give a run directory or --unseen CASE (one of them)")
    if args.unseen:
        from unseen_models import build_case

        models_dir = Path(args.models_dir) if args.models_dir else None
        model, attack, _, test, _ = build_case(args.unseen, args.data_dir, epochs=3, train_images=20000,
                                               models_dir=models_dir)
        x, y = test.tensors()
    else:
        run = load_run(args.run)
        model, attack = run.model, run.attack()
        x, y = run.test_set(args.data_dir).tensors()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    target = attack.target
    clean_idx = order[:args.images]
    victim_idx = order[y[order] != target][:args.images]
    units = _players(discover_units(model, x[:1]), args.layers, None)  # any kind, as before
    clean = MaskEvaluator(model, units, x[clean_idx], y[clean_idx])
    triggered = MaskEvaluator(model, units, attack.apply(x[victim_idx]))
    total = units.total
    base_acc = float(clean.accuracy(torch.ones(total)))
    base_asr = float(triggered.target_rate(torch.ones(total), target))

    rank = f" rank={args.rank}" if args.rank != "asr" else ""
    lines = [f"{args.run or args.unseen} layers={args.layers} players={total} images={args.images} "
             f"max_drop={args.max_drop}{rank} base acc={base_acc:.4f} asr={base_asr:.4f}"]
    print(lines[-1], flush=True)
    if args.evaluate:
        lines += evaluate_sets(args.evaluate, units, clean, triggered, target, base_acc)
        print("\n".join(lines[1:]), flush=True)
        write(lines, args.out)
        return
    chosen: list[int] = []
    for step in range(args.steps):
        start = time.perf_counter()
        rest = [i for i in range(total) if i not in chosen]
        masks = torch.ones(len(rest), total)
        for row, unit in enumerate(rest):
            masks[row, chosen + [unit]] = 0
        acc = clean.accuracy(masks)
        logits = triggered.logits(masks)
        asr = (logits.argmax(-1) == target).float().mean(1)
        key = asr if args.rank == "asr" else logits.softmax(-1)[..., target].mean(1)
        allowed = acc >= base_acc - args.max_drop / 100
        if not bool(allowed.any()):
            lines.append(f"k={step + 1}: every channel breaks the accuracy bound; stopped")
            print(lines[-1], flush=True)
            break
        best = int(torch.where(allowed, key, torch.full_like(key, float("inf"))).argmin())
        chosen.append(rest[best])
        lines.append(f"k={step + 1} +{units.unit_of(rest[best])} acc={float(acc[best]):.4f} "
                     f"({(float(acc[best]) - base_acc) * 100:+.2f}) asr={float(asr[best]):.4f} "
                     + (f"target_prob={float(key[best]):.4f} " if args.rank != "asr" else "")
                     + f"[{time.perf_counter() - start:.0f}s]")
        print(lines[-1], flush=True)
    write(lines, args.out)


def evaluate_sets(sets: list[str], units, clean, triggered, target: int, base_acc: float) -> list[str]:
    """One line per set of channels ("group:channel,..."): test ACC (drop) and ASR after it."""
    masks = torch.stack([units.keep_mask([channel_of(item) for item in spec.split(",")])
                         for spec in sets])
    acc, asr = clean.accuracy(masks), triggered.target_rate(masks, target)
    return [f"{spec}: acc={float(a):.4f} ({(float(a) - base_acc) * 100:+.2f}) asr={float(r):.4f}"
            for spec, a, r in zip(sets, acc, asr)]


def channel_of(item: str) -> tuple[str, int]:
    group, _, channel = item.strip().rpartition(":")
    if not group or not channel.isdigit():
        raise SystemExit(f"--evaluate: {item!r} is not GROUP:CHANNEL (e.g. features.3:1)")
    return group, int(channel)


def write(lines: list[str], out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
