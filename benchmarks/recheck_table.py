"""ShapPruning with and without ``recheck``, from the logs of ``benchmarks/shappruning.py
--set recheck=1``: each repair's row is the repair with the recheck; where the recheck pruned
more, the log also has the first walk alone ("without the recheck"), which is exactly what
``recheck=0`` returns (the recheck runs after the walk, with its own seeds). Where it pruned
nothing more, both are the row.

    python benchmarks/recheck_table.py benchmarks/results/shappruning-stop35/recheck-*.log

Prints one line per repair (ASR % / ACC drop / DER without and with) and, per model family,
how many repairs meet issue 4's target (ASR <= 5% at a drop of at most 3 points) and the
mean DER.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

from seed_spread import TARGETS, der

ASR_MAX, DROP_MAX = TARGETS["shappruning"]
ROW = re.compile(r"^\| (cifar10-\S+) \| 1/class \| [^|]+ \| [^|]+ \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| "
                 r"([\d.]+) \| ([\d.]+) \|")
WITHOUT = re.compile(r"^    without the recheck \((\d+) channels\): ([\d.]+) \| ([\d.]+) \|")
SEED = re.compile(r"^ShapPruning, seed (\d+),")


def read(path: Path) -> list[dict]:
    """Every repair in one log: model, seed, before, with and without the recheck."""
    lines = path.read_text().splitlines()
    seed = next((int(m.group(1)) for m in map(SEED.match, lines) if m), None)
    if seed is None:
        raise SystemExit(f"{path}: no 'ShapPruning, seed S' header; was the run finished?")
    repairs: dict[str, dict] = {}
    current = None
    for line in lines:
        row = ROW.match(line)
        if row:
            name = row.group(1)
            current = repairs.setdefault(name, {
                "model": name, "seed": seed, "before": (float(row.group(2)), float(row.group(3))),
                "with": (float(row.group(4)), float(row.group(5)))})
            current.setdefault("without", current["with"])
            continue
        without = WITHOUT.match(line)
        if without and current is not None:
            current["without"] = (float(without.group(2)), float(without.group(3)))
    return list(repairs.values())


def judged(before, after) -> tuple[float, float, bool]:
    drop = before[0] - after[0]
    return der(before[0], after[0], before[1], after[1]), drop, after[1] <= ASR_MAX and drop <= DROP_MAX


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", type=Path)
    args = ap.parse_args()
    repairs = sorted((r for p in args.logs for r in read(p)), key=lambda r: (r["model"], r["seed"]))
    print("| repair | without the recheck: ASR / drop / DER | with: ASR / drop / DER |")
    print("|---|---|---|")
    families: dict[str, list] = {}
    for r in repairs:
        cells = []
        for key in ("without", "with"):
            d, drop, met = judged(r["before"], r[key])
            cells.append(f"{r[key][1]:.2f} / {drop:.2f} / {d:.2f}{' (met)' if met else ''}")
            families.setdefault(r["model"].split("-")[1], []).append((key, d, met))
        same = " (same)" if r["with"] == r["without"] else ""
        print(f"| {r['model'].removeprefix('cifar10-')} s{r['seed']} | {cells[0]} | {cells[1]}{same} |")
    print()
    families["all"] = [row for rows in list(families.values()) for row in rows]
    for family, rows in families.items():
        for key in ("without", "with"):
            mine = [(d, met) for k, d, met in rows if k == key]
            print(f"{family}, {key} the recheck: {len(mine)} repairs, target met on "
                  f"{sum(m for _, m in mine)}, mean DER {statistics.mean(d for d, _ in mine):.2f}")


if __name__ == "__main__":
    main()
