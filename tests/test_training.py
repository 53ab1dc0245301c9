import torch
from safetensors.torch import save_file

from trojanprune import models
from trojanprune.data.dataset import ImageDataset
from trojanprune.training import TrainConfig, train


def _tiny_set(n=64):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    images[labels == 1, 0] = 255  # a learnable signal per class
    images[labels == 2, 1] = 255
    images[labels == 3, 2] = 255
    return ImageDataset(images, labels, classes=list("abcd"))


def _train(channels_last, seed=0):
    torch.manual_seed(0)
    model = models.create("resnet20", 4, 3)
    stats = train(model, _tiny_set(), TrainConfig(epochs=2, lr=0.05, batch_size=16, seed=seed,
                                                  channels_last=channels_last), progress=False)
    return model, stats


def test_channels_last_training_leaves_ordinary_contiguous_weights(tmp_path):
    model, stats = _train(channels_last=True)
    assert stats["config"]["channels_last"] is True
    state = model.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    save_file(state, str(tmp_path / "m.safetensors"))  # refuses non-contiguous tensors


def test_channels_last_learns_the_same_model_as_nchw():
    nhwc, _ = _train(channels_last=True)
    nchw, _ = _train(channels_last=False)
    x = _tiny_set().images.float() / 255
    with torch.no_grad():
        a, b = nhwc(x), nchw(x)
    # Same seed and data order: only the summation order of the convolutions differs.
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.9
    assert torch.allclose(a, b, atol=0.5)


def test_training_is_seeded():
    a, _ = _train(channels_last=True, seed=3)
    b, _ = _train(channels_last=True, seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
