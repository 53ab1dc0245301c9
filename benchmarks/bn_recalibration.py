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
from trojanprune.engine.masks import apply_masks_permanently
from trojanprune.runs import load_run

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


def recalibrated(model: nn.Module, images: torch.Tensor, which: set[str], batch_size: int = 100) -> nn.Module:
    """A copy whose BatchNorm layers named in ``which`` hold running statistics re-estimated
    on ``images`` (a plain average over the batches); everything else is untouched."""
    model = copy.deepcopy(model).eval()
    norms = [m for n, m in model.named_modules()
             if n in which and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    with torch.no_grad():
        for b in range(0, len(images), batch_size):
            model(images[b:b + batch_size])
    return model.eval()


def shifted(pruned: nn.Module, unpruned: nn.Module, images: torch.Tensor) -> nn.Module:
    """A copy of ``pruned`` whose BatchNorm running statistics move by what the pruning changed
    in each layer's statistics on ``images`` (mean difference, variance ratio)."""
    names = [n for n, m in pruned.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    on_pruned, on_unpruned = (dict(recalibrated(m, images, set(names)).named_modules()) for m in (pruned, unpruned))
    out = copy.deepcopy(pruned).eval()
    with torch.no_grad():
        for n in names:
            m, p, u = out.get_submodule(n), on_pruned[n], on_unpruned[n]
            m.running_mean += p.running_mean - u.running_mean
            m.running_var *= p.running_var / u.running_var.clamp_min(1e-12)
    return out


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
                        "shift": shifted(repaired, model, cx),
                        "unpruned-all": recalibrated(model, cx, set(order))}
            triggered = attack.apply(x[y != attack.target])
            row = []
            for name, m in variants.items():
                acc, asr = accuracy(m, x, y), accuracy(m, triggered, None, attack.target)
                der = 100 * metrics.der(cell["acc_before"] / 100, acc, cell["asr_before"] / 100, asr)
                row.append(f"{100 * acc:.2f} / {100 * asr:.2f} / {der:.2f}")
            label = f"{cell['arch']} {cell['attack']} s{cell['seed']}"
            lines.append(f"| {label} | {cell['clean_images']} | {len(pruned)} | " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
