"""Trainable discriminator heads on frozen features (ADD / LADD; the heads of StyleGAN-T and Projected GAN).

One `Head` per feature map: spectral-norm convolutions down to a `cmap_dim` map h(x), then a projection
discriminator's logit per location (Miyato & Koyama 2018): psi(h) + <h, e(c)> / sqrt(cmap_dim), where e(c) embeds
the condition (a pooled text embedding; for LADD also the noise level). `Heads` holds one per tap and returns
logits [B, num_heads], each head's locations averaged. Only the heads are trained: the network that produced the
features (a `distill.backbones.Backbone`, or the teacher's denoiser for LADD) is not a child of this module, so it
gets no optimizer and is not in the discriminator's checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


def _conv(c_in: int, c_out: int, k: int) -> nn.Module:
    return spectral_norm(nn.Conv2d(c_in, c_out, k, padding=k // 2))


class Head(nn.Module):
    """Features [B, C, H, W] and condition embedding [B, cmap_dim] -> logits [B] (mean over locations)."""

    def __init__(self, channels: int, width: int = 64, cmap_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, width, 1), nn.LeakyReLU(0.2),
            _conv(width, width, 3), nn.LeakyReLU(0.2),
            _conv(width, cmap_dim, 1),
        )
        self.psi = _conv(cmap_dim, 1, 1)  # the unconditional part of the logit
        self.cmap_dim = cmap_dim

    def forward(self, features: Tensor, cmap: Tensor) -> Tensor:
        h = self.body(features.float())
        projected = (h * cmap[:, :, None, None]).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)
        return (self.psi(nn.functional.leaky_relu(h, 0.2)) + projected).mean(dim=(1, 2, 3))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of times t [B] (in the schedule's own units), as diffusion UNets embed them."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class Heads(nn.Module):
    """One projection head per feature map, conditioned on a text vector [B, cond_dim] (and t for LADD)."""

    def __init__(self, channels: list[int], cond_dim: int, width: int = 64, cmap_dim: int = 64,
                 time_conditioned: bool = False):
        super().__init__()
        self.heads = nn.ModuleList(Head(c, width, cmap_dim) for c in channels)
        self.embed = nn.ModuleList(spectral_norm(nn.Linear(cond_dim, cmap_dim)) for _ in channels)
        self.time = nn.Sequential(nn.Linear(cmap_dim, cmap_dim), nn.SiLU()) if time_conditioned else None
        self.cmap_dim = cmap_dim

    def forward(self, features: list[Tensor], cond: Tensor, t: Tensor | None = None) -> Tensor:
        """Logits [B, num_heads]. features: one map per head; cond: [B, cond_dim]; t: [B] when time-conditioned."""
        if len(features) != len(self.heads):
            raise ValueError(f"{len(self.heads)} heads were built but {len(features)} feature maps were given.")
        extra = 0.0
        if self.time is not None:
            extra = self.time(timestep_embedding(t, self.cmap_dim))
        cond = cond.float()
        return torch.stack([head(f, embed(cond) + extra)
                            for head, embed, f in zip(self.heads, self.embed, features)], dim=1)
