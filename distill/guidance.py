"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598)."""

from __future__ import annotations

import torch
from torch import Tensor


def cfg(cond_out: Tensor, uncond_out: Tensor, guidance_scale: float | Tensor) -> Tensor:
    """Guided prediction: uncond + w * (cond - uncond), diffusers' convention.

    w = 1 returns `cond_out` (no guidance), w = 0 returns `uncond_out`, w > 1 extrapolates away from
    the unconditional prediction. The LCM paper (Luo et al. 2023, arXiv:2310.04378) writes the same
    thing as cond + omega * (cond - uncond) with omega = w - 1.

    cond_out, uncond_out: [B, ...] network outputs (eps, v or x0: the combination is affine with weights
    summing to 1, so guiding any of them gives the same x0 and eps for a fixed z_t and t).
    guidance_scale: a float, or a [B] tensor of per-sample scales. Returns [B, ...].
    """
    w = guidance_scale
    if isinstance(w, Tensor):
        w = w.to(device=cond_out.device, dtype=cond_out.dtype)
        if w.ndim == 1:
            w = w.reshape((-1,) + (1,) * (cond_out.ndim - 1))
    return uncond_out + w * (cond_out - uncond_out)


def is_unguided(guidance_scale: float | Tensor) -> bool:
    """True when every scale is exactly 1, where CFG equals the conditional prediction."""
    if isinstance(guidance_scale, Tensor):
        return bool(torch.all(guidance_scale == 1))
    return guidance_scale == 1.0


def guidance_embedding(omega: Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of 1000 * omega, [B] -> [B, embedding_dim], as diffusers' LCM pipelines build it.

    emb_j = sin(1000 omega f_j) for j < D/2 and cos(...) after, f_j = 10000^(-j / (D/2 - 1)) (Ho et al.'s
    timestep embedding, VDM's `get_timestep_embedding`); an odd D is zero-padded. omega = guidance_scale - 1.
    """
    omega = torch.as_tensor(omega).reshape(-1).float() * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) / (half - 1) * torch.arange(half, dtype=torch.float32))
    angles = omega[:, None] * freqs.to(omega.device)[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if embedding_dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)
