"""Supervised training: SGD with momentum, cosine schedule, seeded, with a progress bar.

The whole uint8 training set sits on the training device and batches are cut by indexing, with
augmentation done on the batch as tensor ops. There is no per-image Python work, so throughput
matches a bare PyTorch loop over pre-loaded tensors.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data.dataset import ImageDataset
from .errors import ConfigError, TrojanPruneError
from .progress import progress_bar
from .utils import derive_seed, resolve_device

AUGMENTATIONS = ("none", "crop", "crop+flip")
# Flips change the meaning of digits and traffic signs; CIFAR uses crop + flip (BackdoorBench).
DEFAULT_AUGMENT = {"cifar10": "crop+flip", "gtsrb": "crop", "mnist": "crop"}


@dataclass
class TrainConfig:
    """Defaults follow BackdoorBench (SGD 0.01, momentum 0.9, wd 5e-4, batch 128, cosine)."""

    epochs: int = 15
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: str = "none"
    crop_padding: int = 4
    seed: int = 0
    # NHWC convolutions: ~1.3x faster training of vgg_small/resnet20 on this CPU (measured with
    # benchmarks/train_throughput.py); the saved weights are ordinary contiguous tensors.
    channels_last: bool = True

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and batch_size must be >= 1 and lr > 0")


def augment_batch(x: torch.Tensor, mode: str, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (and horizontal flip), per image, as batched tensor ops."""
    if mode == "none":
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch_idx = torch.arange(n, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=x.device)[None, :, None, None]
    x = padded[batch_idx, chan_idx, rows, cols]
    if mode == "crop+flip":
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def train(model: nn.Module, data: ImageDataset, config: TrainConfig | None = None,
          device: str | torch.device | None = "cpu", progress: bool = True,
          log: Callable[[str], None] | None = None) -> dict:
    """Train ``model`` in place on ``data``; return statistics (time, images/s, final loss)."""
    config = config or TrainConfig()
    device = resolve_device(device)
    if len(data) < 2:
        raise TrojanPruneError(f"training needs at least 2 images, got {len(data)}")
    if int(data.labels.max()) >= _num_outputs(model, data, device):
        raise ConfigError("the dataset has more classes than the model has outputs")
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "training-order"))
    torch.manual_seed(config.seed)
    model.to(device).train()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    images, labels = data.images.to(device), data.labels.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=False)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    seen, start = 0, time.perf_counter()
    loss_value = float("nan")
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("training", total=config.epochs * steps_per_epoch)
        for epoch in range(config.epochs):
            order = torch.randperm(len(data), generator=generator).to(device)
            correct = total_loss = 0.0
            for step in range(steps_per_epoch):
                idx = order[step * config.batch_size:(step + 1) * config.batch_size]
                if idx.numel() < 2:  # a BatchNorm layer cannot train on one image
                    bar.advance(task)
                    continue
                x = augment_batch(images[idx].float().div_(255), config.augment,
                                  config.crop_padding, generator)
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = labels[idx]
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                if not torch.isfinite(loss):
                    raise TrojanPruneError(f"training diverged (loss {loss.item()}) at epoch "
                                           f"{epoch + 1}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                seen += idx.numel()
                total_loss += loss.item() * idx.numel()
                correct += (logits.argmax(1) == y).sum().item()
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{config.epochs} "
                           f"loss {loss.item():.3f}")
            loss_value = total_loss / len(data)
            if log:
                elapsed = time.perf_counter() - start
                log(f"epoch {epoch + 1}/{config.epochs}: loss {loss_value:.4f}, train acc "
                    f"{100 * correct / len(data):.2f}%, {seen / elapsed:.0f} images/s")
    model.eval()
    if config.channels_last:  # safetensors and the pruning engine expect contiguous weights
        model.to(memory_format=torch.contiguous_format)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_second": seen / seconds, "final_loss": loss_value,
            "config": asdict(config), "device": str(device)}


def _num_outputs(model: nn.Module, data: ImageDataset, device) -> int:
    was_training = model.training
    model.to(device).eval()
    with torch.no_grad():
        out = model(data.images[:1].to(device).float() / 255)
    model.train(was_training)
    return out.shape[1]
