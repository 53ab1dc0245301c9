"""Figures of a grid (matplotlib, Agg backend, PNG): ASR vs ACC after repair per defense,
DER per attack, and time per defense."""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path
from statistics import mean

from ..utils import default_mode


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_plots(out_dir: str | Path, records: list[dict]) -> list[Path]:
    """The three PNGs in ``out_dir``; cells that failed are left out."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    ok = [r for r in records if r.get("status") == "ok" and r.get("asr_after") is not None]
    if not ok:
        return []
    defenses = list(dict.fromkeys(r["defense"] for r in ok))
    attacks = list(dict.fromkeys(r["attack"] for r in ok))
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4.5))
    before = {(r["dataset"], r["arch"], r["attack"], r["seed"]): r for r in ok}
    ax.scatter([r["acc_before"] for r in before.values()],
               [r["asr_before"] for r in before.values()], marker="x", color="black",
               label="no defense")
    for d in defenses:
        mine = [r for r in ok if r["defense"] == d]
        ax.scatter([r["acc_after"] for r in mine], [r["asr_after"] for r in mine], label=d,
                   alpha=0.8)
    ax.set_xlabel("ACC after repair (%)")
    ax.set_ylabel("ASR after repair (%)")
    ax.set_title("ASR vs ACC per defense (each point a cell)")
    ax.legend(fontsize=8, loc="best")
    paths.append(_save(fig, out_dir / "asr_vs_acc.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(attacks) * max(1, len(defenses)) / 3), 4))
    width = 0.8 / max(1, len(defenses))
    for i, d in enumerate(defenses):
        values = []
        for a in attacks:
            ders = [r["der"] for r in ok if r["defense"] == d and r["attack"] == a
                    and r.get("der") is not None]
            values.append(mean(ders) if ders else 0.0)
        ax.bar([j + i * width for j in range(len(attacks))], values, width, label=d)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(attacks))], attacks)
    ax.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylabel("DER (%), mean over cells")
    ax.set_ylim(0, 100)
    ax.set_title("DER per attack (50 = no change)")
    ax.legend(fontsize=8, ncol=2)
    paths.append(_save(fig, out_dir / "der_per_attack.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    seconds = defaultdict(list)
    for r in ok:
        seconds[r["defense"]].append(r.get("repair_seconds", r.get("seconds", 0.0)))
    ax.bar(defenses, [mean(seconds[d]) for d in defenses], color="tab:blue")
    ax.set_ylabel("repair time (s), mean over cells")
    ax.set_title("time per defense")
    paths.append(_save(fig, out_dir / "time_per_defense.png"))
    plt.close(fig)
    return paths
