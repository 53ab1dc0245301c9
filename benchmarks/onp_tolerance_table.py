"""ONP's eight seed-0 grid cells at other accuracy guards, against the grid itself.

Reads the grid folders' ONP cells (``results.jsonl``: today's default) and repair records
named ``ARCH-ATTACK-LABEL.json`` (``trojanprune repair ... --json``, e.g. with ``--set
acc_tolerance=0.01``), and prints per cell ACC / ASR (drop) and whether issue 5's target is met
(ASR <= 2%, test ACC drop <= 2 points), then per column the cells met, the cells with ASR <= 2%,
the mean DER and the mean drop.

    python benchmarks/onp_tolerance_table.py --grid benchmarks/results/grid-cifar10-vgg_small \\
        --grid benchmarks/results/grid-cifar10-resnet20 \\
        --label tol01="acc_tolerance=0.01" --label tol015="acc_tolerance=0.015" \\
        --records benchmarks/results/onp-stop46
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trojanprune.bench.results import RESULTS_FILE, latest, read_results

ARCHS = ("vgg_small", "resnet20")
ATTACKS = ("badnets", "blended", "wanet", "sig")


def grid_cells(folders: list[str]) -> dict[tuple[str, str], dict]:
    """(arch, attack) -> the latest ONP seed-0 row of the grid folders."""
    cells = {}
    for folder in folders:
        _, rows = read_results(Path(folder) / RESULTS_FILE)
        onp = latest(r for r in rows if r.get("defense") == "onp" and r.get("seed") == 0
                     and r.get("status") == "ok")
        for row in onp.values():
            cells[(row["arch"], row["attack"])] = {
                "acc_before": row["acc_before"], "asr_before": row["asr_before"],
                "acc": row["acc_after"], "asr": row["asr_after"], "der": row["der"]}
    return cells


def record_cell(path: Path) -> dict:
    record = json.loads(path.read_text())
    return {"acc_before": record["before"]["acc"], "asr_before": record["before"]["asr"],
            "acc": record["after"]["acc"], "asr": record["after"]["asr"], "der": record["der"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", action="append", default=[])
    ap.add_argument("--records", required=True, help="the folder of ARCH-ATTACK-LABEL.json records")
    ap.add_argument("--label", action="append", default=[], help="LABEL=column title")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    columns = [("grid", "the grid (default)", grid_cells(args.grid))]
    for item in args.label:
        label, title = item.split("=", 1)
        cells = {}
        for arch in ARCHS:
            for attack in ATTACKS:
                path = Path(args.records) / f"{arch}-{attack}-{label}.json"
                if path.exists() and path.stat().st_size:
                    cells[(arch, attack)] = record_cell(path)
        columns.append((label, title, cells))
    lines = ["| seed-0 cell | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for arch in ARCHS:
        for attack in ATTACKS:
            out = []
            for _, _, cells in columns:
                c = cells.get((arch, attack))
                if c is None:
                    out.append("(not run)")
                    continue
                drop = c["acc_before"] - c["acc"]
                met = c["asr"] <= 2 and drop <= 2
                out.append(f"{c['acc']:.2f} / {c['asr']:.2f} ({-drop:.2f})" + (" met" if met else ""))
            lines.append(f"| {arch} {attack} | " + " | ".join(out) + " |")
    summary = []
    for _, title, cells in columns:
        rows = list(cells.values())
        if not rows:
            continue
        drops = [c["acc_before"] - c["acc"] for c in rows]
        met = sum(c["asr"] <= 2 and d <= 2 for c, d in zip(rows, drops))
        summary.append(f"- {title}: {len(rows)} cells; target met on {met}; ASR <= 2% on "
                       f"{sum(c['asr'] <= 2 for c in rows)}; mean DER "
                       f"{sum(c['der'] for c in rows) / len(rows):.2f}; mean test ACC drop "
                       f"{sum(drops) / len(drops):.2f} points")
    lines += [""] + summary
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
