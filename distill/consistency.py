"""Latent consistency distillation math: the skipping-step DDIM solver and the boundary condition.

Luo et al. 2023, "Latent Consistency Models" (arXiv:2310.04378), on Song et al. 2023, "Consistency
Models" (arXiv:2303.01469). Times are the teacher schedule's (`distill.schedule`): on the VP family the integer
training timesteps t in [0, T).

- The solver works on the schedule's N-point grid: on the VP family t_{n+k} in {k-1, 2k-1, ..., T-1} with
  k = T // N, and one step goes from t_{n+k} to t_n = t_{n+k} - k (0 for the first interval), as diffusers'
  LCM scripts do. It is DDIM with eta = 0: z_{t_n} = alpha_{t_n} x0 + sigma_{t_n} eps.
- The consistency function is f(z_t, t) = c_skip(t) z_t + c_out(t) x0(z_t, t) with
  c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2) and c_out = s t / sqrt((s t)^2 + sigma_data^2)
  (sigma_data = 0.5, timestep scaling s = 10, as diffusers' LCMScheduler), so f(z, 0) = z.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.info import SamplerSpec


class DDIMSolver:
    """Skipping-step DDIM over `num_ddim_timesteps` (N) points of the teacher's schedule grid.

    schedule: a `distill.schedule` object. Attributes: timesteps [N] (t_{n+k}, ascending), prev_timesteps [N] (t_n).
    An `index` in [0, N) names one interval (t_n, t_{n+k}).
    """

    def __init__(self, schedule, num_ddim_timesteps: int = 50):
        self.schedule, self.num_ddim_timesteps = schedule, num_ddim_timesteps
        self.timesteps = schedule.grid(num_ddim_timesteps)
        self.prev_timesteps = schedule.previous(self.timesteps, num_ddim_timesteps)

    def sample_index(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """n ~ U{0, ..., N-1} per sample: [B] long (on CPU; move it with the batch)."""
        return torch.randint(0, self.num_ddim_timesteps, (batch_size,), generator=generator)

    def start(self, index: Tensor) -> Tensor:
        """t_{n+k} for each index: [B]."""
        return self.timesteps.to(index.device)[index]

    def end(self, index: Tensor) -> Tensor:
        """t_n for each index: [B]."""
        return self.prev_timesteps.to(index.device)[index]

    def step(self, x0: Tensor, eps: Tensor, index: Tensor) -> Tensor:
        """One DDIM (eta = 0) step from t_{n+k} to t_n given the (guided) x0 and eps: z_{t_n} = alpha x0 + sigma eps.

        x0, eps: [B, C, H, W]; index: [B]. For index 0 the target time is t = 0, whose abar_0 < 1 on the VP
        schedule, as in DDIMScheduler with set_alpha_to_one=False and diffusers' LCM scripts.
        """
        return self.schedule.add_noise(x0, eps, self.end(index).to(x0.device))


def boundary_scalings(t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0,
                      schedule=None) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) at timesteps t [B] as float32 [B] (see the module docstring; LCM Eq. 9 / LCMScheduler).

    On a schedule without `consistency_boundary` (flow matching: x0 = z_t - sigma u is already z at sigma = 0, and
    FlowMatchLCMScheduler scales nothing) they are (0, 1): f is the network's own x0."""
    if schedule is not None and not schedule.consistency_boundary:
        t = torch.as_tensor(t).float()
        return torch.zeros_like(t), torch.ones_like(t)
    scaled = torch.as_tensor(t).float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def consistency_output(
    z_t: Tensor, x0: Tensor, t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0, schedule=None
) -> Tensor:
    """f(z_t, t) = c_skip(t) z_t + c_out(t) x0: the parameterised consistency function, [B, ...]."""
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling, schedule)
    shape = (-1,) + (1,) * (z_t.ndim - 1)
    c_skip, c_out = c_skip.to(z_t.device).reshape(shape), c_out.to(z_t.device).reshape(shape)
    return c_skip * z_t + c_out * x0


def inference_timesteps(num_inference_steps: int, original_steps: int = 50, num_train_timesteps: int = 1000) -> Tensor:
    """The timesteps an LCM samples at, descending [S]: evenly spaced indices into the N solver timesteps.

    The same schedule as LCMScheduler.set_timesteps(num_inference_steps, original_inference_steps=N),
    so that the toolkit's sampler and a plain diffusers pipeline visit the same t.
    """
    from distill.schedule import VPSchedule

    schedule = VPSchedule(torch.zeros(num_train_timesteps))  # only its grid is used
    return schedule.consistency_times(num_inference_steps, original_steps)


def pinned_sigmas(schedule, n: int, steps: list[int], times: dict | None = None) -> dict[str, list[float]]:
    """{str(k): sigmas} a flow sampler is called with to visit `times` ({k: sigmas [k]}, by default the consistency
    times of the n-point grid, `schedule.consistency_times(k, n)`) for each step count k of `steps`. The pipeline
    shifts the sigmas it is given, so the unshifted ones are stored: it then visits exactly these."""
    times = times or {k: schedule.consistency_times(k, n) for k in steps}
    return {str(k): unshifted_sigmas(schedule, v) for k, v in times.items()}


def unshifted_sigmas(schedule, sigmas) -> list[float]:
    """What a flow pipeline's `sigmas=` takes to visit these sigmas after its shift (rounded for student.json)."""
    return [round(float(x), 6) for x in schedule.unshifted(torch.as_tensor(sigmas))]


def check_pinned_timesteps(pinned: dict, grid: list[int] | None, key: str) -> dict[int, list[int]]:
    """{k: timesteps} an LCMScheduler is pinned to, checked: k timesteps per step count k, strictly descending, each a
    point of the student's training grid (the t_{n+k} it learnt to map from; grid None: not checked yet, as before
    the teacher loads). Raises ValueError naming `key`."""
    out = {}
    for k, ts in pinned.items():
        if not isinstance(k, int) or not isinstance(ts, list) or len(ts) != k:
            raise ValueError(f"{key} maps a step count to that many timesteps, e.g. {{4: [999, 499, 199, 99]}}; "
                             f"got {k!r}: {ts!r}.")
        if ts != sorted(set(ts), reverse=True) or (grid is not None and any(t not in grid for t in ts)):
            where = f"points of the student's grid {sorted(grid)}" if grid is not None else "distinct timesteps"
            raise ValueError(f"{key}[{k}] = {ts} must descend through {where}.")
        out[k] = [int(t) for t in ts]
    return out


def lcm_sampler(num_ddim_timesteps: int, timestep_scaling: float, prediction_type: str, guidance_scale: float,
                steps: list[int] | None = None, schedule=None, times: dict | None = None) -> SamplerSpec:
    """The consistency sampler of the teacher's schedule (`schedule.lcm_scheduler`, default LCMScheduler) with the N
    and timestep scaling the student was trained with.

    LCMScheduler: clipping and thresholding are off (the training targets were never clipped). FlowMatchLCMScheduler
    takes its shift from the teacher's scheduler config, and the sigmas of each step count are pinned (the pipeline
    is called with them): `times` ({steps: sigmas [steps]}, a student trained on its own grid, as ADD's), by default
    the schedule's `consistency_times` on the N-point grid (FlowMatchLCMScheduler's own spacing wastes a step).
    """
    name = schedule.lcm_scheduler if schedule is not None else "LCMScheduler"
    if name != "LCMScheduler":
        steps = [k for k in (steps or [1, 2, 4, 8]) if times or k <= num_ddim_timesteps]
        sigmas = pinned_sigmas(schedule, num_ddim_timesteps, steps, times)
        return SamplerSpec(scheduler=name, guidance_scale=float(guidance_scale), steps=steps, sigmas=sigmas)
    return SamplerSpec(
        scheduler="LCMScheduler", guidance_scale=float(guidance_scale),
        config=dict(original_inference_steps=num_ddim_timesteps, timestep_scaling=timestep_scaling,
                    prediction_type=prediction_type, clip_sample=False, thresholding=False),
        steps=[s for s in (steps or [1, 2, 4, 8]) if s <= num_ddim_timesteps],
    )
