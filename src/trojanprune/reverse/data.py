"""Data reverse: synthesize a few images per class from the model alone (DeepInversion-style).

ShapPruning (Guan et al., CVPR 2022) works without any clean image: its "data reverse" stage
makes inputs from the model. The paper does not publish the procedure; ours follows
DeepInversion (Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion", CVPR 2020): optimize a batch of images so that

    CE(f(x), y)                                       each image is confidently its class y
  + bn_weight * sum_l (|mu_l(x) - mu_l|_2 + |var_l(x) - var_l|_2)
                                                      the batch statistics at the input of
                                                      every BatchNorm layer match its running
                                                      mean / variance (the training data's)
  + tv_weight * TV(x) + l2_weight * |x|^2             image priors (smoothness, small energy)

with random jitter (a cyclic shift of up to ``jitter`` pixels per step, as DeepInversion) and
the images kept in [0, 1] (projected after each Adam step). All classes are synthesized in one
batch, so the BatchNorm statistics are matched by a batch that covers every class; only where
that batch would not fit in memory (hundreds of classes) are the classes split into batches
that each match the statistics by themselves.

A model without BatchNorm has no training statistics to match: :func:`synthesize` then warns
(``RuntimeWarning``) and falls back to class confidence + priors alone (plain model inversion),
whose images are far less natural; the result records ``bn_layers == 0`` and the warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..defenses.base import check_finite
from ..engine.layout import channels_last_copy
from ..engine.memory import images_per_pass
from ..errors import ConfigError
from ..progress import progress_bar
from ..utils import model_device

NO_BATCHNORM_WARNING = ("data reverse: the model has no BatchNorm layer, so there are no training "
                        "statistics to match; synthesizing from class confidence and image priors "
                        "only (images will look less natural and the repair may be weaker; pass a "
                        "few clean images if you have them)")


@dataclass
class SynthesizedData:
    """Synthesized images (in [0, 1]) and the labels they were made for."""

    x: torch.Tensor            # (N, C, H, W)
    y: torch.Tensor            # (N,)
    accuracy: float            # fraction the model classifies as their label
    confidence: float          # mean softmax probability of the label
    bn_layers: int             # BatchNorm layers whose statistics were matched
    bn_loss: float             # final BatchNorm-statistics loss (0 without BatchNorm; the mean
                               # over the batches where the classes did not fit in one)
    steps: int
    evaluations: int           # forward/backward passes over the synthetic batch(es)
    warning: str | None = None

    def summary(self) -> dict:
        return {"images": int(len(self.x)), "accuracy": round(self.accuracy, 4),
                "confidence": round(self.confidence, 4), "bn_layers": self.bn_layers,
                "bn_loss": round(self.bn_loss, 4), "steps": self.steps, "warning": self.warning}


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers with running statistics (the ones data reverse can match)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


@torch.enable_grad()  # optimizes inputs: the caller's no_grad must not cut the graph
def synthesize(model: nn.Module, num_classes: int, image_shape, per_class: int = 2, *,
               steps: int = 400, lr: float = 0.1, bn_weight: float = 1.0,
               tv_weight: float = 1e-3, l2_weight: float = 1e-5, jitter: int = 2,
               seed: int = 0, device=None, progress: bool = False,
               pass_images: int | None = None) -> SynthesizedData:
    """Synthesize ``per_class`` images of every class from ``model`` (see module docstring).

    Args:
        model: classifier on [0, 1] images; not modified (eval mode, no parameter gradients).
        num_classes: classes to synthesize (0..K-1).
        image_shape: (C, H, W) of the model's inputs.
        per_class: images per class.
        steps, lr: Adam steps and learning rate on the pixels.
        bn_weight, tv_weight, l2_weight: weights of the BatchNorm-statistics loss and priors.
        jitter: largest random cyclic shift (pixels) applied before each forward pass.
        pass_images: at most this many images per forward/backward pass. When all K x
            ``per_class`` images do not fit, the classes are synthesized in consecutive batches
            of whole classes, each matching the BatchNorm statistics by itself (as DeepInversion
            synthesizes batch by batch). None: as many as fit the memory budget
            (:mod:`trojanprune.engine.memory`); with few classes that is one batch.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"data reverse needs a model with at least 2 classes, got {num_classes}")
    if per_class < 1 or steps < 1 or lr <= 0 or jitter < 0 or (pass_images is not None and pass_images < 1):
        raise ConfigError("synthesize: per_class, steps, lr and pass_images must be positive, jitter >= 0")
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"image_shape must be (C, H, W), got {image_shape!r}")
    device = torch.device(device) if device is not None else model_device(model)
    gen = torch.Generator().manual_seed(int(seed))
    y = torch.arange(num_classes).repeat_interleave(per_class).to(device)
    x = torch.rand((len(y),) + shape, generator=gen).to(device)
    model = channels_last_copy(model, x[:8])  # same function, faster on CPU (engine/layout.py)
    per_batch = per_class * max(1, (pass_images or images_per_pass(model, x)) // per_class)

    layers = batchnorm_layers(model)
    warning = None
    if not layers:
        warning = NO_BATCHNORM_WARNING
        warnings.warn(warning, RuntimeWarning, stacklevel=2)
    stats: list[torch.Tensor] = []

    def hook(module, inputs):
        inp = inputs[0]
        dims = [d for d in range(inp.dim()) if d != 1]
        mean = inp.mean(dims)
        var = inp.var(dims, unbiased=False)
        stats.append(torch.linalg.vector_norm(mean - module.running_mean)
                     + torch.linalg.vector_norm(var - module.running_var))

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    flags = {m: m.training for m in model.modules()}
    model.eval()
    evaluations = 0
    made, batch_probs, final_bn = [], [], 0.0
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("data reverse", total=steps * -(-len(y) // per_batch))
            for start in range(0, len(y), per_batch):
                xb = x[start:start + per_batch].clone().requires_grad_(True)
                yb = y[start:start + per_batch]
                opt = torch.optim.Adam([xb], lr=lr, betas=(0.5, 0.9))
                for _ in range(steps):
                    stats.clear()
                    inp = xb
                    if jitter > 0:
                        dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
                        inp = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
                    with torch.enable_grad():
                        logits = model(inp)
                        ce = F.cross_entropy(logits, yb)
                        bn_loss = torch.stack(stats).sum() if stats else torch.zeros((), device=device)
                        tv = ((xb[..., 1:, :] - xb[..., :-1, :]).pow(2).mean()
                              + (xb[..., :, 1:] - xb[..., :, :-1]).pow(2).mean())
                        loss = ce + bn_weight * bn_loss + tv_weight * tv + l2_weight * xb.pow(2).sum() / len(xb)
                    check_finite(loss.detach(), "data reverse")
                    (grad,) = torch.autograd.grad(loss, [xb])
                    xb.grad = grad
                    opt.step()
                    with torch.no_grad():
                        xb.clamp_(0, 1)
                    evaluations += 1
                    bar.advance(task)
                with torch.no_grad():
                    stats.clear()
                    batch_probs.append(model(xb).softmax(-1))
                    final_bn += float(torch.stack(stats).sum()) if stats else 0.0
                    evaluations += 1
                made.append(xb.detach())
        probs = torch.cat(batch_probs)
        accuracy = float((probs.argmax(-1) == y).float().mean())
        confidence = float(probs.gather(1, y.view(-1, 1)).mean())
    finally:
        for h in handles:
            h.remove()
        for module, flag in flags.items():
            module.training = flag
    return SynthesizedData(torch.cat(made), y.clone(), accuracy, confidence, len(layers),
                           final_bn / len(made), steps, evaluations, warning)


__all__ = ["NO_BATCHNORM_WARNING", "SynthesizedData", "batchnorm_layers", "synthesize"]
