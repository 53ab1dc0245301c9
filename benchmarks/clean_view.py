"""What ONP's 500 clean images see of a pruning's accuracy cost, against the test split.

ONP guards accuracy on the defender's clean images: the reward and the final choice on the
held-out half (250 images), the confirmation and the refinement on all 500 too. Issue 5's target
is on the test split (10,000 images). This script takes ONP repairs and, for the agent's choice,
each refinement step and the final pruning (after the give-back step), measures the accuracy
drop from the unpruned model on:

- all the defender's clean images (training split, drawn as the repair drew them), with the
  paired count of images the pruning got wrong that the unpruned model got right (lost) and
  the reverse (gained), and the paired standard error of the drop,
  ``sqrt(lost + gained - (lost - gained)^2 / n) / n``;
- their fit half and held-out half (ONP's own split; the candidates are chosen on the held-out
  half);
- eight copies of each shifted by a tenth of the image (``shappruning.shifted_views``);
- the test split, with the true trigger's ASR (neither is seen by the defense).

Repairs come as repair records (``trojanprune repair ... --json --out OUT``: ``OUT/repair.json``,
named ``ARCH-ATTACK-....json``) or as grid cells, read from a grid folder's HTML reports (their
"Method details" JSON and pruned-channel table) and ``results.jsonl``:

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/clean_view.py \\
        --grid benchmarks/results/grid-cifar10-vgg_small --grid benchmarks/results/grid-cifar10-resnet20 \\
        --out benchmarks/results/onp-stop46/clean-view-grid.md
"""

from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path

import torch

from trojanprune.bench.results import RESULTS_FILE, latest, read_results
from trojanprune.defenses.base import CleanData
from trojanprune.defenses.shappruning import shifted_views
from trojanprune.engine import MaskEvaluator
from trojanprune.runs import load_run
from trojanprune.utils import derive_seed

from refine_steps import defender_clean, refinement_states, test_evaluators

DETAILS_OPEN = "<summary>Method details (JSON)</summary><pre>"
PRUNED_ROW = re.compile(r'<code>([^<]+)</code></td><td class="num">\d+</td><td class="num">\d+</td>'
                        r'<td><span class="idx">([^<]*)</span>')


def grid_records(folder: Path, defense: str = "onp") -> list[tuple[str, dict]]:
    """(run name, record) for each ``defense`` cell of a grid folder: the record's fields that
    this script reads, from ``results.jsonl`` and the cell's HTML report."""
    _, rows = read_results(folder / RESULTS_FILE)
    cells = latest(r for r in rows if r.get("defense") == defense and r.get("status") == "ok")
    out = []
    for (dataset, arch, attack, _, seed), row in sorted(cells.items()):
        # the report as the grid wrote it into this folder (the row's path is the machine's)
        page = html.unescape((folder / "reports" / Path(row["report"]).name).read_text())
        start = page.index(DETAILS_OPEN) + len(DETAILS_OPEN)
        details = json.loads(page[start:page.index("</pre>", start)])
        table = page[page.index("<h2>What was pruned, per layer</h2>"):]
        table = table[:table.index("</table>")]
        pruned = [[m.group(1), int(c)] for m in PRUNED_ROW.finditer(table)
                  for c in m.group(2).split(",") if c.strip()]
        if len(pruned) != row["pruned_count"]:
            raise ValueError(f"{row['report']}: read {len(pruned)} pruned channels, the row says "
                             f"{row['pruned_count']}")
        out.append((f"{dataset}-{arch}-{attack}", {
            "pruned": pruned, "details": details, "seed": seed, "clean_images": row["clean_images"],
            "options": row["options"], "before": {"acc": row["acc_before"], "asr": row["asr_before"]}}))
    return out


def states(record: dict) -> list[tuple[str, list[tuple[str, int]]]]:
    """(name, pruned channels) of the agent's choice, each refinement step and, when the
    give-back step returned channels, the final pruning."""
    refined = refinement_states(record, with_returned=True)
    out = [("choice" if k == 0 else f"step {k}", pruned) for k, pruned in enumerate(refined)]
    if record["details"]["choice"].get("give_back", {}).get("returned"):
        out.append(("given back", [tuple(p) for p in record["pruned"]]))
    return out


def view(run, record: dict, cache: dict, data_dir=None) -> list[dict]:
    """One row per state of the record (see :func:`states`): drops in points, test ASR in %."""
    units, clean, triggered, target, base = test_evaluators(run, data_dir)
    named = states(record)
    masks = torch.stack([torch.ones(units.total)] + [units.keep_mask(p).float() for _, p in named])
    x, y = defender_clean(run, record, cache, data_dir)
    model = run.model.eval()
    right = (MaskEvaluator(model, units, x, y).logits(masks).argmax(-1).cpu() == y.cpu())
    holdout = float(record["options"].get("holdout", 0.5))
    data = CleanData(torch.arange(len(y)).float().view(-1, 1), y, int(y.max()) + 1)
    fit_half, held_half = data.split(holdout, seed=derive_seed(record["seed"], "onp-holdout"))
    fit_idx, held_idx = fit_half.x.flatten().long(), held_half.x.flatten().long()
    shifted = MaskEvaluator(model, units, shifted_views(x), y.repeat(9)).accuracy(masks).cpu()
    test_acc, test_asr = clean.accuracy(masks).cpu(), triggered.target_rate(masks, target).cpu()
    n = len(y)
    rows = []
    for k, (name, pruned) in enumerate(named, start=1):
        lost = int((right[0] & ~right[k]).sum())
        gained = int((~right[0] & right[k]).sum())
        se = max(lost + gained - (lost - gained) ** 2 / n, 0.0) ** 0.5 / n
        rows.append({
            "state": name, "pruned": len(pruned), "lost": lost, "gained": gained,
            "clean_drop": 100 * (lost - gained) / n, "clean_se": 100 * se,
            "fit_drop": 100 * float(right[0][fit_idx].float().mean() - right[k][fit_idx].float().mean()),
            "held_drop": 100 * float(right[0][held_idx].float().mean() - right[k][held_idx].float().mean()),
            "shifted_drop": 100 * float(shifted[0] - shifted[k]),
            "test_drop": 100 * float(test_acc[0] - test_acc[k]), "test_asr": 100 * float(test_asr[k])})
    return rows


def table(results: list[tuple[str, list[dict]]]) -> list[str]:
    lines = ["| repair | state | pruned | lost / gained (500) | drop on the 500 (SE) | fit half | held-out half "
             "| shifted copies | **test drop** | test ASR % |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for name, rows in results:
        for r in rows:
            lines.append(f"| {name} | {r['state']} | {r['pruned']} | {r['lost']} / {r['gained']} | "
                         f"{r['clean_drop']:.2f} ({r['clean_se']:.2f}) | {r['fit_drop']:.2f} | "
                         f"{r['held_drop']:.2f} | {r['shifted_drop']:.2f} | **{r['test_drop']:.2f}** | "
                         f"{r['test_asr']:.2f} |")
    finals = [rows[-1] for _, rows in results]
    if finals:
        lines.append("")
        lines.append(f"Final prunings ({len(finals)}): mean drop on the 500 clean images "
                     f"{_mean(finals, 'clean_drop'):.2f}, held-out half {_mean(finals, 'held_drop'):.2f}, "
                     f"fit half {_mean(finals, 'fit_drop'):.2f}, shifted copies "
                     f"{_mean(finals, 'shifted_drop'):.2f}, test {_mean(finals, 'test_drop'):.2f} points; "
                     f"test drop above the 500's drop on {sum(f['test_drop'] > f['clean_drop'] for f in finals)}; "
                     f"mean paired SE on the 500: {_mean(finals, 'clean_se'):.2f}.")
    return lines


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="*", help="repair records named ARCH-ATTACK-....json")
    ap.add_argument("--grid", action="append", default=[], help="a grid folder (its ONP cells)")
    ap.add_argument("--zoo", default="benchmarks/zoo")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    todo = [(name, record) for folder in args.grid for name, record in grid_records(Path(folder))]
    for path in args.records:
        stem = Path(path).name
        arch, attack = stem.split("-")[:2]
        todo.append((f"{args.dataset}-{arch}-{attack}", json.loads(Path(path).read_text())))
    cache, results = {}, []
    for name, record in todo:
        run = load_run(Path(args.zoo) / name)
        results.append((name.split("-", 1)[1], view(run, record, cache, args.data_dir)))
        print("\n".join(table(results[-1:])[2:]), flush=True)
    lines = table(results)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
