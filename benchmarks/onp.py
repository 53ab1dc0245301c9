"""ONP on the backdoored model zoo, with the GNN-vs-MLP ablation (and baselines on request).

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/onp.py \
        --zoo benchmarks/zoo --archs vgg_small resnet20 --attacks badnets blended wanet sig \
        --variants gnn mlp --out benchmarks/results/onp-cifar10

For every run directory ``<zoo>/cifar10-<arch>-<attack>/`` (made by ``benchmarks/zoo.py``;
missing ones are skipped with a note) it draws the defender's clean set from the TRAINING split
(``clean_subset(n=500)``, seeded), repairs the model with ONP once per variant, and measures
ACC / ASR / RA on the test split with the run's true trigger (``run.attack()``, used for
evaluation only: ONP never sees it), DER, wall time and evaluations. Variants:

- ``gnn``: ONP as shipped (GCN encoder, warm start from the probe);
- ``mlp``: the same agent with an MLP on node features instead of the graph (the ablation);
- ``gnn-cold`` / ``mlp-cold``: the same without the warm start (``prior=0``), so whatever the
  agent prunes it learned from rewards;
- ``gat``: GAT instead of GCN.

``--baselines anp rnp fp clp shappruning`` adds other registered defenses with their defaults,
side by side. ``--runs DIR ...`` benchmarks explicit run directories instead of the zoo (any
dataset, e.g. a quick MNIST run). ``--set key=value`` passes ONP options to every ONP variant.
Results: a Markdown table on stdout and in ``<out>.md``, one JSON object per repair in
``<out>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

VARIANTS = {
    "gnn": {"encoder": "gnn"},
    "mlp": {"encoder": "mlp"},
    "gnn-cold": {"encoder": "gnn", "prior": 0.0},
    "mlp-cold": {"encoder": "mlp", "prior": 0.0},
    "gat": {"encoder": "gnn", "conv": "gat"},
}


def parse_sets(items):
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="benchmarks/zoo")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--archs", nargs="+", default=["vgg_small", "resnet20"])
    ap.add_argument("--attacks", nargs="+", default=["badnets", "blended", "wanet", "sig"])
    ap.add_argument("--runs", nargs="*", default=None, help="explicit run directories (skip the zoo)")
    ap.add_argument("--variants", nargs="+", default=["gnn", "mlp"], choices=sorted(VARIANTS))
    ap.add_argument("--baselines", nargs="*", default=[], help="other methods, default options")
    ap.add_argument("--clean", type=int, default=500, help="clean images from the training split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", dest="sets", help="ONP option key=value (repeatable)")
    ap.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--reuse-reverse", action="store_true",
                    help="reverse the trigger once per model and reuse it for every ONP variant "
                         "(saves CPU; later variants' seconds and evaluations then exclude it)")
    ap.add_argument("--out", default="benchmarks/results/onp")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    import trojanprune as tp
    from trojanprune import data, metrics
    from trojanprune.repair_run import environment
    from trojanprune.runs import load_run

    if args.runs is not None:
        run_dirs = [Path(r) for r in args.runs]
    else:
        run_dirs = [Path(args.zoo) / f"{args.dataset}-{arch}-{attack}"
                    for arch in args.archs for attack in args.attacks]
    sets = parse_sets(args.sets)
    current = {"run": None}
    if args.reuse_reverse:
        import trojanprune.reverse as reverse

        original, memo = reverse.reverse_triggers, {}

        def reuse(*a, **k):
            key = (current["run"], repr(sorted(k.items())))
            if key not in memo:
                memo[key] = original(*a, **k)
            return memo[key]

        reverse.reverse_triggers = reuse
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = open(f"{out}.jsonl", "w")
    rows, notes = [], []
    train_cache: dict = {}
    for run_dir in run_dirs:
        if not (run_dir / "run.json").exists():
            notes.append(f"skipped {run_dir}: no run (make it with benchmarks/zoo.py)")
            print(notes[-1], file=sys.stderr)
            continue
        run = load_run(run_dir)
        current["run"] = str(run_dir)
        model = run.model.to(args.device).eval()
        attack = run.attack()
        ds = run.record["dataset"]
        key = (ds["name"], ds.get("image_size"))
        if key not in train_cache:
            train_cache[key] = data.load_dataset(ds["name"], "train", data_dir=args.data_dir,
                                                 image_size=ds.get("image_size"))
        clean = data.clean_subset(train_cache[key], n=args.clean, seed=args.seed)
        test = run.test_set(args.data_dir)
        if args.test_limit:
            test = test.subset(range(min(args.test_limit, len(test))))
        before = metrics.evaluate(model, test, attack)
        arch = run.record["model"].get("arch") or "user"
        attack_name = run.record["attack"]["name"] if run.record.get("attack") else "clean"
        jobs = [(f"onp/{v}", "onp", {**VARIANTS[v], **sets}) for v in args.variants]
        jobs += [(m, m, {}) for m in args.baselines]
        for label, method, options in jobs:
            if method not in tp.defenses.available():
                notes.append(f"{label}: method {method!r} not available; skipped")
                print(notes[-1], file=sys.stderr)
                continue
            start = time.perf_counter()
            result = tp.repair(model, clean, method=method, seed=args.seed, device=args.device,
                               progress=args.progress, **options)
            seconds = time.perf_counter() - start
            after = metrics.evaluate(result.model, test, attack)
            der = 100 * metrics.der(before["acc"] / 100, after["acc"] / 100, before["asr"] / 100,
                                    after["asr"] / 100) if attack is not None else float("nan")
            true_target = getattr(attack, "target", None)
            row = {"run": str(run_dir), "arch": arch, "attack": attack_name, "method": label,
                   "options": options, "before": before, "after": after, "der": der,
                   "seconds": seconds, "evaluations": result.evaluations,
                   "pruned": len(result.pruned), "units": result.total_units,
                   "probe_target": result.target, "true_target": true_target,
                   "environment": environment(args.device)}
            if method == "onp":
                d = result.details
                row["choice"] = d["choice"]
                row["reward_curve"] = d["reward_curve"]
            rows.append(row)
            jsonl.write(json.dumps(row) + "\n")
            jsonl.flush()
            print(f"{run_dir.name} {label}: ACC {before['acc']:.2f}->{after['acc']:.2f} ASR "
                  f"{before.get('asr', float('nan')):.2f}->{after.get('asr', float('nan')):.2f} DER "
                  f"{der:.2f} pruned {len(result.pruned)} {seconds:.0f}s evals {result.evaluations}",
                  file=sys.stderr, flush=True)
    jsonl.close()
    table = render(rows, args, notes)
    Path(f"{out}.md").write_text(table)
    print(table)


def render(rows, args, notes) -> str:
    header = (f"ONP benchmark: {args.clean} clean images (training split), seed {args.seed}, "
              f"device {args.device}, torch threads {torch.get_num_threads()}, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n\n")
    lines = ["| model | attack | method | ACC before | ACC after | ASR before | ASR after | RA after "
             "| DER % | pruned / units | target (probe/true) | seconds | evaluations |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['arch']} | {r['attack']} | {r['method']} | {b['acc']:.2f} | {a['acc']:.2f} | "
                     f"{b.get('asr', float('nan')):.2f} | {a.get('asr', float('nan')):.2f} | "
                     f"{a.get('ra', float('nan')):.2f} | {r['der']:.2f} | {r['pruned']} / {r['units']} | "
                     f"{r['probe_target']}/{r['true_target']} | {r['seconds']:.0f} | {r['evaluations']} |")
    means = {}
    for r in rows:
        means.setdefault(r["method"], []).append(r["der"])
    summary = ["", "| method | mean DER % | repairs |", "|---|---|---|"]
    summary += [f"| {m} | {sum(v) / len(v):.2f} | {len(v)} |" for m, v in means.items()]
    if args.reuse_reverse:
        notes = [*notes, "--reuse-reverse: the trigger was reversed once per model; the first ONP "
                         "variant's seconds include it, the others' do not"]
    tail = ["", *[f"- {n}" for n in notes]] if notes else []
    return header + "\n".join(lines + summary + tail) + "\n"


if __name__ == "__main__":
    main()
