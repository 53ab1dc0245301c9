import pytest
import torch

from trojanprune.data.dataset import ImageDataset
from trojanprune.metrics import der, evaluate


def test_der_hand_computed():
    # ASR 95% -> 2%, ACC 90% -> 87%: (0.93 - 0.03 + 1) / 2 = 0.95
    assert der(0.90, 0.87, 0.95, 0.02) == pytest.approx(0.95)
    # accuracy loss is subtracted, never added: a defense that only loses accuracy scores < 0.5
    assert der(0.90, 0.60, 0.95, 0.95) == pytest.approx(0.35)
    # gains in accuracy and rises in ASR are clipped at zero
    assert der(0.80, 0.85, 0.10, 0.50) == pytest.approx(0.5)
    assert der(0.9, 0.9, 1.0, 0.0) == pytest.approx(1.0)


def test_der_rejects_percentages():
    with pytest.raises(ValueError, match="fractions"):
        der(90.0, 87.0, 95.0, 2.0)


class FixedModel(torch.nn.Module):
    """Predicts class 0 when the top-left pixel is bright, else the image's mean-coded class."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3)
        cls = (x[:, 0, 1, 1] * 2.99).long()
        logits[torch.arange(x.shape[0]), cls] = 1.0
        logits[x[:, 0, 0, 0] > 0.9, 0] = 5.0
        return logits


class TopLeftTrigger:
    target = 0

    def asr_inputs(self, x, y):
        x = x.clone()
        x[:, :, 0, 0] = 1.0
        return x, torch.zeros_like(y), y != 0


def test_evaluate_acc_asr_ra():
    labels = torch.tensor([0, 1, 2, 1, 2, 0])
    images = torch.zeros(6, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 1, 1] = (labels.float() / 2.99 * 255 + 20).clamp(max=255).to(torch.uint8)
    images[3, 0, 1, 1] = 0  # one wrong clean prediction (class 1 seen as 0)
    ds = ImageDataset(images, labels, ["a", "b", "c"])
    m = evaluate(FixedModel(), ds, TopLeftTrigger())
    assert m["acc"] == pytest.approx(100 * 5 / 6)
    assert m["asr"] == pytest.approx(100.0)  # all 4 non-target images go to class 0
    assert m["ra"] == pytest.approx(0.0)


def test_evaluate_per_class_accuracy():
    labels = torch.tensor([0, 1, 2, 1, 2, 0])
    images = torch.zeros(6, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 1, 1] = (labels.float() / 2.99 * 255 + 20).clamp(max=255).to(torch.uint8)
    images[3, 0, 1, 1] = 0  # class 1 loses one of its two images
    m = evaluate(FixedModel(), ImageDataset(images, labels, ["a", "b", "c"]), per_class=True)
    assert m["acc_per_class"] == pytest.approx([100.0, 50.0, 100.0])
    # a class with no test image has no accuracy (NaN), not 0
    m = evaluate(FixedModel(), ImageDataset(images, labels, ["a", "b", "c", "d"]), per_class=True)
    assert m["acc_per_class"][3] != m["acc_per_class"][3]
