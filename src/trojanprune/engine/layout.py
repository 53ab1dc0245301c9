"""A faster memory layout for the gradient-heavy optimizations: channels-last on CPU (ours).

The trigger reverses and the data reverse run hundreds of forward and backward passes of one
fixed model over a batch of images, and :class:`~trojanprune.engine.MaskEvaluator` thousands of
forward passes of masked copies of it. PyTorch's CPU convolutions (oneDNN) run those faster when
the weights are stored channels-last (NHWC): with the model's weights converted, the
convolutions take NHWC paths whatever the layout of the input. Measured on this project's
2-core CPU (``benchmarks/layout_speed.py``, BENCHMARKS.md): one forward and backward pass over
320 CIFAR-sized images, ``vgg_small`` 1.06 s -> 0.71 s, ``resnet20`` 1.06 s -> 0.79 s.

This is an implementation detail, no part of any method: the copy computes the same function,
up to the order of floating-point sums (logits agree to ~1e-5 on the zoo models). Used only
where it is safe to get it wrong: on a *copy* (the caller's model is never converted) and only
when the copy gives the same answers as the original on a sample batch. A model whose forward
pass breaks on channels-last tensors (``x.view(n, -1)`` after a convolution does, on anything
larger than 1x1) or disagrees is used as it is. On CUDA the model is used as it is too: the
speed-up was measured on CPU only.
"""

from __future__ import annotations


import torch
from torch import nn

from ..utils import copy_model, model_device

#: largest |difference| of the copy's outputs, relative to the largest |output|, still "the same"
AGREEMENT_TOLERANCE = 1e-4


def channels_last_copy(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """A channels-last copy of ``model`` for repeated passes over images like ``sample``
    (N, C, H, W), or ``model`` itself where the copy would not help or not agree (see module
    docstring). The copy is in the original's train/eval mode; ``sample`` is a few images."""
    if (not isinstance(sample, torch.Tensor) or sample.dim() != 4
            or model_device(model).type != "cpu"
            or not any(isinstance(m, nn.Conv2d) for m in model.modules())):
        return model
    if all(m.weight.is_contiguous(memory_format=torch.channels_last)
           for m in model.modules() if isinstance(m, nn.Conv2d)):
        return model  # converted already (e.g. a copy made by this function): nothing to gain
    try:
        fast = copy_model(model).to(memory_format=torch.channels_last)
    except Exception:  # noqa: BLE001 - a model that cannot be copied is simply used as it is
        return model
    # Compare in eval mode: train-mode BatchNorm would update both models' running statistics.
    modes = {m: m.training for m in model.modules()}
    model.eval()
    fast.eval()
    try:
        with torch.no_grad():
            want = model(sample)
            got = fast(sample)
        if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
                and want.shape == got.shape):
            return model
        scale = float(want.abs().max()) or 1.0
        if not float((want - got).abs().max()) <= AGREEMENT_TOLERANCE * scale:
            return model
    except Exception:  # noqa: BLE001 - e.g. a .view() that channels-last strides forbid
        return model
    finally:
        for module, flag in modes.items():
            module.training = flag
    for original, converted in zip(model.modules(), fast.modules()):
        converted.training = original.training
    return fast


__all__ = ["AGREEMENT_TOLERANCE", "channels_last_copy"]
