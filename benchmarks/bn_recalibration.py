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
from trojanprune.bench.config import CleanSetting
from trojanprune.bench.grid import clean_for_cell
from trojanprune.engine import discover_units
from trojanprune.engine.batchnorm import (clean_statistics, load_statistics, pruning_shift,
                                          statistics_swapped)
from trojanprune.engine.masks import apply_masks_permanently
from trojanprune.sources import open_model

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


def modules_in_order(model: nn.Module, x: torch.Tensor) -> list[str]:
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
            source = open_model(cell["model_dir"])
            model, ds = source.model.eval(), source.dataset
            test = data.load_dataset(ds["name"], "test", data_dir=args.data_dir, image_size=ds.get("image_size"))
            units = discover_units(model, test.tensors()[0][:1])
            repaired = apply_masks_permanently(model, units, pruned)
            # the defender's clean images, drawn as the grid drew them for this cell
            cx, _ = clean_for_cell(source, CleanSetting(**cell["clean_setting"]), cell["seed"],
                                   args.data_dir).tensors()
            order = modules_in_order(repaired, cx[:2])
            pruned_modules = {p for g, _ in pruned for p in units[g].mask_points}
            first = min(order.index(m) for m in pruned_modules)
            variants = {"pruned": repaired,
                        "all": recalibrated(repaired, cx, set(order)),
                        "after": recalibrated(repaired, cx, set(order[first + 1:])),
                        "shift": shifted(model, units, pruned, cx),
                        "unpruned-all": recalibrated(model, cx, set(order))}
            row = []
            for m in variants.values():
                after = metrics.evaluate(m, test, source.attack)
                der = 100 * metrics.der(cell["acc_before"] / 100, after["acc"] / 100,
                                        cell["asr_before"] / 100, after["asr"] / 100)
                row.append(f"{after['acc']:.2f} / {after['asr']:.2f} / {der:.2f}")
            lines.append(f"| {label} | {cell['clean_images']} | {len(pruned)} | " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
