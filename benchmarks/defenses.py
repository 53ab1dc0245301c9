"""Every defense on the backdoored model zoo, side by side (ACC/ASR/RA/DER, time, evaluations,
peak memory).

    python benchmarks/defenses.py --zoo benchmarks/zoo --methods ft fp clp anp rnp \
        --clean 500 --out benchmarks/results/defenses-cifar10.md

Each repair runs as its own ``trojanprune repair`` process (so its peak memory is its own), on
500 clean images from the training split (``--per-class K`` for few-shot; data-free methods get
no data), seed 0. Results are cached as ``<out dir>/cells/<run>--<method>.json`` so an
interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from trojanprune import defenses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="benchmarks/zoo")
    ap.add_argument("--runs", nargs="*", help="run directory names (default: all in --zoo)")
    ap.add_argument("--methods", nargs="+", default=["ft", "fp", "clp", "anp", "rnp"])
    ap.add_argument("--clean", type=int, default=500)
    ap.add_argument("--per-class", type=int)
    ap.add_argument("--set", nargs="*", default=[], help="method:key=value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/defenses.md")
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    zoo = Path(args.zoo)
    runs = args.runs or sorted(p.name for p in zoo.iterdir() if (p / "run.json").exists())
    out = Path(args.out)
    cells_dir = out.parent / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in runs:
        for method in args.methods:
            tag = f"{run}--{method}" + (f"--k{args.per_class}" if args.per_class else "")
            cell = cells_dir / f"{tag}.json"
            if not cell.exists():
                cmd = [sys.executable, "-m", "trojanprune.cli", "repair", str(zoo / run),
                       "--method", method, "--seed", str(args.seed), "--json", "--force",
                       "--out", str(cells_dir / f"{tag}.run")]
                if not defenses.get(method).needs_data:
                    cmd.append("--data-free")
                elif args.per_class:
                    cmd += ["--per-class", str(args.per_class)]
                else:
                    cmd += ["--clean", str(args.clean)]
                for item in args.set:
                    m, _, kv = item.partition(":")
                    if m == method:
                        cmd += ["--set", kv]
                if args.data_dir:
                    cmd += ["--data-dir", args.data_dir]
                print("+", " ".join(cmd), flush=True)
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], flush=True)
                    rows.append(f"| {run} | {method} | failed: {proc.stderr.strip().splitlines()[-1][:80]} |")
                    continue
                cell.write_text(proc.stdout)
            r = json.loads(cell.read_text())
            b, a = r["before"], r["after"]
            rows.append(f"| {run} | {method} | {b['acc']:.2f} | {b['asr']:.2f} | {a['acc']:.2f} | "
                        f"{a['asr']:.2f} | {a['ra']:.2f} | {r['der']:.2f} | {r['pruned_count']} | "
                        f"{r['seconds']:.1f} | {r['evaluations']} | {r['peak_rss_mib']:.0f} |")
    table = ("| model | defense | ACC before | ASR before | ACC | ASR | RA | DER | pruned | "
             "seconds | evaluations | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
             + "\n".join(rows))
    header = (f"clean images (data-free methods: none): {args.per_class or args.clean}"
              f"{' per class' if args.per_class else ''}, seed {args.seed}, "
              f"{platform.machine()} {__import__('os').cpu_count()} cores\n\n")
    out.write_text(header + table + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
