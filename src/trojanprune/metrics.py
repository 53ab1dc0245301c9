"""BackdoorBench metrics: ACC, ASR, RA and DER.

- ACC: clean test accuracy.
- ASR: among test images whose label is not the target (all-to-one), with the trigger applied,
  the fraction classified as the target.
- RA: among those same triggered images, the fraction classified as their true label.
- DER = (max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1) / 2, on fractions.
  (One peer implementation adds the accuracy term; that rewards accuracy loss, so we subtract.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .utils import model_device

if TYPE_CHECKING:
    from .attacks.base import Attack
    from .data.dataset import ImageDataset


def defense_effectiveness_rating(acc_before: float, acc_after: float, asr_before: float,
                                 asr_after: float) -> float:
    """DER on fractions in [0, 1]; 0.5 means no change, 1 a perfect repair."""
    for value in (acc_before, acc_after, asr_before, asr_after):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"DER takes fractions in [0, 1], got {value}")
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


der = defense_effectiveness_rating


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512,
            transform=None) -> torch.Tensor:
    """Predicted labels for float or uint8 images, in batches, on the model's device."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(device)
            batch = batch.float().div_(255) if batch.dtype == torch.uint8 else batch.float()
            if transform is not None:
                batch = transform(batch)
            out.append(model(batch).argmax(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def evaluate(model: nn.Module, test: "ImageDataset", attack: "Attack | None" = None,
             batch_size: int = 512, per_class: bool = False) -> dict:
    """ACC (and ASR, RA when the attack is known), in percent; with ``per_class`` also
    ``acc_per_class``, the clean accuracy of each class (a list indexed by label)."""
    labels = test.labels
    predicted = predict(model, test.images, batch_size)
    result = {"acc": 100.0 * (predicted == labels).float().mean().item()}
    if per_class:
        result["acc_per_class"] = class_accuracies(predicted, labels, test.num_classes)
    if attack is not None:
        result.update(backdoor_metrics(model, test, attack, batch_size))
    return result


def class_accuracies(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list:
    """Percent of each class's images predicted as that class; NaN for a class with no images.

    Why it matters: a clean-label attack at a high rate (SIG with every target-class training
    image poisoned) can leave the target class at 0% clean accuracy, which the mean hides."""
    out = []
    for c in range(num_classes):
        members = labels == c
        n = int(members.sum())
        out.append(100.0 * int((predicted[members] == c).sum()) / n if n else float("nan"))
    return out


def backdoor_metrics(model: nn.Module, test: "ImageDataset", attack: "Attack",
                     batch_size: int = 512) -> dict[str, float]:
    """ASR and RA in percent, over the images the attack counts (BackdoorBench's convention)."""
    hits = recovered = total = 0
    for start in range(0, len(test), batch_size):
        x = test.images[start:start + batch_size].float().div_(255)
        y = test.labels[start:start + batch_size]
        triggered, target, keep = attack.asr_inputs(x, y)
        if keep.sum() == 0:
            continue
        pred = predict(model, triggered[keep], batch_size)
        hits += (pred == target[keep]).sum().item()
        recovered += (pred == y[keep]).sum().item()
        total += int(keep.sum())
    if total == 0:
        return {"asr": float("nan"), "ra": float("nan")}
    return {"asr": 100.0 * hits / total, "ra": 100.0 * recovered / total}
