"""Training throughput: trojanprune's trainer vs a bare PyTorch loop on the same model and data.

    python benchmarks/train_throughput.py --images 10000 --arch vgg_small

Both loops see the same pre-loaded CIFAR-10 tensors, batch 128, SGD; ours adds the seeded
crop + flip augmentation, the cosine schedule and the progress bar. Both use channels-last
(NHWC) convolutions, the trainer's default, unless ``--nchw``; ``--nchw`` runs both in PyTorch's
default layout, which shows what the layout alone is worth.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from trojanprune import data, models
from trojanprune.training import TrainConfig, augment_batch, train


def bare_loop(model, images, labels, batch_size=128, channels_last=True):
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=g)
    for s in range(0, len(images), batch_size):
        idx = order[s:s + batch_size]
        x = images[idx].float().div_(255)
        x = augment_batch(x, "crop+flip", 4, g)  # the augmentation any CIFAR loop does
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return len(images) / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--arch", default="vgg_small")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--nchw", action="store_true", help="both loops without channels-last")
    args = ap.parse_args()
    ds = data.load_dataset("cifar10", "train", data_dir=args.data_dir)
    ds = ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:args.images])
    torch.manual_seed(0)
    bare = bare_loop(models.create(args.arch, 10), ds.images, ds.labels,
                     channels_last=not args.nchw)
    stats = train(models.create(args.arch, 10), ds,
                  TrainConfig(epochs=1, augment="crop+flip", channels_last=not args.nchw),
                  progress=True)
    ours = stats["images_per_second"]
    print(f"| trainer | images/s |\n|---|---|\n| bare PyTorch loop | {bare:.0f} |\n"
          f"| trojanprune.training.train | {ours:.0f} ({100 * ours / bare:.0f}% of bare) |")


if __name__ == "__main__":
    main()
