"""Trigger reverse, data reverse and MAD detection (trojanprune.reverse)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from trojanprune import data, models
from trojanprune.errors import ConfigError, DataError
from trojanprune.reverse import (ReversedTriggers, anomaly_index, detect_outlier, high_side_outliers,
                                 reverse_triggers, small_masks, synthesize)
from trojanprune.reverse.data import NO_BATCHNORM_WARNING


# -- detection ---------------------------------------------------------------------------------

def test_anomaly_index_matches_neural_cleanse_formula():
    norms = torch.tensor([10.0, 50, 52, 48, 55, 45, 51, 49, 53, 47])
    median = norms.median()
    mad = 1.4826 * (norms - median).abs().median()
    assert torch.allclose(anomaly_index(norms), (norms - median).abs() / mad)
    found = detect_outlier(norms)
    assert found.target == 0 and found.flagged == [0] and found.verdict == "backdoor detected"


def test_only_small_norms_are_flagged():
    # a class with a huge mask is an outlier too, but on the harmless side
    found = detect_outlier(torch.tensor([50.0, 52, 48, 300, 51, 49, 53, 47]))
    assert found.target is None and found.verdict == "no backdoor detected"
    assert float(found.anomaly_index[3]) > 2
    # the smallest of several flagged classes is the target
    found = detect_outlier(torch.tensor([5.0, 3.0, 50, 52, 48, 51, 49, 53, 47, 50]))
    assert found.flagged == [0, 1] and found.target == 1


def test_high_side_outliers_are_only_the_large_norms():
    norms = torch.tensor([5.0, 50, 52, 48, 300, 51, 49, 53, 47, 50])
    assert high_side_outliers(norms) == [4]
    assert detect_outlier(norms).flagged == [0]
    assert high_side_outliers(torch.tensor([50.0, 56, 44, 53, 47, 58, 42, 50, 55, 45])) == []
    with pytest.raises(ConfigError):
        high_side_outliers(norms, threshold=-1)


def test_feature_detection_compares_only_working_triggers():
    from trojanprune.reverse.feature import detect_working

    norms = torch.tensor([0.99, 0.99, 0.905, 0.98, 0.98, 0.978, 0.986, 0.985, 0.937, 0.964])
    # the MLP case: only classes 2 and 8 were reached; the plain test flags them
    reached = torch.tensor([0.0, 0, 1, 0, 0, 0, 0, 0, 1, 0])
    assert detect_outlier(norms).flagged == [2, 8]
    assert detect_working(norms, reached).flagged == []
    # every trigger works: the plain test
    works = torch.ones(10)
    assert detect_working(norms, works).flagged == detect_outlier(norms).flagged
    # a failed class is never flagged, however small its norm, and does not move the others
    small = torch.tensor([0.5, 5.0, 5.2, 4.8, 5.5, 4.5, 5.1, 4.9, 5.3, 4.7])
    failed_first = torch.tensor([0.2] + [1.0] * 9)
    assert detect_outlier(small).flagged == [0]
    assert detect_working(small, failed_first).flagged == []


def test_a_mask_a_third_of_the_median_is_flagged_however_wide_the_spread():
    # the pixel-space norms of benchmarks/unseen_models.py's GELU ResNet (target 3): the classes'
    # masks range from 20 to 162, so the target's, 8.7 times below the median, has MAD index 1.7
    gelu = torch.tensor([43.554, 162.286, 38.325, 5.027, 59.208, 43.862, 63.291, 71.563, 20.008, 48.918])
    assert float(anomaly_index(gelu)[3]) < 2
    assert detect_outlier(gelu, small_mask_ratio=None).flagged == []  # Neural Cleanse's test alone
    found = detect_outlier(gelu)
    assert found.flagged == [3] and found.target == 3
    # a class 2.2 times below the median (class 8 here) is not
    assert detect_outlier(gelu, small_mask_ratio=2.0).flagged == [3, 8]
    # CIFAR-10 vgg_small WaNet (benchmarks/results/onp-stop42): tight norms, the MAD flags two
    # classes, the rule adds none
    wanet = torch.tensor([49.049, 28.486, 42.413, 41.93, 43.246, 45.057, 44.488, 52.23, 46.637, 32.941])
    assert detect_outlier(wanet).flagged == detect_outlier(wanet, small_mask_ratio=None).flagged == [1, 9]
    # the feature-space test applies the rule to the working triggers only
    from trojanprune.reverse.feature import detect_working

    assert detect_working(gelu, torch.ones(10)).flagged == [3]
    assert detect_working(gelu, torch.tensor([1.0, 1, 1, 0.2, 1, 1, 1, 1, 1, 1])).flagged == []
    # a median of zero gives no scale: the rule flags nothing
    assert small_masks(torch.tensor([0.0, 0, 0, 5, 6])) == []


def test_detection_bad_input():
    with pytest.raises(ConfigError):
        anomaly_index(torch.tensor([1.0]))
    with pytest.raises(ConfigError):
        detect_outlier(torch.tensor([1.0, 2.0, 3.0]), threshold=0)
    for ratio in (1.0, 0.5, "3", True):
        with pytest.raises(ConfigError, match="small_mask_ratio"):
            detect_outlier(torch.tensor([1.0, 2.0, 3.0]), small_mask_ratio=ratio)


def test_both_defenses_read_the_small_mask_ratio_option_alike():
    from trojanprune.defenses import onp, shappruning
    from trojanprune.defenses.base import make_options

    for method, options in (("onp", onp.Options), ("shappruning", shappruning.Options)):
        assert options().small_mask_ratio == 3.0
        for off in ("off", "none", "", None):
            assert make_options(options, {"small_mask_ratio": off}, method).small_mask_ratio is None
        assert make_options(options, {"small_mask_ratio": "4"}, method).small_mask_ratio == 4.0
        with pytest.raises(ConfigError, match="small_mask_ratio takes a number or 'off'"):
            make_options(options, {"small_mask_ratio": "abc"}, method)
        with pytest.raises(ConfigError, match="small_mask_ratio must be a number above 1"):
            options(small_mask_ratio=1)


# -- trigger reverse ---------------------------------------------------------------------------

def test_apply_stamps_mask_and_pattern():
    masks = torch.zeros(2, 1, 4, 4)
    masks[1, :, :2, :2] = 1
    patterns = torch.ones(2, 3, 4, 4) * torch.tensor([0.0, 0.5]).view(2, 1, 1, 1)
    rev = ReversedTriggers(masks, patterns, masks.sum((1, 2, 3)), torch.ones(2), torch.zeros(2),
                           None, 0)
    x = torch.rand(5, 3, 4, 4)
    assert torch.equal(rev.apply(x, 0), x)
    out = rev.apply(x, 1)
    assert torch.all(out[..., :2, :2] == 0.5) and torch.equal(out[..., 2:, :], x[..., 2:, :])
    assert rev.apply(x[0], 1).shape == (3, 4, 4)
    with pytest.raises(ConfigError):
        rev.apply(x, 2)


def test_reverse_finds_the_backdoor_target_from_one_image_per_class(backdoor_case):
    few = data.clean_subset(backdoor_case.clean, per_class=1, seed=0)
    x, y = few.tensors()
    model = backdoor_case.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    rev = reverse_triggers(model, x, y, 10, steps=150, seed=0)
    assert rev.target == 0 and rev.verdict == "backdoor detected", str(rev.summary())
    assert rev.masks.shape == (10, 1, 28, 28) and rev.patterns.shape == (10, 1, 28, 28)
    assert rev.masks.min() >= 0 and rev.masks.max() <= 1
    assert torch.allclose(rev.mask_norms, rev.masks.sum((1, 2, 3)))
    # the target's trigger is tiny (the real one is a 3x3 patch) and works on the other images
    assert rev.mask_norms[0] < 20 and rev.mask_norms[0] == rev.mask_norms.min()
    assert rev.attack_success[0] >= 0.99 and float(rev.anomaly_index[0]) > 2
    assert rev.evaluations == rev.steps * 10 + 10
    with torch.no_grad():
        stamped = rev.apply(x[y != 0], 0)
        assert (model(stamped).argmax(1) == 0).float().mean() >= 0.99
    # the model is untouched: same weights, no gradient written into its parameters
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad)
               for g, p in zip(grads, model.parameters()))


def test_per_class_stop_freezes_each_class_as_it_settles(backdoor_case):
    """``per_class_stop``: a class that meets the early-stopping rule keeps its best mask and its
    pairs are no longer run (fewer class-steps than the batched run), as Neural Cleanse's
    per-class runs stop; the target is still found."""
    few = data.clean_subset(backdoor_case.clean, per_class=1, seed=0)
    x, y = few.tensors()
    frozen = reverse_triggers(backdoor_case.model, x, y, 10, steps=300, seed=0, per_class_stop=True)
    assert frozen.target == 0 and float(frozen.anomaly_index[0]) > 2, str(frozen.summary())
    assert frozen.evaluations < frozen.steps * 10 + 10, (frozen.evaluations, frozen.steps)
    assert frozen.attack_success[0] >= 0.99 and frozen.masks.max() <= 1


def test_reverse_of_chosen_classes_repeats_a_class_from_other_starts(backdoor_case):
    """``classes``: several triggers for one class (ShapPruning's trigger_pool), each from its
    own random start, each working, with no detection over them (they are not one per class)."""
    few = data.clean_subset(backdoor_case.clean, per_class=1, seed=0)
    x, y = few.tensors()
    model = backdoor_case.model
    rev = reverse_triggers(model, x, y, 10, classes=[0, 0], steps=150, seed=1)
    assert rev.masks.shape == (2, 1, 28, 28) and rev.target is None and rev.flagged == []
    assert not torch.allclose(rev.masks[0], rev.masks[1])  # two different stand-ins
    assert rev.evaluations == rev.steps * 2 + 2
    with torch.no_grad():
        for i in range(2):
            stamped = (1 - rev.masks[i]) * x[y != 0] + rev.masks[i] * rev.patterns[i]
            assert (model(stamped).argmax(1) == 0).float().mean() >= 0.9
            assert float(rev.attack_success[i]) >= 0.9
    for bad in ([], [10], [-1]):
        with pytest.raises(ConfigError, match="classes"):
            reverse_triggers(model, x, y, 10, classes=bad, steps=1)


def test_reverse_bad_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(3, 1, 4, 4), torch.arange(3)
    with pytest.raises(ConfigError):
        reverse_triggers(model, x, y, 1)
    with pytest.raises(DataError):
        reverse_triggers(model, x[:0], y[:0], 3)
    with pytest.raises(DataError):
        reverse_triggers(model, x, y[:2], 3)
    with pytest.raises(ConfigError):
        reverse_triggers(model, x, y, 3, cost_schedule="sometimes")
    # a tiny model runs end to end with the fixed cost
    rev = reverse_triggers(model, x, y, 3, steps=5, cost_schedule="fixed")
    assert rev.masks.shape == (3, 1, 4, 4) and rev.steps == 5


def _largest_grad_batch(model):
    """Records the largest batch ``model`` runs with gradients enabled (a reverse's passes)."""
    seen = [0]

    def hook(module, inputs):
        if torch.is_grad_enabled():
            seen[0] = max(seen[0], inputs[0].shape[0])

    model.register_forward_pre_hook(hook)
    return seen


def test_many_classes_reverse_in_passes_that_fit_and_give_the_one_pass_result():
    """A model with many classes must not need all (class, image) pairs in one pass: a step is
    split into passes of at most ``pass_images`` images whose gradients add up to the same
    step, so the triggers are those of one pass (to float rounding)."""
    from trojanprune.engine import discover_units
    from trojanprune.engine.memory import activation_bytes, images_per_pass
    from trojanprune.reverse import reverse_feature_triggers

    torch.manual_seed(0)
    k = 12
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, k)).eval()
    x, y = torch.rand(2 * k, 3, 8, 8), torch.arange(2 * k) % k
    kw = dict(steps=6, seed=0, cost_schedule="fixed", batch_size=2 * k)
    whole = reverse_triggers(model, x, y, k, pass_images=10_000, **kw)
    # the reverses run copies of the model, which keep its hooks; the head sees every pass
    inner = nn.Sequential(*model)
    seen = _largest_grad_batch(inner[-1])
    split = reverse_triggers(inner, x, y, k, pass_images=25, **kw)
    assert 0 < seen[0] <= 25  # 12 classes x 22 other-class images = 264 pairs, in 11 passes
    assert torch.allclose(split.masks, whole.masks, atol=1e-5)
    assert torch.allclose(split.patterns, whole.patterns, atol=1e-5)
    assert split.evaluations == whole.evaluations

    units = discover_units(model, x[:1])
    one = reverse_feature_triggers(model, units, x, y, k, steps=5, seed=0, pass_images=10_000)
    seen[0] = 0
    split = reverse_feature_triggers(inner, units, x, y, k, steps=5, seed=0, pass_images=3 * len(x))
    assert 0 < seen[0] <= 3 * len(x)  # whole classes: 3 of them per pass
    assert torch.allclose(split.masks, one.masks, atol=1e-6)
    assert torch.allclose(split.values, one.values, atol=1e-6)
    assert split.evaluations == one.evaluations
    # more images than batch_size: fixed batches, each holding every class, one per step, so a
    # step runs K x 8 images (not K x 24); counted like the pixel reverse, K per step
    seen[0] = 0
    dealt = reverse_feature_triggers(inner, units, x, y, k, steps=5, seed=0, batch_size=8)
    assert seen[0] == k * 8  # one pass: all classes of a batch of 8
    assert dealt.evaluations == one.evaluations and dealt.masks.shape == one.masks.shape
    assert not torch.allclose(dealt.masks, one.masks)  # other images per step: other steps
    # the default size: the budget over one image's activations
    assert images_per_pass(model, x, budget=10 * activation_bytes(model, x)) == 10
    with pytest.raises(ConfigError, match="pass_images"):
        reverse_triggers(model, x, y, k, pass_images=0)


# -- data reverse --------------------------------------------------------------------------------

def test_synthesized_images_are_classified_as_their_class(backdoor_case):
    syn = synthesize(backdoor_case.model, 10, (1, 28, 28), per_class=1, steps=150, seed=0)
    assert syn.x.shape == (10, 1, 28, 28) and syn.y.tolist() == list(range(10))
    assert syn.x.min() >= 0 and syn.x.max() <= 1
    assert syn.bn_layers == 6 and syn.warning is None
    assert syn.accuracy >= 0.9
    with torch.no_grad():
        assert (backdoor_case.model(syn.x).argmax(1) == syn.y).float().mean() == syn.accuracy


def test_reverses_optimize_inside_a_callers_no_grad():
    # under a caller's torch.no_grad() the data reverse once optimized only its image priors
    # and returned images of one class; every reverse must give what it gives outside
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 4
    plain = synthesize(model, 4, (3, 8, 8), per_class=2, steps=10, seed=0)
    triggers = reverse_triggers(model, x, y, 4, steps=5, seed=0)
    with torch.no_grad():
        inside = synthesize(model, 4, (3, 8, 8), per_class=2, steps=10, seed=0)
        triggers_inside = reverse_triggers(model, x, y, 4, steps=5, seed=0)
    assert torch.equal(inside.x, plain.x) and inside.accuracy == plain.accuracy
    assert torch.equal(triggers_inside.masks, triggers.masks)


def test_data_reverse_without_batchnorm_warns_and_falls_back():
    torch.manual_seed(0)
    model = models.create("lenet5", 10, 1, batch_norm=False).eval()
    with pytest.warns(RuntimeWarning, match="no BatchNorm"):
        syn = synthesize(model, 10, (1, 28, 28), per_class=1, steps=30, seed=0)
    assert syn.bn_layers == 0 and syn.warning == NO_BATCHNORM_WARNING
    assert syn.x.shape == (10, 1, 28, 28)


def test_data_reverse_with_many_classes_synthesizes_in_batches_that_fit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12)).eval()
    seen = _largest_grad_batch(model[0])
    whole = synthesize(model, 12, (3, 8, 8), per_class=2, steps=4, seed=0)
    assert seen[0] == 24 and whole.evaluations == 5  # everything fits: one batch
    seen[0] = 0
    split = synthesize(model, 12, (3, 8, 8), per_class=2, steps=4, seed=0, pass_images=5)
    assert seen[0] == 4  # batches of whole classes: 2 classes x 2 images
    assert split.evaluations == 6 * 5 and split.y.tolist() == whole.y.tolist()
    assert split.x.shape == whole.x.shape and split.x.min() >= 0 and split.x.max() <= 1


def test_data_reverse_bad_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ConfigError):
        synthesize(model, 1, (1, 4, 4))
    with pytest.raises(ConfigError):
        synthesize(model, 3, (4, 4))


# -- feature-space trigger reverse ----------------------------------------------------------------

def test_feature_reverse_writes_working_triggers(backdoor_case):
    """Mechanics only: on this small 2-epoch MNIST model the feature-space norms do not single
    out the target (its mask is among the smallest, index < 2); detection quality is measured
    on the CIFAR-10 zoo in BENCHMARKS.md, where it finds WaNet's and SIG's targets."""
    from trojanprune.engine import MaskEvaluator, discover_units
    from trojanprune.reverse import reverse_feature_triggers

    few = data.clean_subset(backdoor_case.clean, per_class=5, seed=0)
    x, y = few.tensors()
    model = backdoor_case.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    units = discover_units(model, x[:1])
    rev = reverse_feature_triggers(model, units, x, y, 10, steps=100, seed=0)
    assert rev.layer in units.names and rev.module in units[rev.layer].hook_points
    assert rev.masks.shape == (10, units[rev.layer].size) and rev.values.min() >= 0
    assert rev.masks.min() >= 0 and rev.masks.max() <= 1
    assert torch.allclose(rev.mask_norms, rev.masks.sum(1))
    # one pass to scale the values, two to see whether a ReLU follows, the steps, a final check
    assert rev.evaluations == 10 * rev.steps + 13
    assert rev.rectify is True and rev.channels is None  # a ReLU CNN: every BN output is rectified next
    assert bool((rev.attack_success >= 0.9).all())
    json.dumps(rev.summary())
    # the written-in trigger sends the other classes' images to its class ...
    ev = MaskEvaluator(model, units, x[y != 0])
    keep = torch.ones(2, units.total)
    top = rev.masks[0].topk(5).indices
    keep[1, units.offset(rev.layer) + top] = 0  # ... less strongly once its strongest channels are pruned
    logits = ev.edited_logits(keep, rev.module, rev.edit(0), grad=False)
    assert float((logits[0].argmax(-1) == 0).float().mean()) >= 0.9
    margin = logits[..., 0] - logits[..., 1:].amax(-1)
    assert float(margin[1].mean()) < float(margin[0].mean())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="not a unit group"):
        reverse_feature_triggers(model, units, x, y, 10, layer="nope", steps=1)
    with pytest.raises(DataError):
        reverse_feature_triggers(model, units, x[y == 3], y[y == 3], 10, steps=1)


class _DenseGelu(nn.Module):
    """A DenseNet-style concatenation, a GELU after the last BatchNorm and a linear head with a
    LayerNorm: the shapes on which the feature reverse once wrote the wrong channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.fc1 = nn.Linear(10, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.nn.functional.gelu(self.bn(torch.cat([x, self.conv(x)], 1)))
        return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x.mean((2, 3))))))


@pytest.mark.parametrize("layer", ["conv", "fc1"])
def test_feature_reverse_writes_only_the_groups_channels_and_leaves_other_activations(layer):
    """After a concatenation a group owns only some channels of its hook point; on a linear
    layer the channels are the last dim; where no ReLU follows, nothing is rectified, so a
    trigger with an all-zero mask leaves the model exactly as it is."""
    from trojanprune.engine import MaskEvaluator, discover_units
    from trojanprune.reverse import reverse_feature_triggers
    from trojanprune.reverse.feature import writer

    torch.manual_seed(0)
    model = nn.Sequential(_DenseGelu()).eval()
    x, y = torch.rand(12, 3, 8, 8), torch.arange(12) % 3
    units = discover_units(model, x[:1])
    group = units[f"0.{layer}"]
    rev = reverse_feature_triggers(model, units, x, y, 3, layer=group.name, steps=3, seed=0)
    assert rev.masks.shape == (3, group.size)
    assert rev.rectify is False  # GELU follows both hook points
    if layer == "conv":  # the conv's 4 channels are 6-9 of the BatchNorm that reads the concat
        assert rev.module == "0.bn" and rev.channels == (6, 7, 8, 9)
    ev = MaskEvaluator(model, units, x)
    ones = torch.ones(1, units.total)
    zero = torch.zeros_like(rev.masks)
    untouched = ev.edited_logits(ones, rev.module, writer(zero, rev.values, rev.channel_dim, rev.rectify,
                                                          0, rev.channels), grad=False)
    assert torch.allclose(untouched, ev.logits(ones), atol=1e-6)
    # a full mask changes only the group's channels: with the group pruned it changes nothing
    full = torch.ones_like(rev.masks)
    pruned = ones.clone()
    pruned[0, units.offset(group.name):units.offset(group.name) + group.size] = 0
    written = ev.edited_logits(pruned, rev.module, writer(full, rev.values, rev.channel_dim, rev.rectify,
                                                          0, rev.channels), grad=False)
    assert torch.allclose(written, ev.logits(pruned), atol=1e-6)


# -- warp reverse ----------------------------------------------------------------------------

def test_warp_moves_no_pixel_further_than_its_strength_allows():
    from trojanprune.reverse.warp import warp_images

    h, w = 16, 24
    ramp_x = torch.linspace(0, w - 1, w).expand(h, w)  # each pixel's own x coordinate
    ramp_y = torch.linspace(0, h - 1, h)[:, None].expand(h, w)
    image = torch.stack([ramp_x, ramp_y])[None]
    saturated = torch.full((2, 4, 4), 50.0)  # tanh = 1: the largest move the bound allows
    saturated[:, ::2] = -50.0
    for strength in (0.5, 1.0, 3.0):
        moved = warp_images(image, saturated, strength)[0] - image[0]
        inner = moved[:, 1:-1, 1:-1]  # the border is clamped
        # a bilinear sample of a ramp is the coordinate it was sampled at: the move itself
        assert float(inner.abs().max()) <= strength / 2 * (w - 1) / w + 1e-4
        assert float(inner.abs().max()) > strength / 4  # and it does move
    assert torch.allclose(warp_images(image, torch.zeros(2, 4, 4), 1.0), image, atol=1e-4)


def test_warp_reverse_flags_a_warping_backdoor_and_not_a_patch(wanet_case, backdoor_case):
    from trojanprune.reverse import reverse_warps

    x, y = wanet_case.clean.tensors()
    found = reverse_warps(wanet_case.model, x[:250], y[:250], 10, steps=30, seed=0)
    # the target's warp sends (nearly) every image there; no natural class's half-pixel warp does
    assert found.target == 0 and found.flagged == [0] and found.verdict == "backdoor detected"
    assert float(found.attack_success[0]) > 0.9
    assert float(found.attack_success[1:].max()) < 0.2
    # the stand-in works on images it was not fitted on
    held = x[250:][y[250:] != 0]
    assert float((wanet_case.model(found.apply(held, 0)).argmax(-1) == 0).float().mean()) > 0.9
    assert found.apply(held[0], 0).shape == held[0].shape
    assert found.displacement(0, (28, 28)).shape == (1, 28, 28)
    assert 0 <= float(found.displacement(0, (28, 28)).min()) <= float(found.displacement(0, (28, 28)).max()) <= 1
    again = reverse_warps(wanet_case.model, x[:250], y[:250], 10, steps=30, seed=0)
    assert torch.equal(again.controls, found.controls)
    json.dumps(found.summary())
    # a patch backdoor is not a warp: nothing flagged
    bx, by = backdoor_case.clean.tensors()
    patch = reverse_warps(backdoor_case.model, bx[:250], by[:250], 10, steps=30, seed=0)
    assert patch.target is None and patch.flagged == [], patch.summary()
    assert patch.suspect == int(patch.attack_success.argmax())


def test_warp_detection_needs_an_outlier_that_works():
    from trojanprune.reverse.warp import detect_warp_targets

    rates = torch.tensor([0.02, 0.01, 0.03, 0.0, 0.02, 0.01, 0.02, 0.04, 0.01, 0.02])
    _, flagged, target = detect_warp_targets(torch.cat([torch.tensor([0.3]), rates[1:]]))
    assert flagged == [] and target is None  # an outlier, but 30% is no backdoor
    _, flagged, target = detect_warp_targets(torch.cat([torch.tensor([0.95]), rates[1:]]))
    assert flagged == [0] and target == 0
    even = torch.tensor([0.9, 0.8, 0.85, 0.95, 0.9, 0.88, 0.92, 0.9, 0.87, 0.91])
    assert detect_warp_targets(even)[1] == []  # every class easy to reach: no outlier
    assert detect_warp_targets(torch.tensor([0.0, 1.0]))[1] == []  # two classes: no outlier


def test_warp_reverse_does_not_flag_a_class_the_model_predicts_without_a_warp():
    """A model that sends almost every input to one class needs no warp for it: detection is on
    the warp's lift over the unwarped rate, not on its success."""
    from trojanprune.reverse import reverse_warps

    torch.manual_seed(0)
    sink = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        sink[-1].bias.copy_(torch.tensor([5.0, 0, 0, 0, 0]))
    x, y = torch.rand(40, 3, 8, 8), torch.arange(40) % 5
    found = reverse_warps(sink, x, y, 5, steps=5)
    assert float(found.attack_success[0]) > 0.9 and float(found.base_rate[0]) > 0.9
    assert found.flagged == [] and found.target is None
    assert torch.allclose(found.lift, found.attack_success - found.base_rate)


def test_warp_reverse_bad_input():
    from trojanprune.reverse import reverse_warps

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ConfigError, match="at least 2 classes"):
        reverse_warps(model, x, y, 1)
    with pytest.raises(ConfigError, match="grid"):
        reverse_warps(model, x, y, 3, grid=1)
    with pytest.raises(ConfigError, match="strength"):
        reverse_warps(model, x, y, 3, strength=0)
    with pytest.raises(DataError, match="N, C, H, W"):
        reverse_warps(model, x.flatten(1), y, 3)
    with pytest.raises(DataError, match="other class"):
        reverse_warps(model, x, torch.zeros(6, dtype=torch.long), 3)
    small = reverse_warps(model, x, y, 3, steps=2)
    with pytest.raises(ConfigError, match="out of range"):
        small.apply(x, 3)
