"""Train the backdoored model zoo the defense benchmarks measure on.

    python benchmarks/zoo.py --dataset cifar10 --arch vgg_small --epochs 15 \
        --attacks badnets blended wanet sig --out benchmarks/zoo

Each model is trained by the CLI in its own process (so its peak memory is its own) and saved as
a run directory ``<out>/<dataset>-<arch>-<attack>``; existing runs are reused, not retrained.
Prints (and writes ``<out>/<dataset>-<arch>.md``) a table of throughput, time, memory, ACC/ASR/RA
and the clean accuracy of the target class (measured again on the test split: a clean-label
attack that poisons every target-class image leaves that class near 0%, which ACC averages away).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--arch", default="vgg_small")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--attacks", nargs="+", default=["badnets", "blended", "wanet", "sig"])
    ap.add_argument("--epochs-for", nargs="*", default=[], help="attack=epochs overrides")
    ap.add_argument("--out", default="benchmarks/zoo")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    overrides = dict(item.split("=") for item in args.epochs_for)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for attack in args.attacks:
        run_dir = out / f"{args.dataset}-{args.arch}-{attack}"
        epochs = int(overrides.get(attack, args.epochs))
        if not (run_dir / "run.json").exists():
            cmd = [sys.executable, "-m", "trojanprune.cli", "attack", attack, "--dataset",
                   args.dataset, "--arch", args.arch, "--epochs", str(epochs), "--lr",
                   str(args.lr), "--device", args.device, "--out", str(run_dir)]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        record = json.loads((run_dir / "run.json").read_text())
        t, m = record["training"], record["metrics"]
        rows.append(f"| {attack} | {t['config']['epochs']} | {t['images_per_second']:.0f} | "
                    f"{t['seconds'] / 60:.1f} | {t['peak_rss_mib']:.0f} | {m['acc']:.2f} | "
                    f"{m['asr']:.2f} | {m['ra']:.2f} | {target_class_accuracy(run_dir, args.data_dir):.1f} |")
    table = ("| attack | epochs | train images/s | train minutes | peak RSS MiB | ACC % | ASR % | "
             "RA % | target-class ACC % |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    header = (f"{args.dataset} / {args.arch}, lr {args.lr}, machine: {platform.processor() or platform.machine()}, "
              f"{__import__('os').cpu_count()} cores, device {args.device}\n\n")
    (out / f"{args.dataset}-{args.arch}.md").write_text(header + table + "\n")
    print(header + table)


def target_class_accuracy(run_dir: Path, data_dir) -> float:
    from trojanprune import metrics
    from trojanprune.runs import load_run

    run = load_run(run_dir)
    per_class = metrics.evaluate(run.model, run.test_set(data_dir), per_class=True)["acc_per_class"]
    return per_class[run.record["attack"]["target"]]


if __name__ == "__main__":
    main()
