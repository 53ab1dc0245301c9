"""BackdoorBench-style tables from a results file: one table per (dataset, arch), a row per
attack, and for each defense its ACC / ASR / DER (percent), each the mean over seeds of the
cells that finished. "No defense" is the backdoored model before repair."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from statistics import mean

from ..utils import write_atomic

METRICS = ("acc", "asr", "der")


def _order(records: list[dict], field: str, preferred: list[str] | None = None) -> list:
    seen = list(dict.fromkeys(r[field] for r in records))
    if preferred:
        return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]
    return seen


def summarise(records: list[dict], defenses: list[str] | None = None,
              attacks: list[str] | None = None) -> list[dict]:
    """One row per (dataset, arch, attack): before-repair ACC/ASR and each defense's
    mean ACC/ASR/DER (None where no cell finished), plus how many seeds were averaged."""
    defenses = _order(records, "defense", defenses)
    attacks_order = _order(records, "attack", attacks)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["arch"], r["attack"])].append(r)
    rows = []
    for dataset, arch in dict.fromkeys((r["dataset"], r["arch"]) for r in records):
        for attack in attacks_order:
            cells = groups.get((dataset, arch, attack))
            if not cells:
                continue
            ok = [c for c in cells if c.get("status") == "ok"]
            before = {}
            for c in ok:  # one before-value per seed (every defense cell repeats it)
                before.setdefault(c["seed"], c)
            row = {"dataset": dataset, "arch": arch, "attack": attack,
                   "none": {"acc": _mean(c.get("acc_before") for c in before.values()),
                            "asr": _mean(c.get("asr_before") for c in before.values()),
                            "seeds": len(before)}}
            for defense in defenses:
                mine = [c for c in cells if c["defense"] == defense]
                good = [c for c in mine if c.get("status") == "ok"]
                entry = {m: _mean(c.get(f"{m}_after" if m != "der" else "der") for c in good)
                         for m in METRICS}
                entry["seeds"] = len(good)
                entry["failed"] = len(mine) - len(good)
                entry["seconds"] = _mean(c.get("seconds") for c in good)
                row[defense] = entry
            rows.append(row)
    return rows


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return mean(values) if values else None


def _fmt(value: float | None, entry: dict | None = None) -> str:
    if value is None:
        return "failed" if entry and entry.get("failed") else "-"
    return f"{value:.2f}"


def markdown_table(records: list[dict], defenses: list[str] | None = None,
                   attacks: list[str] | None = None) -> str:
    rows = summarise(records, defenses, attacks)
    defenses = _order(records, "defense", defenses)
    seeds = sorted({r["seed"] for r in records})
    out = []
    for dataset, arch in dict.fromkeys((r["dataset"], r["arch"]) for r in rows):
        out.append(f"### {dataset} / {arch}\n")
        out.append(f"ACC, ASR and DER in %, mean over seed(s) {', '.join(map(str, seeds))} of the "
                   f"cells that finished.\n")
        head = ["attack", "No defense ACC", "No defense ASR"]
        for d in defenses:
            head += [f"{d} ACC", f"{d} ASR", f"{d} DER"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|---|" + "---:|" * (len(head) - 1))
        for row in rows:
            if (row["dataset"], row["arch"]) != (dataset, arch):
                continue
            cells = [row["attack"], _fmt(row["none"]["acc"]), _fmt(row["none"]["asr"])]
            for d in defenses:
                entry = row.get(d, {})
                cells += [_fmt(entry.get(m), entry) for m in METRICS]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out.append(time_table(records, defenses))
    out.append(cells_table(records, defenses, attacks))
    return "\n".join(out)


def cells_table(records: list[dict], defenses: list[str] | None = None,
                attacks: list[str] | None = None) -> str:
    """Every cell on its own row: ACC/ASR/RA before and after, DER, units pruned, cost (the
    summary above averages seeds and leaves RA out, as BackdoorBench's tables do)."""
    defenses = _order(records, "defense", defenses)
    attacks = _order(records, "attack", attacks)
    lines = ["### every cell\n",
             "| dataset | arch | attack | defense | seed | ACC before | ASR before | RA before | "
             "ACC | ASR | RA | DER | pruned | seconds | evaluations | peak RSS MiB |",
             "|---|---|---|---|---:|" + "---:|" * 11]
    attack_rank = {a: i for i, a in enumerate(attacks)}
    defense_rank = {d: i for i, d in enumerate(defenses)}
    ordered = sorted(records, key=lambda r: (r["dataset"], r["arch"], attack_rank[r["attack"]],
                                             defense_rank[r["defense"]], r["seed"]))
    for r in ordered:
        head = f"| {r['dataset']} | {r['arch']} | {r['attack']} | {r['defense']} | {r['seed']} |"
        if r.get("status") != "ok":
            error = str(r.get("error") or "failed").replace("|", "/").splitlines()
            lines.append(f"{head} failed: {(error[0] if error else 'failed')[:80]} |" + " |" * 10)
            continue
        numbers = [_fmt(r.get(k)) for k in ("acc_before", "asr_before", "ra_before", "acc_after",
                                            "asr_after", "ra_after", "der")]
        pruned = r.get("pruned_count")
        peak = r.get("peak_rss_mib")
        lines.append(f"{head} {' | '.join(numbers)} | {'-' if pruned is None else pruned} | "
                     f"{_fmt(r.get('seconds'))} | {r.get('evaluations', '-')} | "
                     f"{'-' if peak is None else f'{peak:.0f}'} |")
    return "\n".join(lines) + "\n"


def time_table(records: list[dict], defenses: list[str] | None = None) -> str:
    """Cost per defense: cells run, mean seconds, model evaluations and peak memory."""
    defenses = _order(records, "defense", defenses)
    lines = ["### cost per defense\n",
             "| defense | cells ok | cells failed | mean seconds | mean evaluations | "
             "max peak RSS MiB |", "|---|---:|---:|---:|---:|---:|"]
    for d in defenses:
        mine = [r for r in records if r["defense"] == d]
        ok = [r for r in mine if r.get("status") == "ok"]
        peak = [r["peak_rss_mib"] for r in ok if r.get("peak_rss_mib") is not None]
        lines.append(f"| {d} | {len(ok)} | {len(mine) - len(ok)} | "
                     f"{_fmt(_mean(r.get('seconds') for r in ok))} | "
                     f"{_fmt(_mean(r.get('evaluations') for r in ok))} | "
                     f"{f'{max(peak):.0f}' if peak else '-'} |")
    return "\n".join(lines) + "\n"


def csv_table(records: list[dict], defenses: list[str] | None = None,
              attacks: list[str] | None = None) -> str:
    rows = summarise(records, defenses, attacks)
    defenses = _order(records, "defense", defenses)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    head = ["dataset", "arch", "attack", "seeds", "none_acc", "none_asr"]
    for d in defenses:
        head += [f"{d}_acc", f"{d}_asr", f"{d}_der"]
    writer.writerow(head)
    for row in rows:
        line = [row["dataset"], row["arch"], row["attack"], row["none"]["seeds"],
                _csv(row["none"]["acc"]), _csv(row["none"]["asr"])]
        for d in defenses:
            entry = row.get(d, {})
            line += [_csv(entry.get(m)) for m in METRICS]
        writer.writerow(line)
    return buf.getvalue()


def _csv(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def write_tables(out_dir, records: list[dict], defenses: list[str] | None = None,
                 attacks: list[str] | None = None, name: str = "results") -> list:
    """``OUT/<name>.md`` and ``OUT/<name>.csv``, each written atomically."""
    from pathlib import Path

    out_dir = Path(out_dir)
    paths = []
    for suffix, text in ((".md", markdown_table(records, defenses, attacks)),
                         (".csv", csv_table(records, defenses, attacks))):
        path = out_dir / f"{name}{suffix}"
        write_atomic(path, text)
        paths.append(path)
    return paths


