"""A diagnosis, not a defense: greedy pruning on ONP's reward, with the true ASR alongside.

ONP's agent searches for the pruning with the best reward (held-out accuracy minus the probe's
backdoor score, within the accuracy guard). This script replaces the agent by plain greedy
steps on the same reward, using the same probe built as a repair with ``--clean 500 --seed S``
builds it: each step prunes the channel (of ``--layers``) that raises the reward most while the
held-out accuracy stays within ``acc_tolerance`` of the unpruned model's. Beside each step it
prints, what no defense may see, the true trigger's attack success on 1,000 triggered test
images. Compared with ``benchmarks/oracle_pruning.py`` (greedy on the TRUE ASR), it tells
whether a probe's reward points at the channels the real backdoor needs, apart from how well
the agent searches.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/probe_greedy.py \\
        benchmarks/zoo/cifar10-resnet20-badnets --seed 1 --set probe=reversed-trigger \\
        --layers last:4 --steps 6 --out benchmarks/results/probe-parts/resnet20-badnets-seed1-greedy-pixel.txt

Cost: the probe, then one batched evaluation of every remaining channel per step (resnet20,
``last:4``, pixel probe: ~20 s a step on one thread).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from trojanprune.cli import parse_settings
from trojanprune.defenses.onp import ONP
from trojanprune.defenses.shappruning import _players
from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.onp.probes import create_probe
from trojanprune.repair import to_clean_data
from trojanprune.repair_run import choose_clean
from trojanprune.runs import load_run
from trojanprune.sources import open_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run directory (its attack record gives the true trigger)")
    ap.add_argument("--seed", type=int, default=0, help="the repair's seed (clean draw and split)")
    ap.add_argument("--clean", type=int, default=500)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an ONP option (as the CLI's --set), repeatable")
    ap.add_argument("--layers", default="all", help="channels to choose from, as ShapPruning's layers")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    source = open_model(args.run)
    model = source.model.eval()
    clean = to_clean_data(choose_clean(source, clean=args.clean, per_class=None, data_free=False,
                                       seed=args.seed, data_dir=args.data_dir),
                          int(source.dataset["num_classes"]), "cpu")
    onp = ONP(seed=args.seed, device="cpu", progress=False, **parse_settings(args.set))
    o = onp.options
    fit, held = onp._split(clean)
    units = discover_units(model, clean.x[:1])
    probe = create_probe(o.probe, model, units, fit, held, o, seed=args.seed)
    players = _players(units, args.layers, None)
    choices = [units.offset(g.name) + c for g in players for c in range(g.size)]

    run = load_run(args.run)
    attack = run.attack()
    x, y = run.test_set(args.data_dir).tensors()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    triggered = MaskEvaluator(model, units, attack.apply(x[order[y[order] != attack.target][:1000]]))
    held_acc = MaskEvaluator(model, units, held.x, held.y)
    base = float(held_acc.accuracy(torch.ones(1, units.total))[0])
    parts = getattr(probe, "parts", [probe])
    lines = [f"{args.run} seed={args.seed} probe={o.probe} options={args.set} layers={args.layers} "
             f"held-out acc={base:.4f} tolerance={o.acc_tolerance}"]
    print(lines[-1], flush=True)
    chosen: list[int] = []
    for step in range(args.steps):
        start = time.perf_counter()
        rest = [i for i in choices if i not in chosen]
        masks = torch.ones(len(rest), units.total)
        for row, unit in enumerate(rest):
            masks[row, chosen + [unit]] = 0
        acc = held_acc.accuracy(masks).cpu()
        score = probe.score(masks).cpu().float()
        reward = acc - o.backdoor_weight * score - o.prune_cost * (len(chosen) + 1) / units.total
        reward[acc < base - o.acc_tolerance - 1e-9] = -float("inf")
        best = int(reward.argmax())
        if reward[best] == -float("inf"):
            lines.append(f"k={step + 1}: every channel breaks the accuracy guard; stopped")
            print(lines[-1], flush=True)
            break
        chosen.append(rest[best])
        keep = masks[best:best + 1]
        each = [round(float(p.score(keep)[0]), 3) for p in parts]
        lines.append(f"k={step + 1} +{units.unit_of(rest[best])} held_acc={float(acc[best]):.4f} "
                     f"score={float(score[best]):.3f} parts={each} reward={float(reward[best]):.4f} "
                     f"true_asr={float(triggered.target_rate(keep, attack.target)[0]):.4f} "
                     f"[{time.perf_counter() - start:.0f}s]")
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
