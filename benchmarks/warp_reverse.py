"""A diagnosis, not a defense: can a reversed *warp* stand in for a warping backdoor?

ONP's probe reverses pixel-space patches (Neural Cleanse) and feature-space channel triggers.
On the resnet20 WaNet zoo model neither gives a stand-in that tracks the backdoor: the feature
triggers are disabled by pruning a few last-layer channels while the real warp keeps working
(BENCHMARKS, stops 28-33). This script asks whether a third family of stand-ins would: for every
class ``k``, one smooth warp of the image plane (a ``grid`` x ``grid`` control field of
displacements, upsampled bicubically, at most ``--strength`` / H in grid_sample's [-1, 1]
coordinates, i.e. ``strength / 2`` pixels) that sends the defender's clean images to ``k``.
The warp family is the defender's guess at a kind of trigger, not the true trigger: its
parameters are learned from the model and the clean images alone.

It reports (1) each class's reversed-warp success on the held-out half of the defender's 500
clean images (a backdoor target should need a much smaller warp than a natural class), and
(2) whether a pruning that disables the target's reversed warp disables the true backdoor: a
greedy pruning on the reversed warp's success (each step: the channel whose removal lowers it
most while held-out accuracy stays within ``--max-drop`` of the unpruned model's), with the
true ASR and test accuracy after each step (the test split and the true trigger are read only
to report, never to choose).

    TROJANPRUNE_DATA=../shared/datasets OMP_NUM_THREADS=1 python benchmarks/warp_reverse.py \\
        benchmarks/zoo/cifar10-resnet20-wanet --out benchmarks/results/warp-reverse/resnet20-wanet.txt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from refine_steps import defender_clean
from trojanprune.defenses.shappruning import _players
from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.runs import load_run
from trojanprune.reverse.detect import anomaly_index


def warp(x: torch.Tensor, control: torch.Tensor, strength: float) -> torch.Tensor:
    """``x`` (N, C, H, W) warped by ``control`` (2, g, g) (unbounded; tanh bounds it).

    The prototype the diagnosis tables were made with, kept so that they reproduce; the
    package's :func:`trojanprune.reverse.warp.warp_images` grew out of it (same field and bound
    on square images; border padding, and per-axis scaling for non-square ones)."""
    h, w = x.shape[-2:]
    field = F.interpolate(torch.tanh(control)[None], size=(h, w), mode="bicubic",
                          align_corners=True)[0].permute(1, 2, 0)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = (torch.stack([xs, ys], -1) + strength * field / h).clamp(-1, 1)
    return F.grid_sample(x, grid[None].expand(len(x), -1, -1, -1), align_corners=True)


def reverse_warps(model, x, y, classes: int, grid: int, strength: float, steps: int,
                  per_class: int, seed: int) -> torch.Tensor:
    """One control field per class, all classes in one batched problem: (K, 2, g, g)."""
    gen = torch.Generator().manual_seed(seed)
    control = (0.01 * torch.randn(classes, 2, grid, grid, generator=gen)).requires_grad_()
    opt = torch.optim.Adam([control], lr=0.1)
    pools = [torch.nonzero(y != k).flatten() for k in range(classes)]
    for _ in range(steps):
        batch, labels = [], []
        for k in range(classes):
            pick = pools[k][torch.randint(len(pools[k]), (per_class,), generator=gen)]
            batch.append(warp(x[pick], control[k], strength))
            labels.append(torch.full((per_class,), k))
        loss = F.cross_entropy(model(torch.cat(batch)), torch.cat(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return control.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--strength", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--layers", default="all", help="channels the greedy may prune")
    ap.add_argument("--greedy", type=int, default=8, help="greedy steps (0: none)")
    ap.add_argument("--max-drop", type=float, default=0.02)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--few-shot", type=int, default=0, metavar="N",
                    help="instead: the package's reverse_warps at its defaults on N clean images "
                         "per class (ShapPruning's few-shot setting), its verdict and time")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    run = load_run(args.run)
    model = run.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    attack = run.attack()
    if args.few_shot:
        few_shot(args, run, model)
        return
    x, y = defender_clean(run, {"clean_images": 500, "seed": 0}, {}, args.data_dir)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    fit, held = order[:250], order[250:]
    classes = int(model(x[:1]).shape[-1])
    lines = [f"{args.run} grid={args.grid} steps={args.steps} per_class={args.per_class} "
             f"true target={attack.target}"]
    print(lines[-1], flush=True)

    best = None
    for strength in args.strength:
        start = time.perf_counter()
        control = reverse_warps(model, x[fit], y[fit], classes, args.grid, strength, args.steps,
                                args.per_class, seed=0)
        with torch.no_grad():
            success = torch.tensor([
                float((model(warp(x[held][y[held] != k], control[k], strength)).argmax(-1) == k)
                      .float().mean()) for k in range(classes)])
        index = anomaly_index(-success)  # high success = a low-side outlier of "-success"
        lines.append(f"strength {strength}: success per class "
                     + " ".join(f"{k}:{s:.2f}" for k, s in enumerate(success.tolist()))
                     + f" | top {int(success.argmax())} anomaly {float(index.max()):.2f}"
                     + f" | {time.perf_counter() - start:.0f} s")
        print(lines[-1], flush=True)
        if best is None and float(success.max()) >= 0.5:
            best = (strength, control, int(success.argmax()))

    if best is not None and args.greedy:
        strength, control, suspect = best
        tx, ty = run.test_set(args.data_dir).tensors()
        pick = torch.randperm(len(tx), generator=torch.Generator().manual_seed(0))[:args.test_images]
        tx, ty = tx[pick], ty[pick]
        units = _players(discover_units(model, x[:1]), args.layers, None)
        hx = x[held]
        stand_in = MaskEvaluator(model, units, warp(hx[y[held] != suspect], control[suspect], strength))
        guard = MaskEvaluator(model, units, hx, y[held])
        test = MaskEvaluator(model, units, tx, ty)
        victims = tx[ty != attack.target]
        true = MaskEvaluator(model, units, attack.apply(victims))
        keep = torch.ones(units.total)
        base = float(guard.accuracy(keep[None])[0])

        def report(tag):
            lines.append(f"{tag}: stand-in {float(stand_in.target_rate(keep[None], suspect)[0]):.3f} "
                         f"held acc {float(guard.accuracy(keep[None])[0]):.3f} | test acc "
                         f"{float(test.accuracy(keep[None])[0]):.4f} true ASR "
                         f"{float(true.target_rate(keep[None], attack.target)[0]):.4f}")
            print(lines[-1], flush=True)

        lines.append(f"greedy on class {suspect}'s reversed warp (strength {strength}), "
                     f"{units.total} channels ({args.layers})")
        report("unpruned")
        for step in range(args.greedy):
            rest = torch.nonzero(keep).flatten()
            masks = keep.repeat(len(rest), 1)
            masks[torch.arange(len(rest)), rest] = 0
            rate = stand_in.target_rate(masks, suspect)
            ok = guard.accuracy(masks) >= base - args.max_drop
            rate[~ok] = float("inf")
            choice = int(rest[int(rate.argmin())])
            keep[choice] = 0
            report(f"step {step + 1} prune {units.unit_of(choice)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


def few_shot(args, run, model) -> None:
    from trojanprune import data
    from trojanprune.reverse import reverse_warps

    ds = run.record["dataset"]
    train = data.load_dataset(ds["name"], "train", data_dir=args.data_dir, image_size=ds.get("image_size"))
    fx, fy = data.clean_subset(train, per_class=args.few_shot, seed=0).tensors()
    classes = int(model(fx[:1]).shape[-1])
    start = time.perf_counter()
    found = reverse_warps(model, fx, fy, classes, seed=0)
    summary = found.summary()
    line = (f"{args.run} few-shot {args.few_shot}/class ({len(fx)} images), true target "
            f"{run.attack().target}: verdict {summary['verdict']} flagged {summary['flagged']} "
            f"success {summary['attack_success']} | {time.perf_counter() - start:.0f} s")
    print(line, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
