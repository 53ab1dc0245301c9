"""Architectures outside the model registry, with the constructs user models have and our zoo
does not: DenseNet concatenation, squeeze-and-excitation gating, channel shuffle, ConvNeXt's
channels-last LayerNorm and layer scale, a ViT (attention, class token), Inception branches, a
BatchNorm1d head on 64x64 inputs, a block applied twice. Small enough to build and run in a
test; used by ``tests/test_engine.py`` and ``benchmarks/odd_architectures.py``, with
:func:`logit_gaps`, the check both run on them."""
import torch
from torch import nn
from torch.nn import functional as F

from trojanprune.engine import ChannelMasks, MaskEvaluator, apply_masks_permanently, discover_units


def logit_gaps(model: nn.Module, x: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """For keep masks (M, units.total) over ``model``'s units, the largest |logit| gaps between
    the batched masked evaluation (what a defense measures), the hooked model and the zeroed
    copy (what it delivers), and the smallest change a mask makes to the unmasked logits."""
    units = discover_units(model, x[:1])
    fast = MaskEvaluator(model, units, x).logits(masks)
    gaps = {"evaluator_vs_hooked": 0.0, "hooked_vs_zeroed": 0.0, "smallest_effect": float("inf")}
    with torch.no_grad():
        plain = model(x)
        for j in range(len(masks)):
            with ChannelMasks(model, units, masks[j]):
                hooked = model(x)
            zeroed = apply_masks_permanently(model, units, units.pruned_list(masks[j])).eval()(x)
            gaps["evaluator_vs_hooked"] = max(gaps["evaluator_vs_hooked"], float((fast[j] - hooked).abs().max()))
            gaps["hooked_vs_zeroed"] = max(gaps["hooked_vs_zeroed"], float((hooked - zeroed).abs().max()))
            gaps["smallest_effect"] = min(gaps["smallest_effect"], float((hooked - plain).abs().max()))
    return gaps


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class TinyDenseNet(nn.Module):
    """Each layer's channels are a slice of the next BatchNorm's input."""

    def __init__(self, nc=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.b1 = nn.Sequential(DenseLayer(16, 8), DenseLayer(24, 8))
        self.t1 = nn.Sequential(nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 24, 1, bias=False), nn.AvgPool2d(2))
        self.b2 = nn.Sequential(DenseLayer(24, 8), DenseLayer(32, 8))
        self.bn = nn.BatchNorm2d(40)
        self.fc = nn.Linear(40, nc)

    def forward(self, x):
        x = self.b2(self.t1(self.b1(self.stem(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1)
        return self.fc(torch.flatten(x, 1))


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class SENet(nn.Module):
    """Squeeze-and-excitation gates (a channel-wise product), hardswish, a residual add."""

    def __init__(self, nc=10):
        super().__init__()
        self.c1, self.n1, self.se1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), SE(32)
        self.c2, self.n2, self.se2 = nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), SE(64)
        self.c3, self.n3 = nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, nc)

    def forward(self, x):
        x = self.se1(F.hardswish(self.n1(self.c1(x))))
        x = self.se2(F.hardswish(self.n2(self.c2(x))))
        y = F.hardswish(self.n3(self.c3(x))) + x
        return self.fc(y.mean((2, 3)))


def channel_shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([a, self.branch(b)], 1), 2)


class ShuffleNetLike(nn.Module):
    """Split, a depthwise branch, concatenation and a channel shuffle (view + transpose)."""

    def __init__(self, nc=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(ShuffleBlock(32), ShuffleBlock(32))
        self.head = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.fc = nn.Linear(64, nc)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean([2, 3]))


class ShuffleV2Unit(nn.Module):
    """torchvision's ShuffleNetV2 unit, as it writes it: a stride-2 unit runs two branches on the
    whole input, a stride-1 unit chunks it in two, and the shuffle is view, transpose,
    ``contiguous()`` and view again (the 5-D view that Torch-Pruning could not map)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.branch2(b)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        n, c, h, w = out.shape
        out = out.view(n, 2, c // 2, h, w)
        return torch.transpose(out, 1, 2).contiguous().view(n, c, h, w)


class ShuffleNetV2Like(nn.Module):
    """A small torchvision-style ShuffleNetV2 (stem, two stages of a stride-2 unit and stride-1
    units, 1x1 head conv). Two stride-1 units in a row are what broke the tracing."""

    def __init__(self, nc=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.stage2 = nn.Sequential(ShuffleV2Unit(16, 32, 2), ShuffleV2Unit(32, 32, 1))
        self.stage3 = nn.Sequential(ShuffleV2Unit(32, 64, 2), ShuffleV2Unit(64, 64, 1), ShuffleV2Unit(64, 64, 1))
        self.head = nn.Sequential(nn.Conv2d(64, 96, 1, bias=False), nn.BatchNorm2d(96), nn.ReLU(inplace=True))
        self.fc = nn.Linear(96, nc)

    def forward(self, x):
        x = self.head(self.stage3(self.stage2(self.stem(x))))
        return self.fc(x.mean([2, 3]))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(1e-1 * torch.ones(c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's and timm's LayerNorm on NCHW tensors: over the channels, in and out NCHW."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtLN2d(nn.Module):
    """torchvision's ConvNeXt layout: a stem and a downsampling layer normalized by LayerNorm2d
    (channels in dim 1 of a LayerNorm's output), blocks with channels-last LayerNorm."""

    def __init__(self, nc=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 4, 4), LayerNorm2d(32, eps=1e-6))
        self.stage1 = ConvNeXtBlock(32)
        self.down = nn.Sequential(LayerNorm2d(32, eps=1e-6), nn.Conv2d(32, 48, 2, 2))
        self.stage2 = ConvNeXtBlock(48)
        self.norm = nn.LayerNorm(48)
        self.head = nn.Linear(48, nc)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


class ConvNeXtLike(nn.Module):
    """Depthwise 7x7, LayerNorm and linear layers on channels-last tensors, layer scale."""

    def __init__(self, nc=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, 4)
        self.stages = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, nc)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean([-2, -1])))


class TinyViT(nn.Module):
    """Patch embedding, class token, nn.TransformerEncoder (pre-norm)."""

    def __init__(self, nc=10, dim=48, patch=4, depth=2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (32 // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, depth)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, nc)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.enc(x))[:, 0])


class Inception(nn.Module):
    """Branches concatenated, ELU, dropout, ``x.view(x.size(0), -1)`` into the head."""

    def __init__(self, nc=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1), nn.ReLU())
        self.b1 = nn.Conv2d(24, 16, 1)
        self.b3 = nn.Sequential(nn.Conv2d(24, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 1, 1))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(24, 8, 1))
        self.post = nn.Sequential(nn.BatchNorm2d(40), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(40, 48, 3, 1, 1), nn.ELU())
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(48 * 16 * 16, nc)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([F.relu(self.b1(x)), F.relu(self.b3(x)), F.relu(self.bp(x))], 1)
        x = self.post(x)
        return self.fc(self.drop(x.view(x.size(0), -1)))


class BN1dMLPHead(nn.Module):
    """conv trunk, then Linear + BatchNorm1d + LeakyReLU head, 64x64 input."""
    def __init__(self, nc=10):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 16, 5, 2, 2), nn.BatchNorm2d(16), nn.LeakyReLU(0.1),
                               nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.LeakyReLU(0.1),
                               nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.h = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.LeakyReLU(0.1), nn.Linear(64, nc))

    def forward(self, x):
        return self.h(self.f(x))


class SharedBlock(nn.Module):
    """One conv block applied twice (weight sharing): the block's conv both reads and writes
    the same channels, so they form one unit group with the stem."""

    def __init__(self, nc=10):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, nc)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        return self.fc(self.block(self.block(x)).mean((2, 3)))


#: name -> (class, input side); every model takes 3-channel images and has 10 classes
ARCHS = {"densenet": (TinyDenseNet, 32), "senet": (SENet, 32), "shufflenet": (ShuffleNetLike, 32),
         "shufflenet_v2": (ShuffleNetV2Like, 32), "convnext_ln2d": (ConvNeXtLN2d, 32),
         "convnext": (ConvNeXtLike, 32), "vit": (TinyViT, 32), "inception": (Inception, 32),
         "bn1d_64px": (BN1dMLPHead, 64), "shared_block": (SharedBlock, 32)}
