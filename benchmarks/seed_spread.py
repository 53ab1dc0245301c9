"""How much a defense's result moves with its seed: the same backdoored model repaired with
other seeds (each seed draws other clean images and runs the defense's own randomness with
another seed), summarised per model.

One seed's numbers are one sample. ShapPruning sees ten images, ONP 500; which images, and
which random starts, decide more than a small change of method does. This script reads the
results of ``benchmarks/shappruning.py --seed S`` (Markdown tables) and ``benchmarks/onp.py
--seed S`` (JSON lines), and optionally the grid's cells (``results.jsonl`` of ``trojanprune
bench``, seed 0), and prints per model: each seed's ACC / ASR after, the mean and spread, and
on how many seeds the issue's target is met (ONP: ASR <= 2% at a drop of at most 2 points;
ShapPruning: ASR <= 5% at a drop of at most 3 points).

    python benchmarks/seed_spread.py --shappruning benchmarks/results/seeds-stop27/shappruning-*.md \
        --onp benchmarks/results/seeds-stop27/onp-*.jsonl \
        --grid benchmarks/results/grid-cifar10-vgg_small/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from trojanprune import metrics

TARGETS = {"onp": (2.0, 2.0), "shappruning": (5.0, 3.0)}  # (ASR %, ACC drop in points)


def der(acc_b, acc_a, asr_b, asr_a) -> float:
    """DER in %, from percentages (the toolkit's definition, on fractions)."""
    return 100 * metrics.der(acc_b / 100, acc_a / 100, asr_b / 100, asr_a / 100)


def seed_of(path: Path) -> int:
    found = re.search(r"seed(\d+)", path.name)
    if not found:
        raise SystemExit(f"{path}: the file name must say its seed (…seedN…)")
    return int(found.group(1))


def from_shappruning(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 12 or not cells[0].startswith(("cifar", "gtsrb", "mnist")) or cells[1] == "data-free":
            continue
        model = cells[0]
        acc_b, asr_b, acc, asr = (float(cells[i]) for i in (4, 5, 7, 8))
        rows.append(dict(method="shappruning", model=model, seed=seed_of(path), acc_b=acc_b,
                         asr_b=asr_b, acc=acc, asr=asr, pruned=int(cells[11]), source=str(path)))
    return rows


def from_onp(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows.append(dict(method="onp", model=Path(r["run"]).name, seed=seed_of(path),
                         acc_b=r["before"]["acc"], asr_b=r["before"]["asr"], acc=r["after"]["acc"],
                         asr=r["after"]["asr"], pruned=r["pruned"], source=str(path)))
    return rows


def from_grid(path: Path, methods) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("defense") not in methods or r.get("status") != "ok":
            continue
        rows.append(dict(method=r["defense"], model=f"{r['dataset']}-{r['arch']}-{r['attack']}",
                         seed=r["seed"], acc_b=r["acc_before"], asr_b=r["asr_before"],
                         acc=r["acc_after"], asr=r["asr_after"], pruned=r.get("pruned_count"),
                         source=f"{path} (grid cell)"))
    return rows


def table(rows: list[dict]) -> str:
    groups: dict = {}
    for r in rows:  # a later source for the same (method, model, seed) replaces an earlier one
        groups.setdefault((r["method"], r["model"]), {})[r["seed"]] = r
    out = ["| method | model | seeds | ASR after, each seed | ACC drop, each seed | mean ASR (sd) | "
           "mean drop (sd) | mean DER | target met |", "|---" * 9 + "|"]
    for (method, model), by_seed in sorted(groups.items()):
        seeds = sorted(by_seed)
        rs = [by_seed[s] for s in seeds]
        asr = [r["asr"] for r in rs]
        drop = [r["acc_b"] - r["acc"] for r in rs]
        ders = [der(r["acc_b"], r["acc"], r["asr_b"], r["asr"]) for r in rs]
        max_asr, max_drop = TARGETS[method]
        met = sum(a <= max_asr and d <= max_drop for a, d in zip(asr, drop))
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else float("nan"))
        out.append(f"| {method} | {model} | {','.join(map(str, seeds))} | "
                   f"{' / '.join(f'{a:.2f}' for a in asr)} | {' / '.join(f'{d:+.2f}' for d in drop)} | "
                   f"{statistics.mean(asr):.2f} ({sd(asr):.2f}) | {statistics.mean(drop):.2f} "
                   f"({sd(drop):.2f}) | {statistics.mean(ders):.2f} | {met} of {len(rs)} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shappruning", nargs="*", default=[], type=Path,
                    help="benchmarks/shappruning.py outputs, one per seed (file names say seedN)")
    ap.add_argument("--onp", nargs="*", default=[], type=Path,
                    help="benchmarks/onp.py JSON-lines outputs, one per seed (file names say seedN)")
    ap.add_argument("--grid", nargs="*", default=[], type=Path,
                    help="grid results.jsonl: their onp and shappruning cells (read first, so a "
                         "file above for the same seed replaces them)")
    args = ap.parse_args()
    # the grid's cells of the methods whose per-seed files are given (with none given: both)
    methods = {m for m, files in (("onp", args.onp), ("shappruning", args.shappruning)) if files}
    methods = methods or set(TARGETS)
    rows = []
    for path in args.grid:
        rows += from_grid(path, methods)
    for path in args.shappruning:
        rows += from_shappruning(path)
    for path in args.onp:
        rows += from_onp(path)
    if not rows:
        raise SystemExit("no results read: pass --shappruning, --onp and/or --grid files")
    print(table(rows), end="")


if __name__ == "__main__":
    main()
