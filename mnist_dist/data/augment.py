"""Batched data augmentation on the training device: random affine maps and elastic distortions.

A whole batch is warped by one ``grid_sample`` call: each image gets its own affine map
(shift, rotation, zoom, shear) plus, optionally, a smooth random displacement field
(an elastic distortion, after Simard et al., 2003). Nothing runs per sample in Python.

Randomness: at the start of every epoch, ``set_epoch`` draws the parameters of every
training image from a generator seeded with (seed, epoch), as a table indexed by dataset
index; a batch looks its rows up. An image's distortion thus depends only on (seed,
epoch, image index): a run is reproducible, and N processes, each warping its own shard,
augment every image exactly as one process does, whatever the split of the batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Control points per side of the elastic displacement field. Bicubic interpolation between
# points ~9 px apart gives a field that bends strokes without tearing them.
ELASTIC_GRID = 4


@dataclass(frozen=True)
class AugmentSpec:
    """Largest distortion of each kind; 0 turns it off. Shift and elastic are in pixels."""

    translate: float = 0.0  # shift up to +-translate px in x and in y (uniform, sub-pixel)
    rotate: float = 0.0  # rotate by up to +-rotate degrees
    scale: float = 0.0  # zoom by a factor in [1 - scale, 1 + scale]
    shear: float = 0.0  # shear by up to +-shear degrees
    elastic: float = 0.0  # displacement of the elastic field's control points, std in px

    @property
    def enabled(self) -> bool:
        return any((self.translate, self.rotate, self.scale, self.shear, self.elastic))

    @classmethod
    def from_config(cls, cfg) -> AugmentSpec:
        return cls(cfg.augment_translate, cfg.augment_rotate, cfg.augment_scale, cfg.augment_shear, cfg.augment_elastic)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by (seed, epoch): the same on every process."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return gen


def affine_matrices(params: torch.Tensor, spec: AugmentSpec, size: int) -> torch.Tensor:
    """``(n, 2, 3)`` maps from output to input coordinates (``affine_grid``'s convention).

    ``params`` is ``(n, 5)`` uniform in [-1, 1]: x shift, y shift, rotation, zoom, shear.
    """
    tx, ty, rot, zoom, shear = params.unbind(dim=1)
    angle = rot * math.radians(spec.rotate)
    shear = torch.tan(shear * math.radians(spec.shear))
    inv_zoom = 1.0 / (1.0 + zoom * spec.scale)
    cos, sin = torch.cos(angle) * inv_zoom, torch.sin(angle) * inv_zoom
    # rotation @ [[1, shear], [0, 1]] / zoom; shifting the picture by t samples it at -t.
    # Coordinates run over [-1, 1] across `size` pixels, so one pixel is 2 / size.
    shift = -2.0 * spec.translate / size
    return torch.stack(
        [
            torch.stack([cos, cos * shear - sin, tx * shift], dim=1),
            torch.stack([sin, sin * shear + cos, ty * shift], dim=1),
        ],
        dim=1,
    )


class Augmenter:
    """Warps batches of float images ``(n, H, W)`` (background 0) on their device."""

    def __init__(self, spec: AugmentSpec, num_images: int, seed: int, device: torch.device, size: int = 28) -> None:
        self.spec, self.num_images, self.seed, self.device, self.size = spec, num_images, seed, device, size
        self.coeffs = None
        # Each sampling position is linear in per-image coefficients: (x, y, 1) for the affine
        # map, and the bicubic weights of the control points for the elastic field. One batched
        # matmul of this (pixels x features) matrix then gives a whole batch's sampling grids.
        lin = torch.linspace(-1 + 1 / size, 1 - 1 / size, size)  # pixel centres (align_corners=False)
        ys, xs = torch.meshgrid(lin, lin, indexing="ij")
        features = [xs.flatten(), ys.flatten(), torch.ones(size * size)]
        if spec.elastic:
            g = ELASTIC_GRID
            weights = F.interpolate(
                torch.eye(g * g).reshape(-1, 1, g, g), size=(size, size), mode="bicubic", align_corners=True
            )
            features += list(weights.reshape(g * g, size * size))
        self.features = torch.stack(features, dim=1).to(device)  # (H*W, 3 [+ g*g])

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's distortion of every image (call before the epoch, on every process)."""
        gen = epoch_generator(self.seed, epoch, self.device)
        n, size = self.num_images, self.size
        params = torch.rand(n, 5, generator=gen, device=self.device).mul_(2).sub_(1)
        coeffs = affine_matrices(params, self.spec, size).transpose(1, 2)  # (n, 3, 2)
        if self.spec.elastic:
            control = torch.randn(n, ELASTIC_GRID**2, 2, generator=gen, device=self.device)
            coeffs = torch.cat([coeffs, control.mul_(2.0 * self.spec.elastic / size)], dim=1)
        self.coeffs = coeffs.contiguous()  # (n, features, 2): everything a batch needs

    def grids(self, indices: torch.Tensor) -> torch.Tensor:
        """Sampling grids ``(n, H, W, 2)`` (``grid_sample``'s convention) of the images at ``indices``."""
        if self.coeffs is None:
            raise RuntimeError("Augmenter.set_epoch must be called before the first batch")
        coeffs = self.coeffs[indices.to(self.device, non_blocking=True)]
        # einsum runs this as one (pixels x features) @ (features x 2n) product: 7x faster than matmul's bmm.
        return torch.einsum("pf,nfc->npc", self.features, coeffs).reshape(len(coeffs), self.size, self.size, 2)

    def __call__(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Warp ``images`` (float, ``(n, H, W)``), whose dataset indices are ``indices``."""
        grid = self.grids(indices)
        out = F.grid_sample(images.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.squeeze(1)
