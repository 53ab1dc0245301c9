"""Peak memory of one trigger-reverse step against the number of classes, with the step in one
pass and split into passes that fit (trojanprune.engine.memory).

    python benchmarks/reverse_memory.py --out benchmarks/results/reverse-memory.md

Each configuration runs in its own process, so its peak RSS is its own: an untrained model of
the architecture with K classes, one random 32x32 image per class (ShapPruning's few-shot
setting: a step runs K classes x 32 images), ``steps`` optimization steps of
``reverse_triggers`` with early stopping off. ``one pass`` forces everything into one pass
(what the code did before); ``budget B`` sizes the passes from a memory budget of B MiB (the
default budget is 4 GiB on a CPU). Memory, not speed, is what this measures: the time per step
is printed for reference and depends on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
import trojanprune as tp
from trojanprune.engine.memory import activation_bytes, images_per_pass
from trojanprune.reverse import reverse_triggers
arch, k, steps, budget_mib, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = tp.models.create(arch, num_classes=k).eval()
x, y = torch.rand(k, 3, 32, 32), torch.arange(k)
per_image = activation_bytes(model, x)
pairs = k * min(32, k) - min(32, k)
per_pass = 10 ** 9 if budget_mib == "one" else images_per_pass(model, x, budget=int(budget_mib) << 20)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
reverse_triggers(model, x, y, k, steps=steps, early_stop_patience=0, pass_images=per_pass)
print(json.dumps({"arch": arch, "classes": k, "pairs": pairs, "passes": -(-pairs // per_pass),
                  "estimate_mib_per_image": per_image / 2 ** 20,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mib": base, "seconds_per_step": (time.perf_counter() - start) / steps}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="+", default=["resnet20", "preact_resnet18"])
    ap.add_argument("--classes", nargs="+", type=int, default=[10, 43, 100])
    ap.add_argument("--budgets", nargs="+", default=["one", "1024"],
                    help="'one' (a single pass) or a budget in MiB")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = ["| arch | classes | images per step | passes | est. MiB/image | peak RSS MiB | s/step |",
            "|---|---|---|---|---|---|---|"]
    for arch in args.archs:
        for k in args.classes:
            for budget in args.budgets:
                proc = subprocess.run([sys.executable, "-c", CHILD, arch, str(k), str(args.steps),
                                       budget, str(args.threads)], capture_output=True, text=True)
                if proc.returncode != 0:
                    rows.append(f"| {arch} | {k} | | failed ({budget}) | | | |")
                    print(proc.stderr[-2000:], file=sys.stderr)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                label = "1 (forced)" if budget == "one" else f"{r['passes']} (budget {budget} MiB)"
                rows.append(f"| {arch} | {k} | {r['pairs']} | {label} | {r['estimate_mib_per_image']:.2f} | "
                            f"{r['peak_rss_mib']:.0f} | {r['seconds_per_step']:.1f} |")
                print(rows[-1], flush=True)
    table = "\n".join(rows) + "\n"
    if args.out:
        Path(args.out).write_text(f"`python benchmarks/reverse_memory.py {' '.join(sys.argv[1:])}`\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
