"""How many images one forward/backward pass may hold, so that a trigger reverse fits in memory.

The trigger reverses optimize one trigger per class in one batched problem, so a step runs
(classes x images) stamped inputs with gradients. On CIFAR-10 that is a few hundred images;
on a model with 43 classes (GTSRB) it is thousands, and at 100 or 1,000 classes one pass
would not fit on most GPUs or CPUs. The reverses therefore split a step into passes of at
most :func:`images_per_pass` images and add up their gradients, which is the same gradient
(the model runs in eval mode, so no image affects another's output). Where everything fits
in one pass, nothing is split and the numbers are bit-for-bit those of a single pass.

Sizing (ours): a pass with gradients keeps about every module's output for every image until
its backward, so one image costs about the sum of the leaf modules' output sizes for one image
(:func:`activation_bytes`). Measured by ``benchmarks/reverse_memory.py`` for one pass of
1,344 images at 32x32: a peak RSS of 2,554 MiB for ``resnet20``, where the estimate (1.82 MiB
an image) predicts 2,446 MiB, and 6,273 MiB for ``preact_resnet18``, where it (4.48) predicts
6,021 MiB. The budget is half the free memory on a GPU, and on a CPU
4 GiB or half of the available memory, whichever is smaller.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CPU_BUDGET_BYTES = 4 << 30


def leaf_output_bytes(model: nn.Module, example: torch.Tensor) -> list[int]:
    """Bytes of each leaf module call's output (its tensors) for one image (``example[:1]``),
    in call order; the model runs in eval mode without gradients."""
    sizes: list[int] = []

    def hook(module, inputs, output):
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        sizes.append(sum(o.numel() * o.element_size() for o in outputs if isinstance(o, torch.Tensor)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return sizes


def activation_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Sum of the leaf modules' output sizes, in bytes, for one image (``example[:1]``)."""
    return max(1, sum(leaf_output_bytes(model, example)))


def memory_budget(device: torch.device) -> int:
    """Bytes a reverse may use for one pass's activations on ``device`` (see module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, free // 2)
    available = _available_cpu_bytes()
    return CPU_BUDGET_BYTES if available is None else min(CPU_BUDGET_BYTES, available // 2)


def images_per_pass(model: nn.Module, example: torch.Tensor, budget: int | None = None) -> int:
    """At most this many images in one forward/backward pass of ``model`` (at least 1)."""
    if budget is None:
        budget = memory_budget(example.device)
    return max(1, int(budget) // activation_bytes(model, example))


def _available_cpu_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


__all__ = ["CPU_BUDGET_BYTES", "activation_bytes", "images_per_pass", "leaf_output_bytes",
           "memory_budget"]
