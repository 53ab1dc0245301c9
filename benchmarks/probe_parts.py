"""A diagnosis, not a defense: how each of ONP's stand-in triggers scores given prunings.

ONP's default probe (``suspects``) scores a pruning by the mean of its suspects' stand-in
trigger scores (pixel-space reverse, feature-space reverses at two layers). This script builds
that probe exactly as a repair with ``--clean 500 --seed S`` does (same clean draw, same split),
then prints for each named pruning: its held-out accuracy, each suspect's score, and, what no
defense may see, the TRUE trigger's attack success on 1,000 triggered test images. It also
scores every feature-space trigger with the trigger written AFTER the pruning mask of its own
layer (``MaskEvaluator.edited_logits(after_mask=True)``), so that pruning the channels it is
written into does not disable it: the two columns together show whether a pruning disables a
feature trigger by reaching the backdoor or only by deleting the written-in channels.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/probe_parts.py \\
        benchmarks/zoo/cifar10-resnet20-badnets --seed 1 \\
        --prunings benchmarks/results/probe-parts/resnet20-badnets-prunings.json \\
        --out benchmarks/results/probe-parts/resnet20-badnets-seed1.txt

``--prunings``: a JSON object {name: [[group, channel], ...]} (e.g. the ``pruned`` list of
``trojanprune repair --json`` records). Cost: the probe's three reverses (~3 min on one
thread for resnet20), then one batched evaluation per pruning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from trojanprune.cli import parse_settings
from trojanprune.defenses.onp import ONP
from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.onp.probes import create_probe
from trojanprune.repair import to_clean_data
from trojanprune.repair_run import choose_clean
from trojanprune.runs import load_run
from trojanprune.sources import open_model


def setup(run_dir: str, seed: int, clean_images: int, settings: list[str], data_dir=None):
    """What a repair with ``--clean N --seed S`` (and ``--set`` ``settings``) builds before its
    agent: the model, its units, ONP's options, the fit / held-out split and the probe; plus,
    for the diagnosis only, evaluators of the held-out accuracy and of the TRUE trigger's
    success on 1,000 triggered test images not of the target class."""
    source = open_model(run_dir)
    model = source.model.eval()
    clean = to_clean_data(choose_clean(source, clean=clean_images, per_class=None, data_free=False,
                                       seed=seed, data_dir=data_dir),
                          int(source.dataset["num_classes"]), "cpu")
    onp = ONP(seed=seed, device="cpu", progress=False, **parse_settings(settings))
    fit, held = onp._split(clean)
    units = discover_units(model, clean.x[:1])
    probe = create_probe(onp.options.probe, model, units, fit, held, onp.options, seed=seed)
    run = load_run(run_dir)
    attack = run.attack()
    x, y = run.test_set(data_dir).tensors()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    triggered = MaskEvaluator(model, units, attack.apply(x[order[y[order] != attack.target][:1000]]))
    return SimpleNamespace(model=model, units=units, options=onp.options, held=held, probe=probe,
                           attack=attack, triggered=triggered,
                           held_acc=MaskEvaluator(model, units, held.x, held.y))


def write_lines(lines: list[str], out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run directory (its attack record gives the true trigger)")
    ap.add_argument("--seed", type=int, default=0, help="the repair's seed (clean draw and split)")
    ap.add_argument("--clean", type=int, default=500, help="clean images, as the repair's --clean")
    ap.add_argument("--prunings", required=True, help="JSON file {name: [[group, channel], ...]}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an ONP option for the probe (as the CLI's --set), repeatable")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="also write the lines to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    s = setup(args.run, args.seed, args.clean, args.set, args.data_dir)
    parts = getattr(s.probe, "parts", [s.probe])
    names = [f"{p.name}:class{p.target}" + (f"@{p.features.layer}" if hasattr(p, "features") else "")
             for p in parts]
    lines = [f"{args.run} seed={args.seed} clean={args.clean} held-out={len(s.held)} "
             f"suspects: {', '.join(names)}",
             "columns: pruned, held-out accuracy, true ASR, each suspect's score (feature "
             "triggers: written before / after their layer's mask)"]
    print("\n".join(lines), flush=True)
    for label, pruned in json.loads(Path(args.prunings).read_text()).items():
        keep = s.units.keep_mask([tuple(p) for p in pruned])[None].float()
        scores = []
        for part in parts:
            before = float(part.score(keep)[0])
            if hasattr(part, "features"):
                f = part.features
                after = float(part._margin_score(part._score_ev.edited_logits(
                    keep, f.module, part._edit, grad=False, after_mask=True))[0])
                scores.append(f"{before:.3f}/{after:.3f}")
            else:
                scores.append(f"{before:.3f}")
        lines.append(f"{label}: pruned={len(pruned)} held_acc={float(s.held_acc.accuracy(keep)[0]):.4f} "
                     f"true_asr={float(s.triggered.target_rate(keep, s.attack.target)[0]):.4f} "
                     f"parts=[{', '.join(scores)}]")
        print(lines[-1], flush=True)
    write_lines(lines, args.out)


if __name__ == "__main__":
    main()
