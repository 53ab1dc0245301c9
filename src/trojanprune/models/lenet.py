"""LeNet-5 for MNIST-sized grey images (LeCun et al. 1998), ReLU and max-pooling.

BatchNorm after each conv is on by default (``batch_norm=True``): ANP's perturbations and
data-free inversion both read BatchNorm statistics. ``batch_norm=False`` gives the plain model.
"""

from __future__ import annotations

from torch import nn

from .normalize import Normalize


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, mean=None, std=None,
                 batch_norm: bool = True, input_size: int = 28):
        super().__init__()
        self.normalize = Normalize(mean or (0.5,) * in_channels, std or (0.5,) * in_channels)

        def block(cin, cout, padding):
            norm = [nn.BatchNorm2d(cout)] if batch_norm else []
            return [nn.Conv2d(cin, cout, 5, padding=padding), *norm, nn.ReLU(inplace=True),
                    nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(in_channels, 6, 2), *block(6, 16, 0))
        side = ((input_size // 2) - 4) // 2
        if side < 1:
            raise ValueError(f"lenet5 needs inputs of at least 12x12 pixels, got {input_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(self.normalize(x)))
