"""vgg_small: the CPU-scale CIFAR model (6 conv layers with BatchNorm, ~0.29M parameters)."""

from __future__ import annotations

from torch import nn

from .normalize import Normalize

# Three stages of two 3x3 convs each; widths chosen so the model trains at a few hundred
# images/s on 2 CPU cores yet reaches >85% on CIFAR-10.
VGG_SMALL_WIDTHS = ((32, 32), (64, 64), (128, 128))


class VGGSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, mean=None, std=None,
                 widths=VGG_SMALL_WIDTHS):
        super().__init__()
        self.normalize = Normalize(mean or (0.5,) * in_channels, std or (0.5,) * in_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in widths:
            for width in stage:
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.features(self.normalize(x))
        return self.classifier(self.pool(x).flatten(1))
