"""A diagnosis: does re-estimating BatchNorm statistics on the defender's clean images give
back the accuracy a pruning cost?

Pruning a channel changes what every later layer sees, but the later BatchNorm layers still
normalize with the running statistics of the unpruned training run. This script takes the
prunings that grid cells chose (parsed from their HTML reports: "What was pruned, per layer"),
and measures on the zoo model's test split (the true trigger only for the ASR column, which
no defense sees):

- ``pruned``: the pruning as the defense returned it;
- ``all``: every BatchNorm layer's running statistics re-estimated on the defender's clean
  images (the same images the repair drew: ``clean_subset`` with the cell's seed and size);
- ``after``: only the BatchNorm layers executed after the first pruned channel;
- ``shift``: the running statistics moved only by what the pruning changed on the clean
  images: mean + (pruned model's clean mean - unpruned model's clean mean), variance times
  their ratio. Why: the zoo models' running statistics were estimated on poisoned training
  data, so a plain re-estimate on clean images also changes how the backdoor's channels are
  normalized, with or without pruning; ``unpruned-all`` (the unpruned model re-estimated on the
  clean images) shows that part alone.

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/bn_recalibration.py \\
        benchmarks/results/grid-cifar10-vgg_small --defense onp --out OUT.md
"""

from __future__ import annotations

import argparse
import copy
import html
import json
import re
from pathlib import Path

import torch
from torch import nn

from trojanprune import data, metrics
from trojanprune.engine import discover_units
from trojanprune.engine.batchnorm import (clean_statistics, load_statistics, pruning_shift,
                                          statistics_swapped)
from trojanprune.engine.masks import apply_masks_permanently
from trojanprune.runs import load_run

BATCH = 100  # images per BatchNorm statistics batch (the cumulative average weighs batches equally)
ROW = re.compile(r'<tr><td><code>([^<]+)</code></td><td class="num">\d+</td>'
                 r'<td class="num">\d+</td><td>(.*?)</td></tr>')


def pruned_from_report(path: Path) -> list[tuple[str, int]]:
    text = Path(path).read_text()
    section = text.split("What was pruned, per layer", 1)[1].split("</table>", 1)[0]
    pruned = []
    for group, cells in ROW.findall(section):
        if "..." in cells or "&hellip;" in cells:
            raise SystemExit(f"{path}: the report lists {group}'s channels only in part")
        pruned += [(html.unescape(group), int(c)) for c in re.findall(r"\d+", re.sub(r"<[^>]+>", " ", cells))]
    return pruned


def batchnorms_in_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Every module's name in the order a forward pass first runs it."""
    order, names = [], {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(names[m]) if names[m] not in order else None)
             for m in model.modules() if m is not model]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return order


def recalibrated(model: nn.Module, images: torch.Tensor, which: set[str]) -> nn.Module:
    """A copy whose BatchNorm layers named in ``which`` hold running statistics re-estimated
    on ``images``; everything else is untouched."""
    out = copy.deepcopy(model).eval()
    load_statistics(out, clean_statistics(model, images, batch_size=BATCH, layers=which))
    return out


def shifted(model: nn.Module, units, pruned, images: torch.Tensor) -> nn.Module:
    """The pruning applied to a copy whose statistics moved by what it changed on ``images``."""
    with statistics_swapped(model, pruning_shift(model, units, pruned, images, batch_size=BATCH)):
        return apply_masks_permanently(model, units, pruned)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, target: int | None = None) -> float:
    hits = 0
    with torch.no_grad():
        for b in range(0, len(x), 500):
            pred = model(x[b:b + 500]).argmax(-1)
            hits += int((pred == (y[b:b + 500] if y is not None else target)).sum())
    return hits / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grids", nargs="+", help="grid output folders (results.jsonl and reports/)")
    ap.add_argument("--defense", default="onp")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["| cell | clean images | pruned | pruned: ACC / ASR / DER | all BN: ACC / ASR / DER "
             "| BN after the pruning | shift only | unpruned, all BN |", "|---|---|---|---|---|---|---|---|"]
    train = {}
    for grid in args.grids:
        for line in Path(grid, "results.jsonl").read_text().splitlines():
            cell = json.loads(line)
            if cell.get("defense") != args.defense or cell["status"] != "ok":
                continue
            pruned = pruned_from_report(cell["report"])
            label = f"{cell['arch']} {cell['attack']} s{cell['seed']}"
            if not pruned:
                lines.append(f"| {label} | {cell['clean_images']} | 0 | (nothing pruned) |")
                print(lines[-1], flush=True)
                continue
            run = load_run(cell["model_dir"])
            model, attack = run.model.eval(), run.attack()
            x, y = run.test_set(args.data_dir).tensors()
            units = discover_units(model, x[:1])
            repaired = apply_masks_permanently(model, units, pruned)
            ds = run.record["dataset"]
            key = (ds["name"], ds.get("image_size"))
            if key not in train:
                train[key] = data.load_dataset(ds["name"], "train", data_dir=args.data_dir,
                                               image_size=ds.get("image_size"))
            per_class = cell.get("clean_setting", {}).get("per_class")
            clean = (data.clean_subset(train[key], per_class=per_class, seed=cell["seed"]) if per_class
                     else data.clean_subset(train[key], n=cell["clean_images"], seed=cell["seed"]))
            cx, _ = clean.tensors()
            order = batchnorms_in_order(repaired, cx[:2])
            pruned_modules = {p for g, _ in pruned for p in units[g].mask_points}
            first = min(order.index(m) for m in pruned_modules)
            variants = {"pruned": repaired,
                        "all": recalibrated(repaired, cx, set(order)),
                        "after": recalibrated(repaired, cx, set(order[first + 1:])),
                        "shift": shifted(model, units, pruned, cx),
                        "unpruned-all": recalibrated(model, cx, set(order))}
            triggered = attack.apply(x[y != attack.target])
            row = []
            for name, m in variants.items():
                acc, asr = accuracy(m, x, y), accuracy(m, triggered, None, attack.target)
                der = 100 * metrics.der(cell["acc_before"] / 100, acc, cell["asr_before"] / 100, asr)
                row.append(f"{100 * acc:.2f} / {100 * asr:.2f} / {der:.2f}")
            lines.append(f"| {label} | {cell['clean_images']} | {len(pruned)} | " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
