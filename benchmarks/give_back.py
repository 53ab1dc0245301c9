"""ONP's give-back step (Options.give_back) replayed on recorded repairs: test ACC and ASR of
the agent's choice and of that choice after each give-back rule.

For each repair record (``trojanprune repair ... --method onp --json``: ``repair.json``) this
script redoes what the repair did before its agent ran (the same clean images, split, units
and backdoor probe, from the record's seed and options) and checks that the probe gives the
agent's choice the backdoor score the record holds. It then runs the give-back step from the
agent's choice (step 0 of ``refine_steps.py``: the repair with ``refine_steps=0``, ONP's
default until stop 33) under each rule, which sees only the defender's held-out half and the probe, and
measures every pruning on the zoo model's test split with the true trigger, which the
defense never sees. The agent itself is not rerun: its choice is the record's.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/give_back.py \\
        benchmarks/results/onp-stop30/*-refine6.json --out benchmarks/results/onp-stop32/give-back.md

``--start refined`` starts the step from the record's final pruning instead (the agent's
choice plus its ``refine_steps``; the combination ``refine_steps=N, give_back=...``); the
probe check then uses the last step's recorded score.

Record names follow ``refine_steps.py`` (``<model>-<attack>-seed<S>-<variant>.json``).
``--merge`` summarizes the ``<record>-give-back.json`` files of runs split across jobs:

    python benchmarks/give_back.py --merge benchmarks/results/onp-stop32/*-give-back.json
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from trojanprune import defenses
from trojanprune.defenses.base import CleanData
from trojanprune.defenses.onp import GIVE_BACK_RULES, RewardTerms
from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.onp.probes import create_probe
from trojanprune.runs import load_run
from trojanprune.utils import seed_everything

from refine_steps import defender_clean, outcome, record_arguments, step_masks, test_evaluators

RULES = [r for r in GIVE_BACK_RULES if r != "off"]


def main() -> None:
    ap = record_arguments(__doc__)
    ap.add_argument("--out", default=None, help="a markdown table; each record's returns go to OUT's "
                                                "folder as <record>-give-back.json")
    ap.add_argument("--start", choices=["choice", "refined"], default="choice",
                    help="give back from the agent's choice (default) or the refined pruning")
    ap.add_argument("--merge", action="store_true",
                    help="RECORDS are give-back JSONs this script wrote: print their joint summary")
    args = ap.parse_args()
    if args.merge:
        tests = [json.loads(Path(p).read_text())["test"] for p in args.records]
        start = next(iter(tests[0]))  # the pruning the step started from
        print("\n".join(summarize([(p, list(t.values())) for p, t in zip(args.records, tests)], start)))
        return
    torch.set_num_threads(args.threads)
    start = "agent's choice" if args.start == "choice" else "refined"
    header = ("| record | probe score: record / replay | " + " | ".join(
        f"{r}: channels returned, ASR % / drop / DER" for r in RULES) + f" | {start}: ASR % / drop / DER |")
    lines = [header, "|" + "---|" * (3 + len(RULES))]
    train, summary_rows = {}, []
    for path in args.records:
        record = json.loads(Path(path).read_text())
        name = Path(path).stem
        run = load_run(Path(args.zoo) / f"{args.dataset}-{Path(path).name.split('-seed')[0]}")
        chosen, measure, defense, units = replay(run, record, train, args.data_dir, args.start)
        steps = record["details"]["choice"].get("refine", {}).get("steps", [])
        recorded = (steps[-1] if args.start == "refined" and steps else record["details"]["choice"])["backdoor_score"]
        replayed = float(measure(chosen[None])["backdoor"][0])
        masks, returns = [chosen], {}
        for rule in RULES:
            defense.options.give_back = rule
            keep, info = defense._give_back(chosen, measure, units)
            masks.append(keep)
            returns[rule] = info
        _, clean, triggered, target, base = test_evaluators(run, args.data_dir)
        stacked = torch.stack(masks)
        acc, asr = clean.accuracy(stacked), triggered.target_rate(stacked, target)
        results = [outcome(record["before"], float(a), float(s), base) for a, s in zip(acc, asr)]
        cells = [f"{len(returns[r]['returned'])}, " + fmt(o) for r, o in zip(RULES, results[1:])]
        lines.append(f"| {name} | {recorded:.4f} / {replayed:.4f} | " + " | ".join(cells)
                     + f" | {fmt(results[0])} |")
        print(lines[-1], flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            (Path(args.out).parent / f"{name}-give-back{'' if args.start == 'choice' else '-refined'}.json").write_text(json.dumps(
                {"record": str(path), "probe_score_recorded": recorded, "probe_score_replayed": replayed,
                 "rules": returns, "test": dict(zip([start, *RULES], results))}, indent=1))
        summary_rows.append((name, results))
    table = summarize(summary_rows, start)
    lines += ["", *table]
    print("\n".join(table))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def fmt(o: dict) -> str:
    return f"{o['asr']:.2f} / {o['drop']:.2f} / {o['der']:.2f}" + (" (met)" if o["met"] else "")


def summarize(rows, start: str) -> list[str]:
    out = []
    for k, label in enumerate([start, *(f"give_back={r}" for r in RULES)]):
        ders = [r[1][k]["der"] for r in rows]
        out.append(f"{label}: mean DER {sum(ders) / len(ders):.2f} over {len(ders)} repairs, "
                   f"target met on {sum(r[1][k]['met'] for r in rows)}")
    return out


def replay(run, record: dict, cache: dict, data_dir, start: str = "choice"):
    """The repair's state when its agent started, rebuilt as ``trojanprune.repair`` and
    ``ONP.run`` build it: (the keep mask to start from: the agent's choice or, with ``start``
    "refined", the record's final pruning; reward terms; the defense; units)."""
    x, y = defender_clean(run, record, cache, data_dir)
    _, defense, units, _, _, measure = rebuild(run, x, y, record["seed"], record["options"])
    return step_masks(record, units)[0 if start == "choice" else -1], measure, defense, units


def rebuild(run, x, y, seed: int, options: dict, probe: bool = True):
    """What ONP's run builds before its agent, from the defender's clean images ``x, y``:
    (the model copy every evaluator runs, the defense, units, fit half, held-out half, reward
    terms; None without ``probe``)."""
    model = copy.deepcopy(run.model).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    seed_everything(seed)
    defense = defenses.get("onp")(seed=seed, **options)
    o = defense.options
    clean = CleanData(x, y, int(run.record["dataset"].get("num_classes", 10)))
    fit, held = defense._split(clean)
    units = discover_units(model, clean.x[:1])
    if o.layers != "all":
        units = units.select(o.layers)
    measure = None
    if probe:
        backdoor = create_probe(o.probe, model, units, fit, held, o, seed=seed)
        measure = RewardTerms(o, MaskEvaluator(model, units, held.x, held.y), backdoor, units.total)
    return model, defense, units, fit, held, measure


if __name__ == "__main__":
    main()
