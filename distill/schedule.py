"""Noise schedules: where a teacher family's time lives, and what alpha_t and sigma_t are there.

Every solver, loss and sampler in distill sees a teacher's schedule only through this interface, so a new family
(flow matching: SD3, FLUX) is a new schedule object, not a new branch in the math:

- `alpha_sigma(t, like)`: the scales of z_t = alpha_t x0 + sigma_t eps at times t [B], shaped [B, 1, ...].
- `add_noise(x0, eps, t)`: that forward process.
- `grid(n)`: n solver times, ascending (the skipping-step grid of consistency distillation; t_{n+k} values).
- `sample(batch, generator)`: training times t ~ the family's training distribution.
- `model_time(t)`: what the network's timestep input is at t (the family's units); `from_model_time` inverts it
  (a diffusers scheduler's `timesteps` are in those units).
- `prediction_type`: what the network predicts (`distill.prediction` turns it into x0 and eps).
- `num_train_timesteps`, `t_max` (the noisiest time on the grid).

Two families:

- `VPSchedule` (DDPM family: SD 1.x/2.x, SDXL, UNet2D): t is the integer training timestep in [0, T),
  alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) from the scheduler's `alphas_cumprod` (Ho et al. 2020).
- `FlowSchedule` (rectified flow: SD3, FLUX): t is sigma in (0, 1], z_t = (1 - sigma) x0 + sigma eps
  (Esser et al. 2024, arXiv:2403.03206), with the scheduler's shift sigma' = s sigma / (1 + (s - 1) sigma); the
  network is fed sigma * T, as `FlowMatchEulerDiscreteScheduler` does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.errors import ModelError


def _shaped(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.device, like.dtype)


class VPSchedule:
    """Discrete variance-preserving schedule over T integer timesteps, from abar_t [T]."""

    family = "vp"
    consistency_boundary = True  # LCM's c_skip / c_out make f(z, 0) = z (the network's x0 alone would not)
    lcm_scheduler = "LCMScheduler"  # the diffusers scheduler that samples a consistency student on this schedule

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon"):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float32).detach().clone()
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.prediction_type = prediction_type
        self.t_max = self.num_train_timesteps - 1

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) at integer t [B] (or 0-d), shaped [B, 1, ...] and typed like `like`."""
        t = torch.as_tensor(t).reshape(-1).to(device=self.alphas_cumprod.device, dtype=torch.long)
        abar = self.alphas_cumprod[t]
        return _shaped(abar.sqrt(), like), _shaped((1 - abar).sqrt(), like)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * eps

    def grid(self, n: int) -> Tensor:
        """t_{n+k} = k - 1, 2k - 1, ..., T - 1 with k = T // n (long [n]), as diffusers' LCM scripts."""
        if not 1 <= n <= self.num_train_timesteps:
            raise ValueError(f"The solver grid needs 1 <= n <= {self.num_train_timesteps}, got {n}.")
        k = self.num_train_timesteps // n
        return torch.arange(1, n + 1) * k - 1

    def previous(self, t: Tensor, n: int) -> Tensor:
        """The grid point one interval below t (t - k, floored at 0): DDIM's skipping step."""
        return (torch.as_tensor(t) - self.num_train_timesteps // n).clamp(min=0)

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """t ~ U{0, ..., T - 1}: [B] long (on CPU)."""
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator)

    def model_time(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t)

    def from_model_time(self, timestep: Tensor) -> Tensor:
        """The schedule's t of a diffusers scheduler's timestep (the network's units): the integer t itself."""
        return torch.as_tensor(timestep).round().long()

    def consistency_times(self, steps: int, n: int) -> Tensor:
        """The times a consistency student samples at, descending [steps]: evenly spaced indices into the n-point
        grid, as `LCMScheduler.set_timesteps(steps, original_inference_steps=n)` (long)."""
        return spaced(self.grid(n).flip(0), steps)

    @classmethod
    def from_scheduler(cls, scheduler, source: str = "the teacher") -> VPSchedule:
        """abar_t from a diffusers scheduler, or from a DDPM scheduler built on its beta config."""
        from diffusers import DDPMScheduler

        abar = getattr(scheduler, "alphas_cumprod", None)
        if abar is None:
            if "beta_schedule" not in scheduler.config:
                raise ModelError(
                    f"The scheduler {type(scheduler).__name__} of {source} has no DDPM noise schedule; use a pipeline "
                    "whose scheduler has betas (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...)."
                )
            abar = DDPMScheduler.from_config(scheduler.config).alphas_cumprod
        return cls(abar, scheduler.config.get("prediction_type", "epsilon"))


def spaced(grid: Tensor, steps: int) -> Tensor:
    """`steps` points of a descending grid at evenly spaced indices floor(i n / steps), from its top
    (`LCMScheduler.set_timesteps(steps, original_inference_steps=n)`'s choice)."""
    n = len(grid)
    if not 1 <= steps <= n:
        raise ValueError(f"num_inference_steps must be in [1, {n}], got {steps}.")
    return grid[torch.floor(torch.arange(steps, dtype=torch.float64) * n / steps).long()]


class FlowSchedule:
    """Rectified-flow schedule: t = sigma in (0, 1], alpha_t = 1 - sigma, sigma_t = sigma, velocity prediction."""

    family = "flow"
    prediction_type = "flow_prediction"
    consistency_boundary = False  # x0 = z_t - sigma u already gives f(z, 0) = z; FlowMatchLCMScheduler scales nothing
    lcm_scheduler = "FlowMatchLCMScheduler"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self.num_train_timesteps, self.shift = num_train_timesteps, float(shift)
        self.t_max = 1.0

    def shifted(self, sigma: Tensor) -> Tensor:
        """sigma' = s sigma / (1 + (s - 1) sigma) (FlowMatchEulerDiscreteScheduler's static shift)."""
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def unshifted(self, sigma: Tensor) -> Tensor:
        """The inverse of `shifted`, u = sigma / (s - (s - 1) sigma): what to pass a FlowMatch scheduler's
        `set_timesteps(sigmas=...)` (or a pipeline's `sigmas=`) for it to visit these sigmas after its shift."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return sigma / (self.shift - (self.shift - 1) * sigma)

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        sigma = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        return _shaped(1 - sigma, like), _shaped(sigma, like)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * eps

    def grid(self, n: int) -> Tensor:
        """The n sigmas `FlowMatchEulerDiscreteScheduler.set_timesteps(n)` visits, ascending (float [n])."""
        if n < 1:
            raise ValueError(f"The solver grid needs n >= 1, got {n}.")
        sigma_min = self.shifted(torch.tensor(1.0 / self.num_train_timesteps, dtype=torch.float64))
        t = torch.linspace(1.0, float(sigma_min), n, dtype=torch.float64)  # the scheduler shifts its sigma_min twice
        return self.shifted(t).flip(0).float()

    def previous(self, t: Tensor, n: int) -> Tensor:
        """The grid point one interval below t (0 below the first)."""
        grid = self.grid(n)
        index = torch.searchsorted(grid, torch.as_tensor(t, dtype=torch.float32).reshape(-1) - 1e-6)
        return torch.where(index > 0, grid[(index - 1).clamp(min=0)], torch.zeros(()))

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """sigma = shift(u), u ~ U(0, 1]: [B] float (SD3's logit-normal is a weighting choice for a recipe)."""
        u = 1.0 - torch.rand(batch, generator=generator)
        return self.shifted(u)

    def model_time(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t) * self.num_train_timesteps

    def from_model_time(self, timestep: Tensor) -> Tensor:
        """sigma = timestep / T: a FlowMatch scheduler's `timesteps` (and `sigma * T` configs) back to sigma."""
        return torch.as_tensor(timestep, dtype=torch.float32) / self.num_train_timesteps

    def consistency_times(self, steps: int, n: int) -> Tensor:
        """The sigmas a consistency student of the n-point grid samples at, descending [steps]: evenly spaced indices
        into the grid, as LCMScheduler spaces them on VP. Not FlowMatchLCMScheduler's own spacing, which runs down to
        sigma_min (0.001), so that its last step is a no-op and 2 steps give what 1 does: flow students pin these
        in their sampler spec (`SamplerSpec.sigmas`)."""
        return spaced(self.grid(n).flip(0), steps)

    @classmethod
    def from_scheduler(cls, scheduler, source: str = "the teacher", image_seq_len: int | None = None) -> FlowSchedule:
        """The scheduler's static shift, or with `use_dynamic_shifting` (FLUX) the shift its pipeline computes for
        `image_seq_len` latent patches (`calculate_shift`'s mu: s = e^mu, or mu for a linear time shift)."""
        config = scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return cls(config.get("num_train_timesteps", 1000), config.get("shift", 1.0))
        if image_seq_len is None:
            raise ModelError(f"{source} uses a resolution-dependent (dynamic) shift and its pipeline gives no native "
                             "size; use a scheduler with use_dynamic_shifting=false.")
        mu = _dynamic_mu(config, image_seq_len)
        shift = mu if config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)
        return cls(config.get("num_train_timesteps", 1000), shift)


def _dynamic_mu(config, image_seq_len: int) -> float:
    """mu linear in the number of patches, from base_shift at base_image_seq_len to max_shift at max_image_seq_len
    (diffusers' `calculate_shift`, which FLUX's and SD3's pipelines call)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return base + (top - base) / (max_len - base_len) * (image_seq_len - base_len)


def is_flow(scheduler_name: str) -> bool:
    """Whether a diffusers scheduler class (by name) samples a flow-matching teacher."""
    return "FlowMatch" in scheduler_name


def schedule_for(scheduler, source: str = "the teacher", image_seq_len: int | None = None):
    """The schedule object of a diffusers scheduler: flow matching or discrete VP."""
    if is_flow(type(scheduler).__name__):
        return FlowSchedule.from_scheduler(scheduler, source, image_seq_len)
    return VPSchedule.from_scheduler(scheduler, source)
