"""The two trigger families that benchmarks/unseen_models.py defines for itself (not in the
attack registry): they must be pure functions of the image, as every attack here, and change
images the way their docstrings say, or the benchmark measures something else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from unseen_models import CASES, LOCAL_ATTACKS, LowFrequency, SampleNoise  # noqa: E402


def _images(n=6, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls, options", [(LowFrequency, dict(eps=0.15, cutoff=3)),
                                          (SampleNoise, dict(eps=0.1))])
def test_trigger_is_a_pure_bounded_function_of_the_image(cls, options):
    x = _images()
    before = x.clone()
    attack = cls((1, 28, 28), 10, target=4, seed=0, **options)
    out = attack.apply(x)
    assert torch.equal(x, before), "the trigger modified its input"
    assert torch.equal(out, attack.apply(x.clone())), "the same image gave two triggers"
    assert torch.equal(out[2], attack.apply(x[2])), "an image's trigger depends on its batch"
    assert float((out - x).abs().max()) <= options["eps"] + 1e-6
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    rebuilt = cls((1, 28, 28), 10, target=4, seed=0, **options)
    assert torch.equal(out, rebuilt.apply(x)), "the trigger is not fixed by the attack's seed"


def test_low_frequency_pattern_is_one_smooth_change_for_every_image():
    attack = LowFrequency((1, 28, 28), 10, target=4, seed=0, eps=0.15, cutoff=3)
    x = torch.full((2, 1, 28, 28), 0.5)  # mid-grey: nothing is clipped
    delta = attack.apply(x) - x
    assert torch.allclose(delta[0], delta[1])
    spectrum = torch.fft.fft2(delta[0, 0]).abs()
    freq = torch.fft.fftfreq(28) * 28
    high = (freq.abs().view(-1, 1) > 3) | (freq.abs().view(1, -1) > 3)
    assert float(spectrum[high].max()) < 1e-3 * float(spectrum.max())


def test_sample_noise_differs_between_images_and_moves_every_pixel():
    attack = SampleNoise((1, 28, 28), 10, target=4, seed=0, eps=0.1)
    x = torch.full((3, 1, 28, 28), 0.5)
    x[1, 0, 0, 0] = 0.6  # two images that differ in one pixel get different noise
    x[2, 0, 0, 0] = 0.7
    delta = attack.apply(x) - x
    assert torch.allclose(delta.abs(), torch.full_like(delta, 0.1), atol=1e-6)
    assert (delta[0] != delta[1]).float().mean() > 0.3
    assert (delta[1] != delta[2]).float().mean() > 0.3


def test_every_case_names_a_known_attack():
    from trojanprune import attacks
    for name, spec in CASES.items():
        assert spec["attack"] in LOCAL_ATTACKS or spec["attack"] in attacks.available(), name
