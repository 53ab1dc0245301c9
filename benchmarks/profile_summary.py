"""Where a run spends its time: inclusive seconds per function from a py-spy profile.

py-spy (``pip install py-spy``; not a dependency of the toolkit) samples the Python stacks of a
running command; ``--format raw`` writes one line per distinct stack, ``frame;frame;... count``.
A function's inclusive time is the number of samples whose stack contains it, divided by the
sampling rate. Used in stop 40 (BENCHMARKS.md) to find what ONP's resnet20 repair spends:

    py-spy record -r 50 -f raw -o prof.raw -- trojanprune repair benchmarks/zoo/cifar10-resnet20-wanet \\
        --method onp --clean 500 --seed 0 --threads 2 --out OUT --json
    python benchmarks/profile_summary.py prof.raw --rate 50 --top 60

A gzipped profile (``.gz``) is read as it is.
"""

from __future__ import annotations

import argparse
import gzip
from collections import Counter
from pathlib import Path


def frame_name(frame: str) -> str:
    """``function (file.py)`` from py-spy's ``function (path/to/file.py:line)``."""
    name, _, where = frame.partition(" (")
    if not where:
        return frame
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})"


def inclusive_samples(lines) -> tuple[Counter, int]:
    """Samples per function, each stack counted once per function in it, and the total."""
    counts: Counter = Counter()
    total = 0
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        n = int(n)
        total += n
        for name in {frame_name(f) for f in stack.split(";")}:
            counts[name] += n
    return counts, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy --format raw output (optionally .gz)")
    parser.add_argument("--rate", type=float, default=50.0, help="py-spy's sampling rate (-r)")
    parser.add_argument("--top", type=int, default=60, help="functions to list")
    args = parser.parse_args()
    opener = gzip.open if args.profile.suffix == ".gz" else open
    with opener(args.profile, "rt") as f:
        counts, total = inclusive_samples(f)
    print(f"{total} samples = {total / args.rate:.1f} s")
    for name, n in counts.most_common(args.top):
        print(f"{n / args.rate:9.1f} s  {name}")


if __name__ == "__main__":
    main()
