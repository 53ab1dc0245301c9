"""Attacks: triggers are pure, deterministic, rebuildable; poisoning follows BackdoorBench."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from trojanprune import attacks
from trojanprune.attacks import to_uint8
from trojanprune.data.dataset import ImageDataset
from trojanprune.errors import ConfigError, DataError

SHAPES = [(3, 32, 32), (1, 28, 28)]
NAMES = ["badnets", "blended", "sig", "wanet"]


def make_dataset(shape, n=100, num_classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % num_classes  # exactly n / K images per class
    return ImageDataset(images, labels, [str(i) for i in range(num_classes)], "synthetic")


def make_images(shape, n=8, seed=1):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ every attack


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_apply_is_pure_deterministic_and_rebuildable(name, shape):
    attack = attacks.create(name, shape, 10, seed=3)
    x = make_images(shape)
    before = x.clone()
    out = attack.apply(x)
    assert torch.equal(x, before), "input modified"
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x), "trigger changed nothing"
    assert torch.equal(attack.apply(x), out)
    # run.json stores config(); a JSON round trip must rebuild the same trigger
    cfg = json.loads(json.dumps(attack.config()))
    assert cfg == attack.config()
    rebuilt = attacks.from_config(cfg)
    assert type(rebuilt) is type(attack) and rebuilt.config() == attack.config()
    assert torch.equal(rebuilt.apply(x), out)
    # a single CHW image gives the same as its batch row
    assert torch.equal(attack.apply(x[2]), out[2])


@pytest.mark.parametrize("name", NAMES)
def test_apply_follows_dtype_and_device(name):
    attack = attacks.create(name, (3, 32, 32), 10)
    x = make_images((3, 32, 32))
    out64 = attack.apply(x.double())
    assert out64.dtype == torch.float64
    assert torch.allclose(out64.float(), attack.apply(x), atol=1e-5)
    if torch.cuda.is_available():
        out_cuda = attack.apply(x.cuda())
        assert out_cuda.is_cuda
        assert torch.allclose(out_cuda.cpu(), attack.apply(x), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_config_records_everything(name):
    attack = attacks.create(name, (1, 28, 28), 7, target=4, seed=11)
    cfg = attack.config()
    assert cfg["name"] == name and cfg["image_shape"] == [1, 28, 28]
    assert (cfg["num_classes"], cfg["target"], cfg["mode"], cfg["seed"]) == (7, 4, "all-to-one", 11)
    assert isinstance(cfg["options"], dict)


def test_different_seed_different_random_trigger():
    x = make_images((3, 32, 32))
    for name in ("blended", "wanet"):
        a = attacks.create(name, (3, 32, 32), 10, seed=0)
        b = attacks.create(name, (3, 32, 32), 10, seed=1)
        assert not torch.equal(a.apply(x), b.apply(x))


def test_unknown_attack_lists_valid_names():
    with pytest.raises(ConfigError, match="badnets.*blended.*sig.*wanet"):
        attacks.create("trojannet", (3, 32, 32), 10)
    with pytest.raises(ConfigError, match="valid attacks"):
        attacks.from_config({"name": "nope", "image_shape": [3, 32, 32], "num_classes": 10})


def test_unknown_option_lists_valid_options():
    with pytest.raises(ConfigError, match=r"'alpah'.*valid options: alpha, pattern_path"):
        attacks.create("blended", (3, 32, 32), 10, alpah=0.1)


@pytest.mark.parametrize("kwargs", [dict(target=10), dict(target=-1), dict(mode="one-to-one"),
                                    dict(num_classes=1)])
def test_invalid_settings(kwargs):
    args = dict(name="badnets", image_shape=(3, 32, 32), num_classes=10) | kwargs
    with pytest.raises(ConfigError):
        attacks.create(**args)


@pytest.mark.parametrize("name", ["blended", "sig", "wanet"])
def test_all_to_all_only_for_badnets(name):
    with pytest.raises(ConfigError, match="badnets"):
        attacks.create(name, (3, 32, 32), 10, mode="all-to-all")


def test_bad_inputs_are_data_errors():
    attack = attacks.create("badnets", (3, 32, 32), 10)
    with pytest.raises(DataError, match="float"):
        attack.apply(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(DataError, match="shape"):
        attack.apply(torch.zeros(2, 1, 32, 32))
    with pytest.raises(DataError):
        attack.poison(make_dataset((1, 28, 28)))


# ------------------------------------------------------------------ labels and ASR inputs


def test_target_labels_and_asr_inputs_all_to_one():
    attack = attacks.create("blended", (3, 32, 32), 10, target=3)
    x, y = make_images((3, 32, 32), n=20), torch.arange(20) % 10
    assert torch.equal(attack.target_labels(y), torch.full((20,), 3))
    xt, yt, keep = attack.asr_inputs(x, y)
    assert torch.equal(keep, y != 3) and keep.sum() == 18
    assert torch.equal(yt, torch.full((20,), 3))
    assert torch.equal(xt, attack.apply(x))


def test_target_labels_and_asr_inputs_all_to_all():
    attack = attacks.create("badnets", (3, 32, 32), 10, mode="all-to-all")
    y = torch.arange(20) % 10
    assert torch.equal(attack.target_labels(y), (y + 1) % 10)
    _, yt, keep = attack.asr_inputs(make_images((3, 32, 32), n=20), y)
    assert keep.all() and torch.equal(yt, (y + 1) % 10)


# ------------------------------------------------------------------ BadNets


@pytest.mark.parametrize("shape", SHAPES)
def test_badnets_changes_only_the_patch(shape):
    attack = attacks.create("badnets", shape, 10)
    x = make_images(shape) * 0.9  # no pixel is already white
    out = attack.apply(x)
    _, h, w = shape
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[h - 3:, w - 3:] = True  # BackdoorBench: 3x3 at the very bottom-right corner
    assert torch.equal(out[..., ~inside], x[..., ~inside])
    assert (out[..., inside] == 1).all()


@pytest.mark.parametrize("position, corner", [("top-left", (0, 0)), ("top-right", (0, 28)),
                                              ("bottom-left", (28, 0)), ("center", (14, 14)),
                                              ((5, 7), (5, 7))])
def test_badnets_positions(position, corner):
    attack = attacks.create("badnets", (3, 32, 32), 10, position=position, patch_size=4)
    changed = (attack.apply(torch.zeros(1, 3, 32, 32)) != 0).any(dim=1)[0]
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert (rows.min().item(), cols.min().item()) == corner
    assert changed.sum() == 16


def test_badnets_colours():
    x = torch.full((1, 3, 32, 32), 0.5)
    board = attacks.create("badnets", (3, 32, 32), 10, colour="checkerboard").apply(x)
    assert board[0, :, 29, 29].tolist() == [1, 1, 1] and board[0, :, 29, 30].tolist() == [0, 0, 0]
    red = attacks.create("badnets", (3, 32, 32), 10, colour=(1, 0, 0)).apply(x)
    assert red[0, :, 31, 31].tolist() == [1, 0, 0]
    with pytest.raises(ConfigError, match="255"):
        attacks.create("badnets", (3, 32, 32), 10, colour=(255, 0, 0))
    with pytest.raises(ConfigError, match="does not fit"):
        attacks.create("badnets", (3, 32, 32), 10, position=(30, 30))


@pytest.mark.parametrize("shape", SHAPES)
def test_badnets_poison_rate_and_labels(shape):
    ds = make_dataset(shape)
    images_before, labels_before = ds.images.clone(), ds.labels.clone()
    attack = attacks.create("badnets", shape, 10, target=0)
    poisoned, index = attack.poison(ds, rate=0.1, seed=0)
    assert torch.equal(ds.images, images_before) and torch.equal(ds.labels, labels_before)
    assert len(index) == round(0.1 * len(ds)) == 10 and len(set(index.tolist())) == 10
    assert torch.equal(index, index.sort().values)
    assert (poisoned.labels[index] == 0).all()
    others = torch.ones(len(ds), dtype=torch.bool)
    others[index] = False
    assert torch.equal(poisoned.labels[others], ds.labels[others])
    assert torch.equal(poisoned.images[others], ds.images[others])
    x = ds.images[index].float() / 255
    assert torch.equal(poisoned.images[index], to_uint8(attack.apply(x)))
    assert poisoned.meta["attack"] == attack.config()
    assert poisoned.meta["poison"]["num_poisoned"] == 10
    # the data seed fixes the choice
    assert torch.equal(attack.poison(ds, rate=0.1, seed=0)[1], index)
    assert not torch.equal(attack.poison(ds, rate=0.1, seed=1)[1], index)


def test_badnets_all_to_all_poison_shifts_labels():
    ds = make_dataset((3, 32, 32))
    attack = attacks.create("badnets", (3, 32, 32), 10, mode="all-to-all")
    poisoned, index = attack.poison(ds, rate=0.2)
    assert len(index) == 20
    assert torch.equal(poisoned.labels[index], (ds.labels[index] + 1) % 10)


# ------------------------------------------------------------------ Blended


@pytest.mark.parametrize("shape", SHAPES)
def test_blended_is_an_alpha_mix(shape):
    attack = attacks.create("blended", shape, 10, alpha=0.2)
    x = make_images(shape)
    diff = attack.apply(x) - x
    assert torch.allclose(diff, 0.2 * (attack.pattern - x), atol=1e-6)


def test_blended_pattern_from_file(tmp_path):
    from PIL import Image

    path = tmp_path / "key.png"
    grad = torch.linspace(0, 255, 64).round().to(torch.uint8)
    rgb = torch.stack([grad[None, :].expand(64, 64), grad[:, None].expand(64, 64),
                       torch.full((64, 64), 128, dtype=torch.uint8)], dim=-1)
    Image.fromarray(rgb.numpy()).save(path)
    attack = attacks.create("blended", (3, 32, 32), 10, pattern_path=str(path))
    assert attack.pattern.shape == (3, 32, 32)
    assert attack.pattern[0, 0, 0] < attack.pattern[0, 0, -1]  # horizontal ramp kept
    gray = attacks.create("blended", (1, 28, 28), 10, pattern_path=str(path))
    assert gray.pattern.shape == (1, 28, 28)
    cfg = json.loads(json.dumps(attack.config()))
    x = make_images((3, 32, 32))
    assert torch.equal(attacks.from_config(cfg).apply(x), attack.apply(x))
    Image.fromarray(255 - rgb.numpy()).save(path)  # the key changed after the run
    with pytest.raises(ConfigError, match="changed"):
        attacks.from_config(cfg)
    with pytest.raises(ConfigError, match="cannot read"):
        attacks.create("blended", (3, 32, 32), 10, pattern_path=str(tmp_path / "missing.png"))


# ------------------------------------------------------------------ SIG


@pytest.mark.parametrize("shape", SHAPES)
def test_sig_is_a_column_signal(shape):
    attack = attacks.create("sig", shape, 10)
    delta = attack.options.delta / 255
    x = make_images(shape)
    diff = attack.apply(x) - x
    assert diff.abs().max() <= delta + 1e-6
    # on mid-grey nothing clips: the change depends on the column only, and is the formula
    grey = torch.full((2, *shape), 0.5)
    d = attack.apply(grey) - grey
    w = shape[2]
    expected = torch.tensor([delta * math.sin(2 * math.pi * j * 6 / w) for j in range(w)])
    assert torch.allclose(d, expected.expand_as(d), atol=1e-6)
    assert torch.equal(d, d[:1, :1, :1, :].expand_as(d))


def test_sig_poison_is_clean_label():
    ds = make_dataset((3, 32, 32))
    attack = attacks.create("sig", (3, 32, 32), 10, target=2)
    poisoned, index = attack.poison(ds, rate=0.1, seed=0)
    assert torch.equal(poisoned.labels, ds.labels)
    assert (ds.labels[index] == 2).all() and len(index) == 10
    changed = (poisoned.images != ds.images).flatten(1).any(dim=1)
    assert (ds.labels[changed] == 2).all()
    assert torch.equal(torch.nonzero(changed).flatten(), index)
    assert poisoned.meta["poison"]["labels_changed"] is False


def test_sig_poison_caps_at_target_class_with_warning():
    ds = make_dataset((1, 28, 28))
    attack = attacks.create("sig", (1, 28, 28), 10)
    with pytest.warns(UserWarning, match="only 10 are eligible"):
        _, index = attack.poison(ds, rate=0.3)
    assert len(index) == 10 and (ds.labels[index] == 0).all()


# ------------------------------------------------------------------ WaNet


def _paper_grid(seed, k, s, h, grid_rescale=1.0):
    """The warping grid as written in the WaNet / BackdoorBench code (square images)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ins = torch.rand(1, 2, k, k) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    noise_grid = F.interpolate(ins, size=h, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    array1d = torch.linspace(-1, 1, steps=h)
    x, y = torch.meshgrid(array1d, array1d, indexing="ij")
    identity_grid = torch.stack((y, x), 2)[None, ...]
    grid_temps = (identity_grid + s * noise_grid / h) * grid_rescale
    return torch.clamp(grid_temps, -1, 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_wanet_grid_matches_the_paper(shape):
    attack = attacks.create("wanet", shape, 10, seed=5)
    assert torch.allclose(attack.grid, _paper_grid(5, 4, 0.5, shape[1]), atol=1e-6)
    x = make_images(shape)
    expected = F.grid_sample(x, attack.grid.repeat(len(x), 1, 1, 1), align_corners=True)
    assert torch.allclose(attack.apply(x), expected, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_wanet_is_a_small_warp(shape):
    _, h, w = shape
    attack = attacks.create("wanet", shape, 10)
    identity = attacks.create("wanet", shape, 10, s=0.0)
    x = make_images(shape)
    assert torch.allclose(identity.apply(x), x, atol=1e-5)
    # displacement in pixels stays around one pixel (s = 0.5, |ins| averages 1)
    shift = (attack.grid - identity.grid) * torch.tensor([(w - 1) / 2, (h - 1) / 2])
    assert 0.05 < shift.abs().mean() < 1.0 and shift.abs().max() < 2.0
    # on a smooth image a sub-pixel warp changes values only a little
    ramp = torch.linspace(0, 1, w).expand(1, shape[0], h, w).contiguous()
    out = attack.apply(ramp)
    assert 0 < (out - ramp).abs().max() < 2.5 / (w - 1)


def test_wanet_poison_backdoor_and_noise_sets():
    ds = make_dataset((3, 32, 32))
    attack = attacks.create("wanet", (3, 32, 32), 10, target=0)
    poisoned, index = attack.poison(ds, rate=0.1, seed=0)
    info = poisoned.meta["poison"]
    assert len(index) == info["num_poisoned"] == 10 and info["num_noise"] == 20
    assert (poisoned.labels[index] == 0).all()
    assert torch.equal(poisoned.images[index], to_uint8(attack.apply(ds.images[index] / 255)))
    changed = (poisoned.images != ds.images).flatten(1).any(dim=1)
    changed[index] = False
    noise = torch.nonzero(changed).flatten()
    assert len(noise) == 20  # random uint8 images: every warp changes some pixel
    assert torch.equal(poisoned.labels[noise], ds.labels[noise])
    # noise images carry the jittered warp, not the exact trigger
    assert not torch.equal(poisoned.images[noise], to_uint8(attack.apply(ds.images[noise] / 255)))
    again, index2 = attack.poison(ds, rate=0.1, seed=0)
    assert torch.equal(index2, index) and torch.equal(again.images, poisoned.images)


def test_wanet_noise_set_is_capped():
    ds = make_dataset((1, 28, 28))
    attack = attacks.create("wanet", (1, 28, 28), 10, cross_ratio=5)
    with pytest.warns(UserWarning, match="noise images"):
        poisoned, index = attack.poison(ds, rate=0.3)
    assert len(index) == 30 and poisoned.meta["poison"]["num_noise"] == 70
