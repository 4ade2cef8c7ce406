"""Optimizers and the learning-rate schedule every method shares.

AdamW, or bitsandbytes' AdamW8bit (optimizer states in 8 bits, CUDA only); the schedule is a linear warm-up, then
constant or cosine to a floor over the run's budget (steps or minutes, whichever binds).
"""

from __future__ import annotations

import math

import torch

from distill.errors import ConfigError


def make_optimizer(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                   use_8bit: bool = False, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad, or bitsandbytes' AdamW8bit when `use_8bit`."""
    params = [p for p in params if p.requires_grad]
    if not use_8bit:
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
    if torch.device(device).type != "cuda":
        raise ConfigError(
            f"8-bit AdamW (optim.use_8bit_adam) runs on CUDA GPUs only and this run is on {device}; "
            "set optim.use_8bit_adam=false."
        )
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ConfigError(
            "8-bit AdamW (optim.use_8bit_adam) needs bitsandbytes, which is not installed: "
            "`pip install 'distill[bnb]'`, or set optim.use_8bit_adam=false."
        ) from err
    return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)


def from_config(params, lr: float, optim, device) -> torch.optim.Optimizer:
    """`make_optimizer` with the settings of an `OptimConfig` block."""
    return make_optimizer(params, lr, optim.weight_decay, (optim.beta1, optim.beta2), optim.eps,
                          optim.use_8bit_adam, device)


def warmup_cosine(progress: float, step: int, warmup_steps: int, floor: float = 0.0) -> float:
    """LR multiplier: linear warm-up over `warmup_steps`, then cosine from 1 to `floor` over progress in [0, 1]."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_multiplier(schedule: str, warmup_steps: int, progress: float, step: int, floor: float = 0.0) -> float:
    """`constant`: warm-up then 1; `cosine`: warm-up then cosine to `floor` over the budget."""
    return warmup_cosine(progress, step, warmup_steps, floor=1.0 if schedule == "constant" else floor)
