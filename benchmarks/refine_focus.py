"""ONP's steps after the final choice replayed with ``refine_focus``: test ACC and ASR.

For each repair record of stops 29-30 (``trojanprune repair ... --set refine_steps=6 --json``:
the record keeps the agent's choice, its reward and the policy's prune probabilities) this
script rebuilds what the repair built before its agent ran (``give_back.replay``: the same
clean images, split, units and probe), then runs from the agent's choice, with the defense's
own ``_refine`` and ``_give_back``:

- ``all``: the refinement and ``give_back="score"`` on every suspect (ONP's default since
  stop 33); its refinement must add the channels the record's refinement added (checked);
- ``a``: the refinement on the suspects of the classes the choice answered
  (``ONP._focus``), the give-back step on every suspect;
- ``b``: both steps on the answered suspects;
- ``t`` (stop 45): the refinement on ``a``'s suspects less the feature-space stand-ins the
  choice did not itself answer (``refine_focus="answered-triggers"``, ONP's default since
  stop 45; the stop-45 replays in BENCHMARKS.md ran its first version, which left out pixel
  and warp stand-ins too), the give-back step on every suspect (as ``a``:
  ``refine_focus="answered"``, the default of stops 34-44).

Each final pruning is measured on the zoo model's test split with the true trigger, which
the defense never sees. The agent is not rerun: its choice is the record's.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/refine_focus.py \\
        benchmarks/results/onp-stop29/*-refine6.json benchmarks/results/onp-stop30/*-refine6.json \\
        --out benchmarks/results/onp-stop34/refine-focus.md

``--recorded-refinement`` takes the ``all`` refinement from the record (its final pruning, as
``give_back.py --start refined`` does) instead of rerunning it, which halves the cost; the check
is then skipped. ``--merge`` summarizes the ``<record>-focus.json`` files of runs split across jobs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trojanprune.engine import MaskEvaluator
from trojanprune.runs import load_run

from give_back import replay
from refine_steps import defender_clean, outcome, record_arguments, step_masks, test_evaluators

VARIANTS = ("all", "a", "b", "t")


def main() -> None:
    ap = record_arguments(__doc__)
    ap.add_argument("--out", default=None, help="a markdown table; each record's replay goes to "
                                                "OUT's folder as <record>-focus.json")
    ap.add_argument("--merge", action="store_true",
                    help="RECORDS are focus JSONs this script wrote: print their joint table")
    ap.add_argument("--recorded-refinement", action="store_true",
                    help="take the all-suspects refinement from the record instead of rerunning it")
    args = ap.parse_args()
    if args.merge:
        rows = [json.loads(Path(p).read_text()) for p in args.records]
        print("\n".join(table(rows)))
        return
    torch.set_num_threads(args.threads)
    train, rows = {}, []
    for path in args.records:
        record = json.loads(Path(path).read_text())
        name = Path(path).stem
        run = load_run(Path(args.zoo) / f"{args.dataset}-{Path(path).name.split('-seed')[0]}")
        row = replay_focus(run, record, train, args.data_dir, args.recorded_refinement)
        row["record"] = name
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("record", "test", "refine_matches_record")}), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            (Path(args.out).parent / f"{name}-focus.json").write_text(json.dumps(row, indent=1))
    lines = table(rows)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def replay_focus(run, record: dict, train: dict, data_dir, recorded_refinement: bool = False) -> dict:
    chosen, measure, defense, units = replay(run, record, train, data_dir, "choice")
    o, choice = defense.options, record["details"]["choice"]
    probs = units.join({g: torch.tensor(p) for g, p in record["details"]["policy_prune_probability"].items()})
    x, y = defender_clean(run, record, train, data_dir)
    confirm = MaskEvaluator(measure.accuracy.model, units, x, y) if o.confirm_on_all else None
    base_acc = float(measure.unpruned["acc"][0])
    probe = measure.probe
    focused, focus = defense._focus(chosen, probe, measure, measure.accuracy, units.total, "answered")

    def refine(terms):
        reward = choice["reward"] if terms is measure else float(terms(chosen[None])["reward"][0])
        return defense._refine(chosen, reward, probs, probe.signal(), terms, base_acc, confirm,
                               choice.get("all_clean_acc_unpruned"), units)

    recorded = [s["unit"] for s in choice.get("refine", {}).get("steps", [])]
    if recorded_refinement:
        refined_all = step_masks(record, units)[-1]
        info_all = {"steps": choice.get("refine", {}).get("steps", []), "from": "the record"}
    else:
        refined_all, info_all = refine(measure)
    refined_focus, info_focus = (refined_all, info_all) if focused is measure else refine(focused)
    focused_t, focus_t = defense._focus(chosen, probe, measure, measure.accuracy, units.total,
                                        "answered-triggers")
    same = focus_t.get("suspects") == focus.get("suspects")
    refined_t, info_t = ((refined_focus, info_focus) if same else
                         (refined_all, info_all) if focused_t is measure else refine(focused_t))
    finals = {"all": defense._give_back(refined_all, measure, units),
              "a": defense._give_back(refined_focus, measure, units),
              "b": defense._give_back(refined_focus, focused, units),
              "t": defense._give_back(refined_t, measure, units)}
    _, clean, triggered, target, base = test_evaluators(run, data_dir)
    masks = torch.stack([chosen] + [finals[v][0] for v in VARIANTS])
    acc, asr = clean.accuracy(masks), triggered.target_rate(masks, target)
    results = [outcome(record["before"], float(a), float(s), base) for a, s in zip(acc, asr)]
    matches = None if recorded_refinement else [s["unit"] for s in info_all["steps"]] == recorded
    return {"focus": focus, "focus_triggers": focus_t, "refine_matches_record": matches,
            "refine": {"all": info_all, "answered": info_focus, "answered-triggers": info_t},
            "give_back": {v: finals[v][1] for v in VARIANTS},
            "pruned": {v: int((finals[v][0] < 0.5).sum()) for v in VARIANTS},
            "test": dict(zip(["choice", *VARIANTS], results))}


def fmt(o: dict) -> str:
    return f"{o['asr']:.2f} / {o['drop']:.2f} / {o['der']:.2f}" + (" (met)" if o["met"] else "")


def table(rows: list[dict]) -> list[str]:
    lines = ["| record | answered classes | agent's choice | all | a: refine answered (stops 34-44) | "
             "b: both answered | t: refine answered triggers (default) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["test"]
        lines.append(f"| {r['record']} | {r['focus']['answered_classes'] or '-'} | "
                     + " | ".join(fmt(t[k]) if k in t else "-" for k in ("choice", *VARIANTS)) + " |")
    lines.append("")
    lines.append("cells: test ASR % / test ACC drop (points) / DER %; (met): ASR <= 2% at a drop <= 2")
    lines.append("")
    for k in ("choice", *VARIANTS):
        ders = [r["test"][k]["der"] for r in rows if k in r["test"]]
        if ders:
            lines.append(f"- {k}: mean DER {sum(ders) / len(ders):.2f} over {len(ders)} repairs, target met "
                         f"on {sum(r['test'][k]['met'] for r in rows if k in r['test'])}")
    bad = [r["record"] for r in rows if r["refine_matches_record"] is False]
    taken = [r["record"] for r in rows if r["refine_matches_record"] is None]
    lines.append(f"- replayed refinement (all) differs from the record's on: {', '.join(bad) or 'none'}")
    if taken:
        lines.append(f"- refinement (all) taken from the record, not replayed: {', '.join(taken)}")
    return lines


if __name__ == "__main__":
    main()
