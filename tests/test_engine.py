"""Pruning engine: unit discovery, masks, permanent zeroing, export, batched mask evaluation."""

from __future__ import annotations

import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trojanprune import models
from trojanprune.engine import (ChannelMasks, EvaluationBudgetExceeded, MaskEvaluator, Units,
                                apply_masks_permanently, discover_units, export_pruned)
from trojanprune.engine.evaluate import sharing_agreeing_masks
from trojanprune.engine.masks import as_group_masks
from trojanprune.errors import ConfigError, TrojanPruneError



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny forward passes. On the shared 2-core machine, 2 OpenMP threads
    competing with other jobs make each one ~100x slower (barrier waits), so use one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# name -> (factory kwargs, in_channels, side); preact at 16x16 keeps CPU time down.
ARCHS = {
    "vgg_small": ({}, 3, 32),
    "resnet20": ({}, 3, 32),
    "preact_resnet18": ({}, 3, 16),
    "lenet5": ({}, 1, 28),
    "lenet5_nobn": ({"batch_norm": False}, 1, 28),
}


def make(arch: str, seed: int = 0):
    kwargs, c, side = ARCHS[arch]
    torch.manual_seed(seed)
    model = models.create(arch.replace("_nobn", ""), 10, c, **kwargs)
    _randomize_norms(model)
    return model.eval(), torch.rand(4, c, side, side)


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so that a BN of a zero input is not zero."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def naive_logits(model, units, images, masks: torch.Tensor) -> torch.Tensor:
    """The reference: one forward per mask, masks installed by hooks."""
    out = []
    with torch.no_grad(), ChannelMasks(model, units) as cm:
        for mask in masks:
            cm.set(mask)
            out.append(model(images))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------
# models that are not in the registry
# ---------------------------------------------------------------------------------------

class TVBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock layout (conv1/bn1/relu/conv2/bn2/downsample)."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVBottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck layout (1x1 -> 3x3 -> 1x1, expansion 4)."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    """A tiny torchvision-style ResNet: stem, maxpool, layer1..2 with downsample, avgpool, fc."""

    def __init__(self, block, layers=(2, 2), width=4, num_classes=10):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 2 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class OddNet(nn.Module):
    """A user model with ModuleDicts, dotted names, a concatenation and ``x.size(0)`` reuse."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({
            "stem": nn.Sequential(OrderedDict(c0=nn.Conv2d(3, 6, 3, padding=1), n0=nn.BatchNorm2d(6),
                                              a0=nn.ReLU())),
            "left": nn.Conv2d(6, 4, 3, padding=1),
            "right": nn.Conv2d(6, 5, 1),
            "mix": nn.BatchNorm2d(9),
            "post": nn.Conv2d(9, 8, 3, stride=2, padding=1),
        })
        self.head = nn.ModuleDict({"hidden": nn.Linear(8 * 4 * 4, 12), "logits": nn.Linear(12, 5)})

    def forward(self, x):
        b = x.size(0)  # computed before any masked layer, used after: must follow the mask batch
        x = self.blocks["stem"](x)
        x = torch.cat([self.blocks["left"](x), self.blocks["right"](x)], dim=1)
        x = F.relu(self.blocks["mix"](x))
        x = F.relu(self.blocks["post"](x))
        x = F.relu(self.head["hidden"](x.reshape(b, -1)))
        return self.head["logits"](x)


class BranchyNet(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        if x.mean() > -1:  # always true, but fx cannot know
            x = x * 1.0
        return self.fc(x.mean((2, 3)))


def _groups(units: Units) -> dict:
    return {g.name: g for g in units}


# ---------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------

def test_discovery_vgg_small():
    model, x = make("vgg_small")
    units = discover_units(model, x)
    assert units.names == ("features.0", "features.3", "features.7", "features.10", "features.14", "features.17")
    assert [g.size for g in units] == [32, 32, 64, 64, 128, 128] and units.total == 448
    assert units.offsets == (0, 32, 64, 128, 192, 320)
    g = units["features.3"]
    assert g.mask_points == ("features.3", "features.4") and g.hook_points == ("features.4",)
    assert g.kind == "conv" and g.root == "features.3" and not g.residual and g.consumers == ("features.7",)
    assert all(g.depth < h.depth for g, h in zip(units.groups, units.groups[1:]))
    assert all("classifier" not in g.mask_points for g in units)


def test_discovery_resnet20_residual_groups():
    model, x = make("resnet20")
    units = discover_units(model, x)
    groups = _groups(units)
    assert len(units) == 12 and units.total == 448
    residual = [g for g in units if g.residual]
    assert [g.name for g in residual] == ["conv1", "layer2.0.conv2", "layer3.0.conv2"]
    assert [g.size for g in residual] == [16, 32, 64]
    stage1 = groups["conv1"]
    assert set(stage1.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    assert {"bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"} <= set(stage1.mask_points)
    stage2 = groups["layer2.0.conv2"]
    assert set(stage2.producers) == {"layer2.0.shortcut.0", "layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2"}
    assert "layer2.0.shortcut.1" in stage2.hook_points
    assert set(stage2.consumers) == {"layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1", "layer3.0.shortcut.0"}
    assert "linear" in groups["layer3.0.conv2"].consumers
    plain = [g for g in units if not g.residual]
    assert sorted(g.name for g in plain) == sorted(f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3))
    assert all(len(g.mask_points) == 2 for g in plain)
    assert all("linear" not in g.mask_points for g in units)


def test_discovery_preact_consumer_bns():
    model, x = make("preact_resnet18")
    units = discover_units(model, x)
    groups = _groups(units)
    assert len(units) == 12 and units.total == 2 * (64 + 128 + 256 + 512) + (64 + 128 + 256 + 512)
    stage1 = groups["conv1"]
    assert set(stage1.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    # BatchNorms that READ the residual stream carry its channels too.
    assert set(stage1.hook_points) == {"layer1.0.bn1", "layer1.1.bn1", "layer2.0.bn1"}
    stage4 = groups["layer4.0.shortcut.0"]
    assert {"layer4.0.conv2", "layer4.1.conv2", "layer4.1.bn1", "bn"} <= set(stage4.mask_points)
    assert stage4.residual and "linear" in stage4.consumers
    assert groups["layer2.0.conv1"].mask_points == ("layer2.0.conv1", "layer2.0.bn2")


@pytest.mark.parametrize("arch", ["lenet5", "lenet5_nobn"])
def test_discovery_lenet(arch):
    model, x = make(arch)
    units = discover_units(model, x)
    assert [(g.name, g.size, g.kind) for g in units] == [
        ("features.0", 6, "conv"), (units.names[1], 16, "conv"),
        ("classifier.1", 120, "linear"), ("classifier.3", 84, "linear")]
    assert units["classifier.3"].consumers == ("classifier.5",)
    convs_only = discover_units(model, x, include_linear=False)
    assert [g.size for g in convs_only] == [6, 16]
    assert units.select("last:1", kind="conv").names == (units.names[1],)


@pytest.mark.parametrize("block", [TVBasicBlock, TVBottleneck])
def test_discovery_torchvision_style_resnet(block):
    torch.manual_seed(0)
    model = TVResNet(block).eval()
    units = discover_units(model, torch.rand(2, 3, 32, 32))
    groups = _groups(units)
    last = "conv3" if block is TVBottleneck else "conv2"
    stage2 = next(g for g in units if "layer2.0.downsample.0" in g.producers)
    assert set(stage2.producers) == {"layer2.0.downsample.0", f"layer2.0.{last}", f"layer2.1.{last}"}
    assert "layer2.0.downsample.1" in stage2.hook_points and stage2.residual
    assert stage2.size == 8 * block.expansion and stage2.consumers == ("layer2.1.conv1", "fc")
    if block is TVBasicBlock:  # the stem writes straight into stage 1's residual stream
        stage1 = groups["conv1"]
        assert set(stage1.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
        assert len(units) == 1 + 2 + 1 + 2  # stage groups + one group per block's conv1
    else:  # 4 -> 16 channels: a projection starts stage 1, the stem is a group of its own
        stage1 = groups["layer1.0.conv3"]
        assert set(stage1.producers) == {"layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3"}
        assert not groups["conv1"].residual
        assert len(units) == 1 + 1 + 4 * 2 + 1
    assert stage1.residual
    assert all("fc" not in g.mask_points for g in units)


def test_discovery_unusual_names_and_concat():
    torch.manual_seed(0)
    model = OddNet().eval()
    _randomize_norms(model)
    units = discover_units(model, torch.rand(2, 3, 8, 8))
    groups = _groups(units)
    assert set(units.names) == {"blocks.stem.c0", "blocks.left", "blocks.right", "blocks.post", "head.hidden"}
    assert groups["blocks.stem.c0"].hook_points == ("blocks.stem.n0",)
    # The BatchNorm after the concatenation holds channels of both branches, at an offset.
    assert groups["blocks.left"].channels_at("blocks.mix") == (0, 1, 2, 3)
    assert groups["blocks.right"].channels_at("blocks.mix") == (4, 5, 6, 7, 8)
    assert all("head.logits" not in g.mask_points for g in units)


def test_nothing_prunable():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(TrojanPruneError, match="nothing prunable"):
        discover_units(flat, torch.rand(2, 3, 2, 2))
    all_conv = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # conv = classifier
    with pytest.raises(TrojanPruneError, match="nothing prunable"):
        discover_units(all_conv, torch.rand(2, 3, 8, 8))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(TrojanPruneError, match="nothing prunable"):
        discover_units(mlp, torch.rand(2, 3, 2, 2), include_linear=False)


def test_discovery_leaves_model_unchanged():
    model, x = make("resnet20")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    discover_units(model, x)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_units_index_api():
    model, x = make("resnet20")
    units = discover_units(model, x)
    for i in (0, 15, 16, 100, units.total - 1):
        assert units.unit_index(*units.unit_of(i)) == i
    assert units.unit_of(units.offset("layer2.0.conv2") + 5) == ("layer2.0.conv2", 5)
    sub = units.select(["layer3.2.conv1", "layer1.0.conv1"])
    assert sub.names == ("layer1.0.conv1", "layer3.2.conv1") and sub.offsets == (0, 16)
    assert units.select("last:2").names == units.names[-2:]
    with pytest.raises(ConfigError):
        units.select("nope")
    with pytest.raises(ConfigError):
        units.unit_index("layer1.0.conv1", 16)
    pairs = [("layer1.0.conv1", 3), ("conv1", 0)]
    flat = units.keep_mask(pairs) < 0.5
    as_dict = {"layer1.0.conv1": torch.arange(16) == 3, "conv1": [0]}
    expect = {"conv1": [0], "layer1.0.conv1": [3]}
    assert units.pruned_channels(pairs) == units.pruned_channels(flat) == units.pruned_channels(as_dict) == expect
    assert sorted(units.pruned_list(units.keep_mask(pairs))) == sorted(pairs)


# ---------------------------------------------------------------------------------------
# masks, permanent zeroing, export
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
def test_masked_equals_permanent_equals_export(arch):
    model, x = make(arch)
    units = discover_units(model, x)
    keep = (torch.rand(units.total, generator=torch.Generator().manual_seed(2)) > 0.3).float()
    pruned = units.pruned_list(keep)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(x)
        with ChannelMasks(model, units, keep):
            masked = model(x)
        permanent = apply_masks_permanently(model, units, pruned).eval()(x)
        small = export_pruned(model, units, pruned, x).eval()
        exported = small(x)
    assert (masked - plain).abs().max() > 1e-3  # the masks did something
    assert torch.allclose(masked, permanent, atol=1e-5)
    assert (masked - exported).abs().max() < 1e-4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


def test_odd_model_masks_export_and_evaluator():
    torch.manual_seed(0)
    model = OddNet().eval()
    _randomize_norms(model)
    x = torch.rand(3, 3, 8, 8)
    units = discover_units(model, x)
    keep = (torch.rand(units.total, generator=torch.Generator().manual_seed(3)) > 0.4).float()
    with torch.no_grad():
        with ChannelMasks(model, units, keep):
            masked = model(x)
        permanent = apply_masks_permanently(model, units, units.pruned_list(keep)).eval()(x)
        exported = export_pruned(model, units, units.pruned_list(keep), x).eval()(x)
    assert torch.allclose(masked, permanent, atol=1e-5) and (masked - exported).abs().max() < 1e-4
    masks = (torch.rand(5, units.total, generator=torch.Generator().manual_seed(4)) > 0.3).float()
    ev = MaskEvaluator(model, units, x, chunk=7)
    assert ev.reuses_prefix
    assert torch.allclose(ev.logits(masks), naive_logits(model, units, x, masks), atol=1e-5)


class _CrossChannelNorms(nn.Module):
    """GroupNorm after a biased conv, a depthwise conv feeding a LayerNorm over channels
    (ConvNeXt), a LayerNorm after a linear: norms whose statistics mix channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.ln2d = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        x = F.silu(self.gn(self.conv(x)))
        x = x + self.ln2d(self.dw(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(F.gelu(self.ln(self.fc(x.mean((2, 3))))))


def test_permanent_zeroing_keeps_groupnorm_and_layernorm_statistics():
    """The repaired model must compute what the defense measured with masks. A channel masked
    at the hook points still enters a GroupNorm's or LayerNorm's statistics; zeroing its
    producer too would shift every other channel of that norm."""
    torch.manual_seed(0)
    model = _CrossChannelNorms().eval()
    for m in model.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            nn.init.normal_(m.weight, 1, 0.3)
            nn.init.normal_(m.bias, 0, 0.3)
    x = torch.rand(5, 3, 6, 6)
    units = discover_units(model, x[:1])
    for seed in range(4):
        keep = (torch.rand(units.total, generator=torch.Generator().manual_seed(seed)) > 0.4).float()
        with torch.no_grad():
            with ChannelMasks(model, units, keep):
                masked = model(x)
            permanent = apply_masks_permanently(model, units, units.pruned_list(keep)).eval()(x)
        assert (masked - model(x)).abs().max() > 1e-3
        assert torch.allclose(masked, permanent, atol=1e-5), float((masked - permanent).abs().max())


def _l1_pruned(module: nn.Module) -> nn.Module:
    from torch.nn.utils import prune

    return prune.l1_unstructured(module, "weight", amount=0.3)  # weight = weight_orig * mask


def _reparametrized(kind: str) -> nn.Module:
    from torch.nn.utils import parametrizations, spectral_norm, weight_norm

    wrap = {"weight_norm": parametrizations.weight_norm, "spectral_norm": parametrizations.spectral_norm,
            "old weight_norm": weight_norm, "old spectral_norm": spectral_norm,
            "orthogonal": parametrizations.orthogonal, "prune": _l1_pruned}[kind]
    torch.manual_seed(0)
    model = nn.Sequential(wrap(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(),
                          wrap(nn.Conv2d(8, 16, 3, padding=1)), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), wrap(nn.Linear(16, 12)), nn.ReLU(),
                          nn.Linear(12, 10))
    with torch.no_grad():
        model(torch.rand(4, 3, 8, 8))  # one training step's power iteration, as a trained model
    return model.eval()


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "old weight_norm", "old spectral_norm",
                                  "prune"])
def test_reparametrized_weights_are_zeroed_where_they_are_stored(kind):
    """A weight computed from other tensors (weight or spectral norm, a torch.nn.utils.prune
    mask) is not stored in ``module.weight``: writing there left every channel in the
    repaired copy, silently."""
    sys.path.insert(0, str(Path(__file__).parent))
    from odd_models import logit_gaps

    model = _reparametrized(kind)
    x = torch.rand(6, 3, 8, 8)
    units = discover_units(model, x[:1])
    masks = (torch.rand(3, units.total, generator=torch.Generator().manual_seed(0)) > 0.3).float()
    gaps = logit_gaps(model, x, masks)
    assert gaps["smallest_effect"] > 1e-3
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert gaps["hooked_vs_zeroed"] <= 1e-5 * max(1.0, scale), gaps
    zeroed = apply_masks_permanently(model, units, {"0": [1, 4]})
    assert zeroed[0].weight[[1, 4]].abs().sum() == 0
    assert float(model[0].weight[[1, 4]].abs().sum()) > 0, "the input model was changed"


def test_old_weight_norm_model_last_run_with_gradients_is_repaired():
    """The older hook-based weight_norm leaves a non-leaf weight after a forward with
    gradients, which copy.deepcopy refuses; the repair copies the model all the same."""
    import trojanprune as tp

    model = _reparametrized("old weight_norm")
    x, y = torch.rand(20, 3, 8, 8), torch.arange(20) % 10
    model(x).sum().backward()  # as right after training
    result = tp.repair(model, (x, y), method="fp", finetune_epochs=0)
    assert result.pruned
    assert model[0].weight.grad_fn is not None, "the input model was changed"


def test_reparametrization_the_repair_cannot_zero_is_refused_before_any_work():
    import trojanprune as tp

    with pytest.raises(ConfigError, match=r"'0'.*_Orthogonal.*remove_parametrizations"):
        tp.repair(_reparametrized("orthogonal"), None, method="clp", input_shape="3,8,8")


def test_export_refuses_whole_group():
    model, x = make("vgg_small")
    units = discover_units(model, x)
    with pytest.raises(TrojanPruneError, match="all 32 channels"):
        export_pruned(model, units, {"features.3": torch.ones(32, dtype=torch.bool)}, x)
    # zeroing a whole layer is fine without physical removal
    zeroed = apply_masks_permanently(model, units, {"features.3": list(range(32))})
    assert zeroed.features[3].weight.abs().sum() == 0


def test_masks_reversible_and_batched():
    model, x = make("resnet20")
    units = discover_units(model, x)
    with torch.no_grad():
        plain = model(x)
        masks = (torch.rand(3, units.total, generator=torch.Generator().manual_seed(5)) > 0.5).float()
        cm = ChannelMasks(model, units, masks)
        batched = model(x.repeat(3, 1, 1, 1)).view(3, len(x), -1)
        cm.remove()
        restored = model(x)
    assert torch.equal(plain, restored)
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.allclose(batched, naive_logits(model, units, x, masks), atol=1e-5)
    with pytest.raises(TrojanPruneError, match="mask-major"):
        with torch.no_grad(), ChannelMasks(model, units, masks):
            model(x[:2])


def test_soft_masks_carry_gradient_and_scale_once():
    model, x = make("vgg_small")
    units = discover_units(model, x)
    mask = torch.full((units["features.3"].size,), 0.5, requires_grad=True)
    with ChannelMasks(model, units, {"features.3": mask}):
        loss = model(x).logsumexp(1).mean()
    loss.backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0
    # A soft mask scales what the next conv reads exactly once (after the BatchNorm + ReLU).
    seen = {}
    h = model.features[7].register_forward_pre_hook(lambda m, i: seen.update(input=i[0].clone()))
    with torch.no_grad():
        model(x)
        plain_in = seen.pop("input")
        with ChannelMasks(model, units, {"features.3": torch.full((32,), 0.5)}):
            model(x)
    h.remove()
    assert torch.allclose(seen["input"], 0.5 * plain_in, atol=1e-6)
    # batched soft masks: gradients for each mask separately
    masks = torch.rand(2, units.total, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    with ChannelMasks(model, units, masks):
        model(x.repeat(2, 1, 1, 1))[: len(x)].sum().backward()
    assert masks.grad[0].abs().sum() > 0 and masks.grad[1].abs().sum() == 0


# ---------------------------------------------------------------------------------------
# batched evaluation
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["vgg_small", "resnet20"])
@pytest.mark.parametrize("reuse", [True, False])
def test_evaluator_matches_naive_loop(arch, reuse):
    model, x = make(arch)
    x = torch.rand(6, *x.shape[1:])
    units = discover_units(model, x)
    g = torch.Generator().manual_seed(7)
    for sub in (units, units.select("last:2")):
        masks = (torch.rand(9, sub.total, generator=g) > 0.3).float()
        masks[0] = 1  # an unmasked model among them
        # chunk=16 < 9*6 forces mask chunks, chunk=4 < 6 forces image blocks too
        for chunk in (16, 4):
            ev = MaskEvaluator(model, sub, x, chunk=chunk, reuse_prefix=reuse)
            assert ev.reuses_prefix == reuse
            got = ev.logits(masks)
            assert got.shape == (9, 6, 10)
            assert (got - naive_logits(model, sub, x, masks)).abs().max() < 1e-5
            assert ev.evaluations == 9
    # dict masks, including a (size,) mask broadcast over M
    sub = units.select("last:2")
    a, b = sub.names
    dmask = {a: (torch.rand(4, sub[a].size, generator=g) > 0.5).float(), b: torch.ones(sub[b].size)}
    ev = MaskEvaluator(model, sub, x)
    assert torch.allclose(ev.logits(dmask), naive_logits(model, sub, x, sub.join(dmask)), atol=1e-5)


def test_evaluator_metrics_budget_and_cache():
    model, x = make("vgg_small")
    units = discover_units(model, x)
    labels = torch.tensor([0, 1, 2, 3])
    ev = MaskEvaluator(model, units.select("last:1"), x, labels, budget=14)
    masks = (torch.rand(3, 128, generator=torch.Generator().manual_seed(8)) > 0.5).float()
    logits = ev.logits(masks)
    assert torch.equal(ev.accuracy(masks), (logits.argmax(-1) == labels).float().mean(1))
    assert torch.equal(ev.target_rate(masks, 2), (logits.argmax(-1) == 2).float().mean(1))
    other = logits.clone()
    other[..., 2] = float("-inf")
    assert torch.allclose(ev.margin(masks, 2), (logits[..., 2] - other.amax(-1)).mean(1))
    assert ev.evaluations == 12  # 4 calls x 3 masks
    with pytest.raises(EvaluationBudgetExceeded) as info:
        ev.logits(masks)  # 12 + 3 > 14: refused before any work
    assert isinstance(info.value, TrojanPruneError) and ev.evaluations == 12
    ev.budget = None
    # soft accuracy: each image's softmax probability of its label, averaged
    own = logits.softmax(-1)[:, torch.arange(4), labels]
    assert torch.allclose(ev.soft_accuracy(masks), own.mean(1), atol=1e-6)
    assert bool((ev.soft_accuracy(masks) <= 1).all()) and bool((ev.soft_accuracy(masks) >= 0).all())
    # weights changed in place: cached prefix activations must not be reused
    with torch.no_grad():
        model.features[0].weight.mul_(-1)
    assert torch.allclose(ev.logits(masks), naive_logits(model, ev.units, x, masks), atol=1e-5)


def test_evaluator_fallback_without_fx():
    torch.manual_seed(0)
    model = BranchyNet().eval()
    x = torch.rand(5, 3, 6, 6)
    units = discover_units(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ev = MaskEvaluator(model, units, x)
    assert not ev.reuses_prefix and any("without prefix reuse" in str(w.message) for w in caught)
    masks = (torch.rand(4, units.total, generator=torch.Generator().manual_seed(9)) > 0.5).float()
    assert torch.allclose(ev.logits(masks), naive_logits(model, units, x, masks), atol=1e-5)


def test_edited_logits_fx_and_hooks_agree_and_edit_precedes_masks():
    """The edit is applied at the hook point before its mask (after it with ``after_mask``),
    with gradients, on both paths."""
    from trojanprune.engine import MaskEvaluator, discover_units

    torch.manual_seed(0)
    model = models.create("vgg_small", 10, 3, widths=((4, 4), (8, 8), (8, 8))).eval()
    x = torch.rand(3, 3, 32, 32)
    units = discover_units(model, x[:1])
    group = units.names[3]
    module = units[group].hook_points[-1]
    fx_ev, hook_ev = MaskEvaluator(model, units, x), MaskEvaluator(model, units, x, reuse_prefix=False)
    assert fx_ev.reuses_prefix and not hook_ev.reuses_prefix
    masks = torch.ones(2, units.total)
    masks[1, :5] = 0
    # identity edit: the same numbers as plain logits
    same = fx_ev.edited_logits(masks, module, lambda out, j0, j1: out, grad=False)
    assert torch.allclose(same, fx_ev.logits(masks), atol=1e-5)
    value = torch.tensor(3.0, requires_grad=True)

    def edit(out, j0, j1):
        assert out.shape[0] == j1 - j0
        return out + value

    a = fx_ev.edited_logits(masks, module, edit)
    b = hook_ev.edited_logits(masks, module, edit)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, same, atol=1e-3)
    (grad,) = torch.autograd.grad(a.sum(), value)
    assert torch.isfinite(grad) and grad != 0
    # pruning the whole edited group removes what the edit wrote (the edit runs first)
    off = torch.ones(1, units.total)
    off[0, units.offset(group):units.offset(group) + units[group].size] = 0
    assert torch.allclose(fx_ev.edited_logits(off, module, edit, grad=False), fx_ev.logits(off), atol=1e-5)
    # after_mask: the mask acts first, so the pruned group carries what the edit writes (both paths)
    late_fx = fx_ev.edited_logits(off, module, edit, grad=False, after_mask=True)
    late_hooks = hook_ev.edited_logits(off, module, edit, grad=False, after_mask=True)
    assert torch.allclose(late_fx, late_hooks, atol=1e-5)
    assert not torch.allclose(late_fx, fx_ev.logits(off), atol=1e-3)
    # where the edited group is not pruned (masks prunes the first two groups), order does not matter
    assert units.offset(group) >= 5
    assert torch.allclose(fx_ev.edited_logits(masks, module, edit, grad=False, after_mask=True), a.detach(), atol=1e-5)
    with pytest.raises(ConfigError, match="not a hook point"):
        fx_ev.edited_logits(masks, "features.0.nope", edit)


class _InplaceResidual(nn.Module):
    """A residual block whose ReLU and addition write in place: a shared prefix value that one
    branch overwrote would corrupt the next branch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.conv1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        identity = self.relu(self.stem(x))
        out = self.relu(self.bn1(self.conv1(identity)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.head(self.relu(out).mean((2, 3)))


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_branch_logits_equal_separate_calls_and_count_each_branch(reuse_prefix):
    """One shared pass up to the hook point, one per branch after it: the same numbers as the
    separate calls (plain and edited, edit before or after the mask), even where later layers
    write in place, and each branch counted as M evaluations."""
    from trojanprune.engine import MaskEvaluator, discover_units

    torch.manual_seed(0)
    model = _InplaceResidual().eval()
    for bn in (model.stem[1], model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.rand(5, 3, 8, 8)
    units = discover_units(model, x[:1])
    ev = MaskEvaluator(model, units, x, reuse_prefix=reuse_prefix)
    assert ev.reuses_prefix is reuse_prefix
    module = "bn1"
    masks = (torch.rand(3, units.total, generator=torch.Generator().manual_seed(1)) > 0.3).float()

    def writer(value):
        return lambda out, j0, j1: out + value

    edits = [writer(2.0), None, writer(-1.0)]
    for after_mask in (False, True):
        before = ev.evaluations
        branches = ev.branch_logits(masks, module, edits, after_mask=after_mask)
        assert ev.evaluations - before == 3 * len(masks)
        separate = [ev.edited_logits(masks, module, fn, grad=False, after_mask=after_mask)
                    if fn is not None else ev.logits(masks) for fn in edits]
        assert len(branches) == 3
        for got, want in zip(branches, separate):
            assert torch.allclose(got, want, atol=1e-6)
        assert not torch.allclose(branches[0], branches[1], atol=1e-3)  # the edits do act
    assert ev.branch_logits(masks, module, []) == []
    with pytest.raises(ConfigError, match="not a hook point"):
        ev.branch_logits(masks, "nope", edits)


def test_probe_input_finds_the_size_a_model_runs_on_or_says_what_to_set():
    from trojanprune.engine.inputs import parse_input_shape, probe_input

    lenet = models.create("lenet5", 10, 1)
    x, source = probe_input(lenet, "", "cpu", "data-free X")
    assert tuple(x.shape) == (1, 1, 28, 28) and source == "probed"
    x, source = probe_input(lenet, "1x28x28", "cpu", "data-free X")
    assert source == "input_shape option"
    assert parse_input_shape([3, 32, 32]) == (3, 32, 32)
    with pytest.raises(ConfigError, match="does not run on inputs of shape"):
        probe_input(lenet, "1,32,32", "cpu", "data-free X")
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ConfigError, match="data-free X cannot tell .* no conv layer.*input_shape="):
        probe_input(mlp, "", "cpu", "data-free X")


# -- channels-last copies for the reverses (engine/layout.py) -----------------------------------

class _FlattenByView(nn.Module):
    """A conv net that flattens with .view(), which channels-last strides forbid."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(h.view(h.shape[0], -1))


def test_channels_last_copy_computes_the_same_function_and_leaves_the_model_alone():
    from trojanprune.engine.layout import channels_last_copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).train()
    x = torch.rand(6, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = channels_last_copy(model, x[:2])
    assert fast is not model
    assert fast[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous()  # the caller's model is not converted
    assert model.training and fast.training  # modes kept, running statistics untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval(), fast.eval()
    assert torch.allclose(model(x), fast(x), atol=1e-5)
    assert channels_last_copy(fast, x[:2]) is fast  # converted already: no second copy


def test_evaluator_runs_a_channels_last_copy_that_follows_the_live_weights():
    model, x = make("vgg_small")
    units = discover_units(model, x)
    masks = (torch.rand(3, units.total, generator=torch.Generator().manual_seed(4)) > 0.2).float()
    ev = MaskEvaluator(model, units, x)
    assert torch.allclose(ev.logits(masks), naive_logits(model, units, x, masks), atol=1e-5)
    assert ev._runner is not model  # the fast copy is in use ...
    assert model.features[0].weight.is_contiguous()  # ... and the model itself is not converted
    with torch.no_grad():  # a weight change anywhere must reach the copy
        model.features[0].weight.mul_(-1)
        [m for m in model.modules() if isinstance(m, nn.Linear)][-1].weight.mul_(2)
    assert torch.allclose(ev.logits(masks), naive_logits(model, units, x, masks), atol=1e-5)
    plain = MaskEvaluator(model, units, x, fast_layout=False)
    assert torch.allclose(plain.logits(masks), ev.logits(masks), atol=1e-5) and plain._runner is model
    # gradients asked of a model with trainable parameters come from the model itself
    module = sorted(ev._specs)[-1]
    ev.edited_logits(masks, module, lambda out, j0, j1: out).sum().backward()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0


def test_channels_last_copy_falls_back_where_it_would_break_or_not_help():
    from trojanprune.engine.layout import channels_last_copy

    viewing = _FlattenByView()
    assert channels_last_copy(viewing, torch.rand(2, 3, 8, 8)) is viewing  # .view() fails on the copy
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    assert channels_last_copy(mlp, torch.rand(2, 3, 2, 2)) is mlp  # no convolution to speed up


def one_change_masks(units, g: torch.Generator) -> torch.Tensor:
    """A pruning, a copy of it, tries that each change one of its channels (ONP's refinement
    and give-back ask for such masks, in unit order), three per group, and one unrelated mask."""
    base = (torch.rand(units.total, generator=g) > 0.2).float()
    tries = [base, base.clone()]
    for name in units.names:
        start, size = units.offset(name), units[name].size
        for c in sorted(torch.randperm(size, generator=g)[:3].tolist()):
            t = base.clone()
            t[start + c] = 1 - t[start + c]
            tries.append(t)
    tries.append((torch.rand(units.total, generator=g) > 0.5).float())
    return torch.stack(tries)


@pytest.mark.parametrize("arch", ["vgg_small", "resnet20", "inplace", "densenet", "convnext", "inception"])
def test_masks_that_agree_on_some_layers_share_them_and_give_the_same_logits(arch):
    """Inside sharing_agreeing_masks(), consecutive masks that differ from the others in one
    layer only run the network up to that layer once (MaskEvaluator._agreeing_parts): the
    same logits as one forward per mask, on plain, residual, in-place, concatenating and
    channels-last models, with branches and mask-indexed edits, each mask counted once; in
    any order; and nothing changes outside the context."""
    from odd_models import ARCHS as ODD

    torch.manual_seed(0)
    if arch == "inplace":
        model, x = _InplaceResidual().eval(), torch.rand(5, 3, 8, 8)
    elif arch in ODD:
        cls, side = ODD[arch]
        model, x = cls(), torch.rand(5, 3, side, side)
        model.train()
        with torch.no_grad():
            model(x)
        model.eval()
    else:
        model, x = make(arch)
        x = torch.rand(5, *x.shape[1:])
    _randomize_norms(model)
    units = discover_units(model, x[:1])
    g = torch.Generator().manual_seed(3)
    masks = one_change_masks(units, g)
    ev = MaskEvaluator(model, units, x, chunk=64)  # a few masks per forward
    parts = ev._agreeing_parts(as_group_masks(units, masks), len(masks))
    assert parts is not None and sum(1 for *_, common in parts if common) >= len(units.names)
    assert [p[0] for p in parts] == [0] + [p[1] for p in parts[:-1]] and parts[-1][1] == len(masks)
    calls = []
    original = ev._branches_fx
    ev._branches_fx = lambda *a, **k: calls.append(1) or original(*a, **k)
    got = ev.logits(masks)
    assert len(calls) == 1  # off by default: one call
    with sharing_agreeing_masks():
        shared = ev.logits(masks)
    assert len(calls) == 1 + len(parts) and ev.evaluations == 2 * len(masks)
    assert (shared - naive_logits(model, units, x, masks)).abs().max() < 1e-4
    assert (shared - got).abs().max() < 1e-4
    # in any order (fewer masks then share)
    shuffled = masks[torch.randperm(len(masks), generator=g)]
    with sharing_agreeing_masks():
        assert (ev.logits(shuffled) - naive_logits(model, units, x, shuffled)).abs().max() < 1e-4
    # branches, and an edit that reads its masks' indices (a different shift for each mask)
    module = units[units.names[len(units.names) // 2]].hook_points[0]

    def per_mask(out, j0, j1):
        return out + torch.arange(j0, j1, dtype=out.dtype).view(-1, *[1] * (out.dim() - 1)) / len(masks)

    plain_alone, edited_alone = ev.branch_logits(masks, module, [None, per_mask])
    with sharing_agreeing_masks():
        plain, edited = ev.branch_logits(masks, module, [None, per_mask])
    assert (plain - shared).abs().max() < 1e-5
    assert (edited - edited_alone).abs().max() < 1e-4 and (plain_alone - plain).abs().max() < 1e-4
    assert (edited - plain).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["densenet", "senet", "shufflenet", "shufflenet_v2", "convnext",
                                  "convnext_ln2d", "vit", "inception", "bn1d_64px", "shared_block"])
def test_odd_architectures_evaluated_hooked_and_zeroed_alike(arch):
    """On constructs our zoo lacks (concatenation, SE gates, channel shuffle, LayerNorm on
    channels-last tensors, attention, a block applied twice), the batched evaluator, the hooked
    model and the repaired (zeroed) copy compute the same function for every pruning, so what a
    defense measures is what it delivers."""
    import warnings

    from odd_models import ARCHS as ODD, logit_gaps

    cls, side = ODD[arch]
    torch.manual_seed(0)
    model = cls()
    x = torch.rand(6, 3, side, side)
    model.train()
    with torch.no_grad():
        model(x)  # BatchNorm statistics of the data, not the identity
    model.eval()
    _randomize_norms(model)
    with torch.no_grad():  # and affine LayerNorms that do not map a zero channel to zero
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    total = discover_units(model, x[:1]).total
    masks = (torch.rand(3, total, generator=torch.Generator().manual_seed(5)) > 0.3).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.fx cannot trace the ViT: the slower path is fine
        gaps = logit_gaps(model, x, masks)
    assert gaps["smallest_effect"] > 1e-4  # every mask did something
    assert gaps["evaluator_vs_hooked"] <= 1e-4
    assert gaps["hooked_vs_zeroed"] <= 1e-5, gaps


def test_pruning_shift_moves_only_what_the_pruning_changed():
    from trojanprune.engine.batchnorm import batchnorms, clean_statistics, pruning_shift, statistics_swapped

    model, _ = make("vgg_small")
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    units = discover_units(model, x[:1])
    norms = batchnorms(model)
    running = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in norms.items()}
    # Nothing pruned: nothing moves.
    same = pruning_shift(model, units, [], x)
    assert all(torch.allclose(same[n][0], running[n][0], atol=1e-5)
               and torch.allclose(same[n][1], running[n][1], rtol=1e-4) for n in norms)
    # One channel of the first conv group pruned: the group's own BN keeps its statistics; the
    # next BN moves by exactly the change in its clean statistics.
    first = units.groups[0].name
    pruned = [(first, 0)]
    shifted = pruning_shift(model, units, pruned, x)
    order = list(norms)
    own = units[first].mask_points
    before = clean_statistics(model, x)
    after = clean_statistics(apply_masks_permanently(model, units, pruned), x)
    later = order[1]
    assert not torch.allclose(shifted[later][0], running[later][0])
    expected = running[later][0] + after[later][0] - before[later][0]
    assert torch.allclose(shifted[later][0], expected, atol=1e-5)
    for n in order:
        if n in own:  # the pruned channel keeps its statistics; the others did not change
            assert torch.allclose(shifted[n][0], running[n][0], atol=1e-5)
    # Estimated alone, a layer sees the earlier ones normalize with their running statistics.
    alone = clean_statistics(model, x, layers={later})
    assert set(alone) == {later} and not torch.allclose(alone[later][0], before[later][0])
    # Swapped in place and restored; an evaluator sees the swap.
    ev = MaskEvaluator(model, units, x)
    keep = units.keep_mask(pruned)[None]
    plain = ev.logits(keep)
    with statistics_swapped(model, shifted):
        moved = ev.logits(keep)
        with torch.no_grad(), ChannelMasks(model, units, keep):
            direct = model(x)
    assert (moved - plain).abs().max() > 1e-3
    assert torch.allclose(moved[0], direct, atol=1e-4)
    assert all(torch.equal(m.running_mean, running[n][0]) and torch.equal(m.running_var, running[n][1])
               for n, m in norms.items())
    assert torch.allclose(ev.logits(keep), plain, atol=1e-5)


def test_channel_dim_of_a_layernorm_on_nchw_tensors():
    """torchvision's and timm's LayerNorm2d (an nn.LayerNorm subclass) keep channels in dim 1;
    a plain LayerNorm, and a subclass that works channels-last, keep them last. Finding out
    must not run the hooks a defense put on the module."""
    from odd_models import LayerNorm2d

    from trojanprune.engine.units import channel_dim

    class ChannelsLast(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    seen = []
    ln2d = LayerNorm2d(8)
    ln2d.register_forward_hook(lambda *args: seen.append(1))
    assert channel_dim(ln2d) == 1
    assert channel_dim(nn.LayerNorm(8)) == -1
    assert channel_dim(ChannelsLast(8)) == -1
    assert channel_dim(nn.BatchNorm2d(8)) == 1 and channel_dim(nn.Linear(8, 4)) == -1
    assert seen == []
