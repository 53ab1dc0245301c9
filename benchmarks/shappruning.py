"""ShapPruning on the backdoored model zoo: few-shot (1 image per class) and data-free repairs,
and the ablation of the Shapley-estimation accelerations.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/shappruning.py \
        --zoo benchmarks/zoo --out benchmarks/results/shappruning-cifar10.md

For every run directory ``<zoo>/<dataset>-<arch>-<attack>`` (or those named with ``--runs``):

1. few-shot: ``trojanprune.repair(model, clean, method="shappruning")`` with one clean image per
   class drawn from the TRAINING split (``clean_subset(per_class=1)``), seed 0 (``--seed``: the
   defense's seed and the draw of the images);
2. data-free: the same with ``clean=None`` (images synthesized from the model);
3. ablation: on the few-shot repair's reversed trigger (the result's ``trigger_mask`` and
   ``trigger_pattern``), the Shapley estimation again with (a) plain permutation sampling,
   (b) + truncation, (c) + discarding threshold, (d) + epsilon-greedy (= the default). For each:
   coalitions evaluated, seconds, overlap of its top channels with plain sampling's, and the
   test ACC/ASR after pruning its top-N channels (N = what the few-shot repair pruned);
4. curve (a diagnosis, like ``anp_curve.py``): the few-shot repair's Shapley ranking judged on
   the test split -- test ACC/ASR after pruning its top 1, 2, ... channels, whatever the budget
   and the stopping rule would choose: is a failure the ranking's or the stopping point's?
5. walk (a diagnosis): each step of the repair's mitigation walk judged on the test split, with
   what the clean guard saw and the KL that the optional ``kl_tolerance`` guard reads.

ACC/ASR/RA/DER use the run's true trigger (``run.attack()``) on its test split, for evaluation
only; the defense never sees them. Prints a Markdown report and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import trojanprune as tp
from trojanprune import data, metrics
from trojanprune.defenses.shappruning import backdoor_value_fn, mean_kl, shifted_views
from trojanprune.engine import MaskEvaluator, apply_masks_permanently, discover_units
from trojanprune.runs import load_run
from trojanprune.shapley import estimate_shapley
from trojanprune.utils import derive_seed

VARIANTS = {  # name -> estimate_shapley keyword arguments (on top of the defaults)
    "plain": dict(truncation_tol=0.0, discard=None, epsilon=None),
    "+truncation": dict(discard=None, epsilon=None),
    "+discard": dict(epsilon=None),
    "+greedy (default)": dict(),
    "+greedy, ucb rank": dict(greedy_rank="ucb"),
}


def fmt_metrics(m: dict) -> str:
    return f"{m['acc']:.2f} | {m['asr']:.2f} | {m.get('ra', float('nan')):.2f}"


def der(before: dict, after: dict) -> float:
    return 100 * metrics.der(before["acc"] / 100, after["acc"] / 100, before["asr"] / 100,
                             after["asr"] / 100)


def repair_row(name: str, mode: str, model, clean, test, attack, before, options, device,
               seed: int = 0) -> tuple[str, object]:
    start = time.perf_counter()
    result = tp.repair(model, clean, method="shappruning", seed=seed, device=device, **options)
    seconds = time.perf_counter() - start
    after = metrics.evaluate(result.model.cpu(), test, attack)
    d = result.details
    shap = d.get("shapley", {})
    row = (f"| {name} | {mode} | {result.verdict} | {result.target} | {fmt_metrics(before)} | "
           f"{fmt_metrics(after)} | {der(before, after):.2f} | {len(result.pruned)} | {seconds:.1f} | "
           f"{result.evaluations} | {shap.get('evaluations', '-')} | {shap.get('evaluations_plain', '-')} |")
    print(row, flush=True)
    print(f"    stages (s): {d.get('seconds')}; mitigation: {d.get('mitigation', {}).get('reason')}",
          flush=True)
    if "data" in d and d["data"].get("mode") == "data-free":
        print(f"    synthesized: {d['data']}", flush=True)
    if d.get("mitigation", {}).get("pruned_after_recheck"):
        # recheck=0 would have stopped after the first walk (same seeds, same channels): the
        # model it would have returned, judged the same way
        first = result.pruned[:d["mitigation"]["pruned"]]
        units = discover_units(model, test[0][0].unsqueeze(0).to(next(model.parameters()).device))
        alone = metrics.evaluate(apply_masks_permanently(model, units, first).cpu(), test, attack)
        print(f"    without the recheck ({len(first)} channels): {fmt_metrics(alone)}, DER "
              f"{der(before, alone):.2f}; recheck: {d['recheck']}", flush=True)
    return row, result


def ablation_rows(name: str, model, clean, result, test, attack, options, device,
                  seed: int = 0) -> list[str]:
    """The accelerations, one at a time, on the few-shot repair's reversed trigger."""
    if "shapley" not in result.details:
        return [f"| {name} | (no backdoor detected: no Shapley estimation) |"]
    x, y = clean.tensors()
    x, y = x.to(device), y.to(device)
    target = result.target if result.target is not None else result.details["trigger"]["class"]
    mask = result.images["trigger_mask"].to(device)
    pattern = result.images["trigger_pattern"].to(device)
    stamped = (1 - mask) * x[y != target] + mask * pattern
    model = model.to(device).eval()
    units = discover_units(model, x[:1])
    layers = result.details["shapley"]["layers"]
    units = units.select(layers)
    top_k = result.details["shapley"]["top_k"]
    n_prune = max(1, len(result.pruned))
    rows, rankings = [], {}
    for variant, kwargs in VARIANTS.items():
        ev = MaskEvaluator(model, units, stamped)
        fn = backdoor_value_fn(ev, target, options.get("value", "margin"))
        kw = dict(permutations=int(options.get("permutations", 100)), warmup=int(options.get("warmup", 10)),
                  top_k=top_k, seed=derive_seed(seed, "shapley"))
        kw.update(kwargs)
        start = time.perf_counter()
        est = estimate_shapley(fn, units.total, **kw)
        seconds = time.perf_counter() - start
        ranking = est.ranking()[:n_prune].tolist()
        rankings[variant] = ranking
        overlap = len(set(ranking) & set(rankings["plain"])) / n_prune
        pruned = apply_masks_permanently(model, units, [units.unit_of(i) for i in ranking])
        after = metrics.evaluate(pruned.cpu(), test, attack)
        row = (f"| {name} | {variant} | {est.evaluations} | {est.evaluations_plain} | {seconds:.1f} | "
               f"{est.truncated} | {int(est.active.sum())}/{units.total} | {overlap:.2f} | "
               f"{n_prune} | {after['acc']:.2f} | {after['asr']:.2f} |")
        print(row, flush=True)
        rows.append(row)
    return rows


def walk_rows(name: str, model, clean, result, test, attack) -> list[str]:
    """Each step of the repair's mitigation walk judged on the test split (a diagnosis): the
    channels kept so far plus the step's candidate pruned, with what the clean guard saw on the
    few images and the mean KL of the predictions on them and their shifted copies (what the
    optional ``kl_tolerance`` guard reads)."""
    if "shapley" not in result.details:
        return [f"| {name} | (no backdoor detected: no walk) |"]
    x, _ = clean.tensors()
    units = discover_units(model, x[:1]).select(result.details["shapley"]["layers"])
    fidelity = MaskEvaluator(model, units, shifted_views(x))
    reference = F.log_softmax(fidelity.logits(torch.ones(1, units.total))[0], -1)
    rows, kept = [], []
    for step in result.details["mitigation"]["walk"]:
        trial = kept + [step["unit"]]
        mask = torch.ones(1, units.total)
        mask[0, trial] = 0
        kl = mean_kl(reference, fidelity.logits(mask)[0])
        after = metrics.evaluate(apply_masks_permanently(model, units, [units.unit_of(i) for i in trial]),
                                 test, attack)
        layer, channel = units.unit_of(step["unit"])
        row = (f"| {name} | {len(trial)} | {layer}:{channel} | {'kept' if step['kept'] else 'vetoed'} | "
               f"{step['clean_acc']:.2f} | {step['clean_margin']:.3f} | {kl:.4f} | "
               f"{step['trigger_rate']:.3f} | {step['trigger_lift']:.3f} | {after['acc']:.2f} | {after['asr']:.2f} |")
        print(row, flush=True)
        rows.append(row)
        if step["kept"]:
            kept.append(step["unit"])
    return rows


CURVE_COUNTS = list(range(1, 16)) + [20, 25, 30]


def curve_rows(name: str, model, result, test, attack) -> list[str]:
    """Test ACC/ASR after pruning the top-N channels of the repair's Shapley ranking."""
    if "shapley" not in result.details:
        return [f"| {name} | (no backdoor detected: no Shapley estimation) |"]
    shap = result.details["shapley"]
    x0 = test.tensors()[0][:1]
    units = discover_units(model, x0).select(shap["layers"])
    values = units.join({k: torch.as_tensor(v) for k, v in shap["values"].items()})
    ranking = torch.argsort(values, descending=True, stable=True).tolist()
    rows = []
    for n in [k for k in CURVE_COUNTS if k <= units.total]:
        pruned_units = [units.unit_of(i) for i in ranking[:n]]
        after = metrics.evaluate(apply_masks_permanently(model, units, pruned_units), test, attack)
        layer, channel = pruned_units[-1]
        # the repair's channels are the top N only when the clean guard vetoed none of them
        same = {tuple(u) for u in result.pruned} == {tuple(u) for u in pruned_units}
        row = (f"| {name} | {n} | {layer}:{channel} | {float(values[ranking[n - 1]]):.4f} | "
               f"{after['acc']:.2f} | {after['asr']:.2f} | {'<- repair' if same else ''} |")
        print(row, flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="benchmarks/zoo")
    ap.add_argument("--runs", nargs="*", help="run directory names (default: every run in --zoo)")
    ap.add_argument("--data-dir", default=None, help="dataset root (default: TROJANPRUNE_DATA)")
    ap.add_argument("--per-class", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["few-shot", "data-free", "ablation"],
                    choices=["few-shot", "data-free", "ablation", "curve", "walk"])
    ap.add_argument("--set", nargs="*", default=[], help="defense option key=value")
    ap.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (0: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0,
                    help="the defense's seed and the draw of the clean images (model unchanged)")
    ap.add_argument("--out", default="benchmarks/results/shappruning.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    options = {}
    for item in args.set:
        key, _, value = item.partition("=")
        options[key] = value
    zoo = Path(args.zoo)
    runs = args.runs or sorted(p.name for p in zoo.iterdir() if (p / "run.json").exists())
    if not runs:
        raise SystemExit(f"no run directories in {zoo}; train the zoo first (benchmarks/zoo.py)")

    repairs, ablation, curve, walk = [], [], [], []
    for name in runs:
        run = load_run(zoo / name if (zoo / name).exists() else name)
        attack = run.attack()
        test = run.test_set(args.data_dir)
        if args.test_limit:
            test = test.subset(range(min(args.test_limit, len(test))))
        ds = run.record["dataset"]
        train = data.load_dataset(ds["name"], "train", data_dir=args.data_dir,
                                  image_size=ds.get("image_size"))
        clean = data.clean_subset(train, per_class=args.per_class, seed=args.seed)
        before = metrics.evaluate(run.model, test, attack)
        label = Path(name).name
        print(f"## {label}: before {before}", flush=True)
        few_result = None
        if {"few-shot", "ablation", "curve", "walk"} & set(args.modes):
            row, few_result = repair_row(label, f"{args.per_class}/class", run.model, clean, test,
                                         attack, before, options, args.device, args.seed)
            repairs.append(row)
        if "data-free" in args.modes:
            shape = ",".join(str(s) for s in ds["image_shape"])
            row, _ = repair_row(label, "data-free", run.model, None, test, attack, before,
                                {"input_shape": shape, **options}, args.device, args.seed)
            repairs.append(row)
        if "ablation" in args.modes and few_result is not None:
            ablation += ablation_rows(label, run.model, clean, few_result, test, attack, options,
                                      args.device, args.seed)
        if "curve" in args.modes and few_result is not None:
            curve += curve_rows(label, run.model, few_result, test, attack)
        if "walk" in args.modes and few_result is not None:
            walk += walk_rows(label, run.model, clean, few_result, test, attack)

    header = (f"ShapPruning, seed {args.seed}, {args.per_class} clean image(s) per class from the training "
              f"split (data-free: none), options {options or 'default'}; {platform.machine()}, "
              f"{os.cpu_count()} cores, {args.threads} torch threads, device {args.device}\n\n")
    table = ("| model | data | verdict | target | ACC before | ASR before | RA before | ACC | ASR | RA | "
             "DER | pruned | seconds | evaluations | Shapley evaluations | plain-sampling "
             "evaluations |\n" + "|---" * 16 + "|\n" + "\n".join(repairs))
    report = header + table + "\n"
    if ablation:
        report += ("\nAcceleration ablation (same reversed trigger, same permutations; top-N "
                   "channels pruned, N = the few-shot repair's count):\n\n"
                   "| model | estimator | evaluations | plain evaluations | seconds | truncated "
                   "permutations | active at end | top-N overlap with plain | N | ACC | ASR |\n"
                   + "|---" * 11 + "|\n" + "\n".join(ablation) + "\n")
    if curve:
        report += ("\nThe few-shot repair's Shapley ranking judged on the test split (a diagnosis: "
                   "top-N channels pruned, whatever the budget and stopping rule choose):\n\n"
                   "| model | N | N-th channel | its Shapley value | ACC | ASR | |\n"
                   + "|---" * 7 + "|\n" + "\n".join(curve) + "\n")
    if walk:
        report += ("\nThe few-shot repair's mitigation walk judged on the test split (a diagnosis: "
                   "at each step the channels kept so far plus the step's candidate pruned; clean "
                   "ACC and margin on the few images, as the guard saw them; KL: mean KL divergence "
                   "of the predictions on the few images and 8 shifted copies of each from the "
                   "unpruned model's):\n\n"
                   "| model | n | candidate | guard | few-image ACC | margin | KL | trigger rate | "
                   "lift | test ACC | test ASR |\n" + "|---" * 11 + "|\n" + "\n".join(walk) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print("\n" + report)


if __name__ == "__main__":
    main()
