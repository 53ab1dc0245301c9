"""ONP's greedy refinement step by step: test ACC and ASR after each step of recorded repairs.

A repair record (``trojanprune repair ... --method onp --json --out OUT``: ``OUT/repair.json``)
keeps the final pruning and, under ``details.choice.refine.steps``, the channels the
refinement added after the agent's choice, in order. This script rebuilds the pruning after
each step (the final one minus the later steps' channels; step 0 is the agent's choice alone,
i.e. the repair with ``refine_steps=0``) and measures it on the zoo model's test split with
the true trigger, which the defense never sees. A second table sets the agent's choice
against the refined pruning: ASR, drop, DER, and on how many repairs issue 5's target is met.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/refine_steps.py \\
        benchmarks/results/onp-stop29/*-refine6.json --out benchmarks/results/onp-stop29/refine-steps.md

A record's file name starts with the zoo run's name without ``cifar10-`` and ends in
``-seed<S>-<variant>.json`` (e.g. ``resnet20-badnets-seed1-refine6.json``);
``--zoo`` is where the runs are (benchmarks/zoo).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.runs import load_run


def main() -> None:
    ap = record_arguments(__doc__)
    ap.add_argument("--defender", action="store_true",
                    help="also what the defender could see: accuracy drop on the record's own "
                         "clean images (training split, the record's seed) and the mean KL "
                         "divergence from the unpruned model on them and 8 shifted copies each")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    extra = " defender's ACC drop | defender's KL |" if args.defender else ""
    lines = ["| record | step | channel added | backdoor score | test ACC drop | test ASR % |" + extra,
             "|---|---|---|---|---|---|" + ("---|---|" if args.defender else "")]
    train, summary = {}, []
    for path in args.records:
        record = json.loads(Path(path).read_text())
        choice = record["details"]["choice"]
        steps = choice.get("refine", {}).get("steps", [])
        run = load_run(Path(args.zoo) / f"{args.dataset}-{Path(path).name.split('-seed')[0]}")
        units, clean, triggered, target, base = test_evaluators(run, args.data_dir)
        masks = step_masks(record, units)
        acc, asr = clean.accuracy(masks), triggered.target_rate(masks, target)
        if args.defender:
            defender_acc, defender_kl = defender_view(run, record, units, masks, train, args.data_dir)
        for k in range(len(steps) + 1):
            added = "(the agent's choice)" if k == 0 else f"{steps[k - 1]['unit'][0]} {steps[k - 1]['unit'][1]}"
            score = choice["backdoor_score"] if k == 0 else steps[k - 1]["backdoor_score"]
            lines.append(f"| {Path(path).stem} | {k} | {added} | {score:.4f} | "
                         f"{100 * (base - float(acc[k])):.2f} | {100 * float(asr[k]):.2f} |"
                         + (f" {100 * float(defender_acc[k]):.2f} | {float(defender_kl[k]):.4f} |"
                            if args.defender else ""))
            print(lines[-1], flush=True)
        before = record["before"]
        summary.append((Path(path).stem, [outcome(before, float(acc[k]), float(asr[k]), base)
                                          for k in (0, len(steps))]))
    table = summarize(summary)
    lines += ["", *table]
    print("\n".join(table))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def record_arguments(doc: str) -> argparse.ArgumentParser:
    """The arguments of a script over repair records: the records, where the zoo runs are,
    their dataset, torch threads and the data folder."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("records", nargs="+")
    ap.add_argument("--zoo", default="benchmarks/zoo")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    return ap


def target_met(asr: float, drop: float) -> bool:
    """Issue 5's target: ASR (%) at most 2 at a test ACC drop (points) of at most 2."""
    return asr <= 2 and drop <= 2


def outcome(before: dict, acc: float, asr: float, base_acc: float) -> dict:
    """ASR %, test ACC drop (points) and DER % of one pruning; the record's ``before`` (the
    unpruned model's ACC and ASR in percent, ``metrics.evaluate``) is the reference."""
    from trojanprune import metrics

    drop = 100 * (base_acc - acc)
    der = 100 * metrics.der(before["acc"] / 100, before["acc"] / 100 - drop / 100,
                            before["asr"] / 100, asr)
    return {"asr": 100 * asr, "drop": drop, "der": der, "met": target_met(100 * asr, drop)}


def summarize(summary) -> list[str]:
    """The agent's choice (step 0, i.e. refine_steps=0) against the refined pruning, per record
    and on average; "met": issue 5's target (ASR <= 2% at a drop of at most 2 points)."""
    out = ["| record | agent's choice: ASR % / drop / DER | refined: ASR % / drop / DER |",
           "|---|---|---|"]
    for name, (first, last) in summary:
        out.append(f"| {name} | " + " | ".join(f"{o['asr']:.2f} / {o['drop']:.2f} / {o['der']:.2f}"
                                               + (" (met)" if o["met"] else "") for o in (first, last)) + " |")
    for label, k in (("agent's choice", 0), ("refined", 1)):
        ders = [s[1][k]["der"] for s in summary]
        out.append(f"\n{label}: mean DER {sum(ders) / len(ders):.2f} over {len(ders)} repairs, "
                   f"target met on {sum(s[1][k]['met'] for s in summary)}")
    return out


def test_evaluators(run, data_dir=None):
    """The zoo model's units and its evaluators on the test split, which no defense sees: the
    clean images, and the non-target ones with the true trigger; then the target class and the
    unpruned model's test accuracy."""
    model, attack = run.model.eval(), run.attack()
    x, y = run.test_set(data_dir).tensors()
    units = discover_units(model, x[:1])
    clean = MaskEvaluator(model, units, x, y)
    triggered = MaskEvaluator(model, units, attack.apply(x[y != attack.target]))
    base = float(clean.accuracy(torch.ones(1, units.total))[0])
    return units, clean, triggered, attack.target, base


def refinement_states(record: dict, with_returned: bool) -> list[list[tuple[str, int]]]:
    """The pruned channels after each refinement step k (row 0: the agent's choice), rebuilt
    from the record as the final pruning without the channels that later steps added.

    ``with_returned``: also count as pruned the channels the give-back step returned later (they
    were pruned at these states). False leaves them out, as the replays of stops 30-45 did
    (``step_masks``)."""
    choice = record["details"]["choice"]
    steps = [tuple(s["unit"]) for s in choice.get("refine", {}).get("steps", [])]
    pruned = [tuple(p) for p in record["pruned"]]
    if with_returned:
        pruned += [tuple(r["unit"]) for r in choice.get("give_back", {}).get("returned", [])]
    return [[p for p in pruned if p not in steps[k:]] for k in range(len(steps) + 1)]


def step_masks(record: dict, units) -> torch.Tensor:
    """(steps + 1, units.total) keep masks of :func:`refinement_states` (without the channels
    the give-back step returned)."""
    return torch.stack([units.keep_mask(p) for p in refinement_states(record, with_returned=False)]).float()


def defender_clean(run, record: dict, cache: dict, data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The record's own clean images: the training split drawn as the repair drew it (its
    seed and count); ``cache`` keeps each loaded training split."""
    from trojanprune import data

    ds = run.record["dataset"]
    key = (ds["name"], ds.get("image_size"))
    if key not in cache:
        cache[key] = data.load_dataset(ds["name"], "train", data_dir=data_dir,
                                       image_size=ds.get("image_size"))
    return data.clean_subset(cache[key], n=record["clean_images"], seed=record["seed"]).tensors()


def defender_view(run, record, units, masks, cache, data_dir):
    """Each mask's accuracy drop on the defender's clean images and its mean KL divergence from
    the unpruned model on them and their shifted copies (what a guard could use)."""
    import torch.nn.functional as F

    from trojanprune.defenses.shappruning import mean_kl, shifted_views

    x, y = defender_clean(run, record, cache, data_dir)
    model = run.model.eval()
    guard = MaskEvaluator(model, units, x, y)
    views = MaskEvaluator(model, units, shifted_views(x))
    full = torch.ones(1, units.total)
    drop = guard.accuracy(full)[0] - guard.accuracy(masks)
    reference = F.log_softmax(views.logits(full)[0], -1)
    kl = torch.tensor([mean_kl(reference, views.logits(masks[k:k + 1])[0]) for k in range(len(masks))])
    return drop, kl


if __name__ == "__main__":
    main()
