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
import sys
import time
from pathlib import Path

import torch

from trojanprune.defenses.shappruning import _players

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_parts import setup, write_lines  # noqa: E402  (the same probe, split and evaluators)


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

    s = setup(args.run, args.seed, args.clean, args.set, args.data_dir)
    o, units, probe = s.options, s.units, s.probe
    choices = [units.offset(g.name) + c for g in _players(units, args.layers, None) for c in range(g.size)]
    base = float(s.held_acc.accuracy(torch.ones(1, units.total))[0])
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
        acc = s.held_acc.accuracy(masks).cpu()
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
                     f"true_asr={float(s.triggered.target_rate(keep, s.attack.target)[0]):.4f} "
                     f"[{time.perf_counter() - start:.0f}s]")
        print(lines[-1], flush=True)
    write_lines(lines, args.out)


if __name__ == "__main__":
    main()
