"""A replay: does fine-tuning ONP's pruned model on the defender's clean images give back the
accuracy the pruning cost, without giving back the backdoor?

For each ONP grid cell (its pruning parsed from the cell's HTML report) and each ONP repair
record given with ``--records``, this script applies the pruning to the zoo model and fine-tunes
the pruned model through its masks (pruned channels stay at zero) on the same clean images the
repair drew, with Fine-Pruning's fine-tuning settings (``trojanprune.defenses.fp``: 10 epochs,
SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 64, random crop), in two ways:

- ``keep``: BatchNorm layers in eval mode, their running statistics as the pruning left them
  (stop 36: every pruning repair here leans on them);
- ``update``: BatchNorm in training mode, as FP's and FT's fine-tuning (statistics re-estimated
  on the clean images).

It gives ACC / ASR / DER on the test split with the true trigger (which no defense sees).

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/prune_finetune.py \\
        benchmarks/results/grid-cifar10-vgg_small --out OUT.jsonl
"""

from __future__ import annotations

import argparse
import copy

import torch

from trojanprune.defenses.base import CleanData
from trojanprune.defenses.finetune import finetune
from trojanprune.defenses.fp import Options as FPOptions
from trojanprune.engine import ChannelMasks, apply_masks_permanently, discover_units
from trojanprune.runs import load_run

from bn_recalibration import pruned_from_report
from bn_shift_gate import add_cell_arguments, emit, onp_cells, test_figures
from refine_steps import defender_clean

VARIANTS = ("keep", "update")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(ap)
    ap.add_argument("--only", nargs="*", default=None, help="attacks to replay (default: all)")
    ap.add_argument("--epochs", type=int, default=FPOptions.finetune_epochs)
    ap.add_argument("--lr", type=float, default=FPOptions.lr)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for cell in onp_cells(args):
        if args.only and cell["attack"] not in args.only:
            continue
        emit(replay(cell, args.epochs, args.lr, args.data_dir), args.out)


def replay(cell: dict, epochs: int, lr: float, data_dir) -> dict:
    run = load_run(cell["model_dir"])
    model = run.model.float().eval()
    x, y = defender_clean(run, cell, {}, data_dir)
    clean = CleanData(x, y, int(run.record["dataset"].get("num_classes", 10)))
    units = discover_units(model, x[:1])
    pruned = cell.get("pruned") or pruned_from_report(cell["report"])
    test_set, attack = run.test_set(data_dir), run.attack()
    fp = FPOptions()
    test = {"pruned": test_figures(cell, apply_masks_permanently(model, units, pruned), test_set, attack)}
    stats = {}
    for variant in VARIANTS:
        tuned = copy.deepcopy(model)
        with ChannelMasks(tuned, units, units.split(units.keep_mask(pruned))) as masks:
            stats[variant] = finetune(tuned, clean, epochs=epochs, lr=lr, batch_size=fp.batch_size,
                                      seed=cell["seed"], masks=masks, weight_decay=fp.weight_decay,
                                      momentum=fp.momentum, augment=fp.augment, batchnorm=variant)
            test[variant] = test_figures(cell, tuned, test_set, attack)
    return {"cell": f"{cell['arch']} {cell['attack']} s{cell['seed']}", "pruned": len(pruned),
            "epochs": epochs, "lr": lr, "test": test,
            "train": {v: {"final_loss": s["final_loss"], "final_train_acc": s["final_train_acc"],
                          "seconds": round(s["seconds"], 1)} for v, s in stats.items()},
            "before": {"acc": cell["acc_before"], "asr": cell["asr_before"]}}


if __name__ == "__main__":
    main()
