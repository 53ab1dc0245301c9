"""FT: plain fine-tuning on the defender's clean images, the reference every pruning defense is
compared with (it prunes nothing).

Fine-tuning as a backdoor defense is the baseline of Liu, Dolan-Gavitt and Garg, "Fine-Pruning"
(RAID 2018) and of BackdoorBench (Wu et al., NeurIPS 2022 Datasets and Benchmarks). No paper
fixes a recipe for a 500-image clean set, so the defaults are ours, in BackdoorBench's style:
SGD, lr 0.01, momentum 0.9, weight decay 5e-4, cosine schedule, batch 64 (instead of 128: 500
images give ~8 steps per epoch), 20 epochs (~160 steps), random-crop augmentation with 4 pixels
of zero padding (no flips by default: they change the meaning of digits and traffic signs; use
``augment="crop+flip"`` for CIFAR-like data).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from . import register
from .base import CleanData, Defense, RepairResult
from .finetune import check_finetune_options, finetune


@dataclass
class Options:
    """FT options (all ours; BackdoorBench-like, sized for ~500 clean images).

    epochs: passes over the clean set (20).
    lr: initial SGD learning rate, cosine-annealed to 0 (0.01).
    momentum: SGD momentum (0.9).
    weight_decay: SGD weight decay (5e-4).
    batch_size: images per step (64).
    augment: "none", "crop" (random crop after 4-pixel zero padding) or "crop+flip" ("crop").
    batchnorm: "update" (BatchNorm in training mode, running statistics re-estimated on the
        clean images, as BackdoorBench's fine-tuning; the default) or "keep" (BatchNorm in eval
        mode, running statistics unchanged).
    """

    epochs: int = 20
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    augment: str = "crop"
    batchnorm: str = "update"

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        check_finetune_options(self)


@register
class FineTuning(Defense):
    name = "ft"
    Options = Options
    needs_data = True
    min_images = 10
    summary = "Fine-tuning on the clean images (reference; prunes nothing)"

    def run(self, model: nn.Module, clean: CleanData | None) -> RepairResult:
        o = self.options
        stats = finetune(model, clean, epochs=o.epochs, lr=o.lr, batch_size=o.batch_size,
                         seed=self.seed, weight_decay=o.weight_decay, momentum=o.momentum,
                         progress=self.progress, augment=o.augment, batchnorm=o.batchnorm)
        return RepairResult(model=model, method=self.name, pruned=[], evaluations=o.epochs,
                            details={"finetune": stats, "clean_images": len(clean)})
