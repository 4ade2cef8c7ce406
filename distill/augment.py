"""Differentiable augmentation for discriminators (DiffAugment: Zhao et al. 2020, arXiv:2006.10738).

The same random transform family is applied to real and generated images before the discriminator sees them,
and it is differentiable, so the generator's gradient passes through. It keeps a discriminator on few images
(3,779 emoji) from memorising the real set. Images are [B, C, H, W] in [-1, 1]; randomness comes from the
caller's generator, so a resumed run draws the same augmentations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

POLICIES = ("color", "translation", "cutout")


def _rand(x: Tensor, generator: torch.Generator | None, *shape) -> Tensor:
    return torch.rand((x.shape[0], *shape), generator=generator).to(x.device, x.dtype)


def color(x: Tensor, generator=None) -> Tensor:
    """Random brightness (+-0.5), saturation (x0..2) and contrast (x0.5..1.5), per image."""
    x = x + (_rand(x, generator, 1, 1, 1) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x, generator, 1, 1, 1) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, generator, 1, 1, 1) + 0.5) + mean


def translation(x: Tensor, generator=None, ratio: float = 0.125) -> Tensor:
    """Shift each image by up to `ratio` of its size, filling with zeros (bilinear resampling keeps it smooth)."""
    shift = (_rand(x, generator, 2) * 2 - 1) * ratio * 2  # affine_grid units: the image spans [-1, 1]
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cutout(x: Tensor, generator=None, ratio: float = 0.5) -> Tensor:
    """Zero one random square of `ratio` of the image's side per image."""
    b, _, h, w = x.shape
    size = max(1, int(h * ratio)), max(1, int(w * ratio))
    centre = _rand(x, generator, 2)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    top = (centre[:, 0] * (h + 1 - size[0])).long()[:, None, None]
    left = (centre[:, 1] * (w + 1 - size[1])).long()[:, None, None]
    inside = (ys >= top) & (ys < top + size[0]) & (xs >= left) & (xs < left + size[1])
    return x * (~inside)[:, None].to(x.dtype)


def diff_augment(x: Tensor, policy: list[str] | tuple[str, ...], generator: torch.Generator | None = None) -> Tensor:
    """Apply the named transforms in order (any of `POLICIES`); an empty policy returns x unchanged."""
    for name in policy:
        x = {"color": color, "translation": translation, "cutout": cutout}[name](x, generator)
    return x
