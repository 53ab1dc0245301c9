"""WaNet: an imperceptible, fixed elastic warp of the whole image.

Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021
(code: https://github.com/VinAIResearch/Warping-based_Backdoor_Attack-release).

The warping field is built once from the seed exactly as in the paper's code (and
BackdoorBench's ``attack/wanet.py``): ``ins = uniform(-1, 1)`` of shape (1, 2, k, k), divided by
its mean absolute value, upsampled bicubically (align_corners=True) to H x W and permuted to
(1, H, W, 2); the identity grid comes from ``linspace(-1, 1)``;
``grid = clamp((identity + s * ins / H) * grid_rescale, -1, 1)``; images are warped with
``F.grid_sample(..., align_corners=True)``. Bilinear sampling is a convex combination of pixels,
so warping in pixel space (here) equals warping normalized images (the paper) exactly.

Defaults: BackdoorBench ``config/attack/wanet/*.yaml``: k = 4, s = 0.5, grid_rescale = 1,
cross_ratio = 2 (noise mode), poison rate 0.1, all-to-one target 0.

Noise ("cross") mode: the paper trains with, per batch, a fraction ``rate`` of backdoored images
(warped, relabelled) and a fraction ``cross_ratio * rate`` of noise images warped with the grid
plus a fresh per-image random perturbation ``uniform(-1, 1) / H`` and kept at their true labels,
so that the network learns the *exact* warp rather than any warp. The paper redraws both sets
every batch; :meth:`WaNet.poison` produces a static poisoned set instead (drawn once from the
poisoning seed), so that every attack trains through the same plain dataset path.
:meth:`WaNet.apply_noise` exposes the noise warp for a trainer that wants the on-the-fly version.
Rebuilding from ``config()`` gives the same fixed grid, hence the same :meth:`apply`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.dataset import ImageDataset
from ..errors import ConfigError
from .base import Attack, _check_images, _check_rate


@dataclass
class WaNetOptions:
    """Options of :class:`WaNet` (defaults: BackdoorBench / Nguyen & Tran 2021).

    k: side of the random control grid that is upsampled into the warping field (4).
    s: warping strength (0.5); 0 gives the identity warp.
    grid_rescale: multiplies the warped grid before clamping to [-1, 1] (1).
    cross_ratio: noise images per backdoored image in :meth:`WaNet.poison` (2).
    """

    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0


class WaNet(Attack):
    name = "wanet"
    Options = WaNetOptions

    def _build(self) -> None:
        o = self.options
        if not isinstance(o.k, int) or isinstance(o.k, bool) or o.k < 1:
            raise ConfigError(f"wanet: k must be a positive integer, got {o.k!r}")
        for field, low in (("s", 0.0), ("grid_rescale", 0.0), ("cross_ratio", 0.0)):
            value = getattr(o, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ConfigError(f"wanet: {field} must be a number >= {low}, got {value!r}")
            setattr(o, field, float(value))
        if o.grid_rescale == 0:
            raise ConfigError("wanet: grid_rescale must be > 0")

        _, h, w = self.image_shape
        gen = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, o.k, o.k, generator=gen) * 2 - 1
        # mean |ins| = 1 after this, so s alone sets the displacement scale
        ins = ins / ins.abs().mean()
        noise_grid = F.interpolate(ins, size=(h, w), mode="bicubic",
                                   align_corners=True).permute(0, 2, 3, 1)
        rows = torch.linspace(-1, 1, h)
        cols = torch.linspace(-1, 1, w)
        # grid_sample wants (x, y) = (column, row) in the last dimension
        identity = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)[None]
        grid = (identity + o.s * noise_grid / h) * o.grid_rescale
        #: (1, H, W, 2) float: the fixed sampling grid (normalized coordinates, x then y)
        self.grid = grid.clamp(-1, 1).contiguous()

    def _warp(self, x: Tensor, grid: Tensor) -> Tensor:
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out.clamp(0, 1)  # guards float rounding only: bilinear weights sum to 1

    def _apply(self, x: Tensor) -> Tensor:
        grid = self._on("grid", x)
        return self._warp(x, grid.expand(x.shape[0], -1, -1, -1))

    def apply_noise(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Noise-mode warp: the fixed grid plus a per-image ``uniform(-1, 1) / H`` jitter drawn
        from ``generator`` (a CPU generator; the jitter is moved to ``x``'s device)."""
        single = _check_images(x, self.image_shape)
        batch = x.unsqueeze(0) if single else x
        n, (_, h, w) = batch.shape[0], self.image_shape
        jitter = (torch.rand(n, h, w, 2, generator=generator) * 2 - 1) / h
        grid = self._on("grid", batch) + jitter.to(batch.device, batch.dtype)
        out = self._warp(batch, grid.clamp(-1, 1))
        return out[0] if single else out

    def poison(self, dataset: ImageDataset, rate: float = 0.1,
               seed: int = 0) -> tuple[ImageDataset, Tensor]:
        """Backdoor ``round(rate * N)`` images (warped, relabelled) and add
        ``round(cross_ratio * rate * N)`` noise images (noise warp, true labels).

        Both sets are drawn without replacement from all images (as the paper's per-batch
        selection, which does not avoid the target class) and are disjoint; the noise set is
        capped, with a warning, at the images left over. Returns the poisoned copy and the
        sorted indices of the *backdoored* images; ``meta["poison"]`` counts both sets.
        """
        self._check_dataset(dataset)
        rate = _check_rate(rate)
        n_total = len(dataset)
        gen = torch.Generator().manual_seed(int(seed))
        n_bd = round(rate * n_total)
        wanted = round(self.options.cross_ratio * rate * n_total)
        n_noise = min(wanted, n_total - n_bd)
        if n_noise < wanted:
            warnings.warn(f"wanet: cross_ratio {self.options.cross_ratio} at rate {rate} asks for "
                          f"{wanted} noise images but only {n_total - n_bd} images are left; "
                          f"using {n_noise}", stacklevel=2)
        if n_bd == 0 and rate > 0:
            warnings.warn(f"wanet: poison rate {rate} of {n_total} images rounds to 0 poisoned "
                          f"images", stacklevel=2)
        perm = torch.randperm(n_total, generator=gen)
        index = perm[:n_bd].sort().values
        noise_index = perm[n_bd:n_bd + n_noise].sort().values

        images = dataset.images.clone()
        labels = dataset.labels.clone()
        images[index] = self._apply_uint8(images[index])
        labels[index] = self.target_labels(labels[index])
        # the generator continues from the selection, so the jitter is fixed by `seed` too
        images[noise_index] = self._apply_uint8(images[noise_index],
                                                fn=lambda x: self.apply_noise(x, gen))
        info = {"rate": rate, "seed": int(seed), "num_images": n_total, "num_poisoned": n_bd,
                "num_noise": n_noise, "cross_ratio": self.options.cross_ratio,
                "eligible": "all", "labels_changed": True}
        return self._poisoned_copy(dataset, images, labels, info), index
