"""A diagnosis: which measure on the defender's clean images sees the test accuracy that an
ONP pruning costs?

ONP chooses its pruning by top-1 accuracy on the held-out half of its clean images (250 of
500), among hundreds of candidates; the chosen pruning's held-out accuracy then overstates its
test accuracy (stop 30: the winner's curse). A smoother measure moves with every image, not only
with those that flip. For each ONP grid cell and ``--records`` repair, this script rebuilds the
repair's split (``give_back.rebuild``, no probe) and gives, for the unpruned model and the
pruning, on the held-out half, the fit half and all the clean images: top-1 accuracy, the mean
softmax probability of the true class ("soft accuracy"), and the mean KL divergence of the
pruned model's prediction from the unpruned model's; then the same top-1 and soft accuracy on
the test split (which no defense sees).

    TROJANPRUNE_DATA=../shared/datasets python benchmarks/clean_measures.py \\
        benchmarks/results/grid-cifar10-vgg_small --out OUT.jsonl
"""

from __future__ import annotations

import argparse

import torch

from trojanprune.engine import MaskEvaluator
from trojanprune.runs import load_run

from bn_recalibration import pruned_from_report
from bn_shift_gate import add_cell_arguments, emit, onp_cells
from give_back import rebuild
from refine_steps import defender_clean


def measures(model, units, x, y, keep) -> dict:
    """Top-1 accuracy, soft accuracy and KL from the unpruned model, pruned and unpruned."""
    masks = torch.stack([torch.ones_like(keep), keep])
    log_p = MaskEvaluator(model, units, x, y).logits(masks).log_softmax(-1)
    top1 = (log_p.argmax(-1) == y).float().mean(1)
    soft = log_p.gather(-1, y.view(1, -1, 1).expand(2, -1, 1)).squeeze(-1).exp().mean(1)
    kl = (log_p[0].exp() * (log_p[0] - log_p[1])).sum(-1).mean()
    return {"top1": [float(v) for v in top1], "soft": [float(v) for v in soft], "kl": float(kl)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cells = onp_cells(args)
    for cell in cells:
        run = load_run(cell["model_dir"])
        x, y = defender_clean(run, cell, {}, args.data_dir)
        model, _, units, fit, held, _ = rebuild(run, x, y, cell["seed"], cell["options"], probe=False)
        keep = units.keep_mask(cell.get("pruned") or pruned_from_report(cell["report"]))
        tx, ty = run.test_set(args.data_dir).tensors()
        emit({"cell": f"{cell['arch']} {cell['attack']} s{cell['seed']}",
              "held": measures(model, units, held.x, held.y, keep),
              "fit": measures(model, units, fit.x, fit.y, keep),
              "all": measures(model, units, x, y, keep),
              "test": measures(model, units, tx, ty, keep)}, args.out)


if __name__ == "__main__":
    main()
