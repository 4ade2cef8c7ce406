"""The consistency gap: how far a consistency student's one-step map is from the teacher's ODE solution, per t.

A consistency function f(z_t, t) should send every point of a probability-flow ODE trajectory to its end, x0
(Song et al. 2023, "Consistency Models", arXiv:2303.01469; Luo et al. 2023, "Latent Consistency Models",
arXiv:2310.04378). At re-noised points z_t = alpha_t z0 + sigma_t eps the gap at t compares, in latent space,

- the student's one-step map f_theta(z_t, t) = c_skip(t) z_t + c_out(t) x0_theta(z_t, t) (`distill.consistency`),
  which is LCMScheduler's `denoised` for one step from t, and
- the teacher's ODE solution Phi(z_t, t -> 0): deterministic DDIM (eta = 0) with classifier-free guidance w on
  `steps` equal sub-intervals of [0, t], ending with the teacher's x0 at the last grid point (the step to t = 0,
  where alpha = 1 and sigma = 0).

gap(z_t, t) = sqrt(mean_{c,h,w} (f_theta - Phi)^2): 0 for a student that is exactly the teacher's ODE map.
Everything goes through the Teacher interface (`guided`, `to_x0_eps`, `add_noise`), so it holds for every family.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.consistency import consistency_output
from distill.trajectories import guided_ddim


def ode_grid(t: float | Tensor, steps: int) -> Tensor:
    """The times the solver evaluates the teacher at: t = t_0 > t_1 > ... > t_{steps-1} > 0, [steps].

    Equal sub-intervals of [0, t]. Integer times (the VP family's timesteps) are rounded and stay integers; float
    times (flow matching's sigma) stay floats.
    """
    if steps < 1:
        raise ValueError(f"The ODE solve needs at least 1 step, got {steps}.")
    t = torch.as_tensor(t)
    grid = torch.linspace(float(t), 0.0, steps + 1, dtype=torch.float64)[:-1]
    return grid.to(t.dtype) if t.is_floating_point() else grid.round().long()


def ode_steps(t: float, t_max: float, full_steps: int = 50) -> int:
    """DDIM steps for the solve from t: the spacing of a `full_steps`-step sampler over [0, t_max], at least 1
    (e.g. 50 from t = 999, 13 from t = 259 on a 1000-step VP schedule)."""
    return max(1, round(full_steps * float(t) / float(t_max)))


@torch.no_grad()
def teacher_ode_solution(teacher, z_t: Tensor, t: float | Tensor, cond, guidance_scale: float, steps: int) -> Tensor:
    """Phi(z_t, t -> 0): the x0 the teacher's probability-flow ODE reaches from z_t [B, C, H, W] at one time t.

    DDIM (eta = 0) over `ode_grid(t, steps)` with CFG at `guidance_scale`:
      x0_i, eps_i = to_x0_eps(guided(z_i, t_i));  z_{i+1} = alpha_{t_{i+1}} x0_i + sigma_{t_{i+1}} eps_i,
    returning x0 at the last grid point. steps = 1 is the teacher's own one-step x0. Returns float32 [B, C, H, W].
    """
    return guided_ddim(teacher, z_t, ode_grid(t, steps).to(z_t.device), cond, guidance_scale)[0]


@torch.no_grad()
def student_one_step(student, z_t: Tensor, t: float | Tensor, cond, guidance_scale: float = 1.0,
                     timestep_cond: Tensor | None = None, timestep_scaling: float = 10.0,
                     sigma_data: float = 0.5) -> Tensor:
    """f_theta(z_t, t) = c_skip(t) z_t + c_out(t) x0_theta(z_t, t): a consistency student's one-step map from one t.

    student: anything with the Teacher interface whose network is the student's (a fused LoRA, or a full student
    pipeline wrapped by `Teacher`). guidance_scale: the CFG its sampler runs (1 for an LCM-LoRA); timestep_cond: the
    guidance embedding of a student with a guidance input; timestep_scaling, sigma_data: the boundary condition it
    was trained with (its LCMScheduler's). z_t [B, C, H, W]; returns float32 [B, C, H, W].
    """
    t_batch = torch.as_tensor(t, device=z_t.device).reshape(1).repeat(len(z_t))
    out = student.guided(z_t.to(student.dtype), t_batch, cond, guidance_scale, timestep_cond=timestep_cond)
    x0, _ = student.to_x0_eps(out.float(), z_t.float(), t_batch)
    return consistency_output(z_t.float(), x0, t_batch, sigma_data, timestep_scaling, student.schedule)


def consistency_gap(student_x0: Tensor, teacher_x0: Tensor) -> Tensor:
    """Per-sample RMS distance sqrt(mean_{c,h,w} (a - b)^2) between two [B, C, H, W] latents: float32 [B]."""
    if student_x0.shape != teacher_x0.shape:
        raise ValueError(f"The consistency gap compares latents of one shape, got {tuple(student_x0.shape)} and "
                         f"{tuple(teacher_x0.shape)}.")
    return (student_x0.float() - teacher_x0.float()).flatten(1).pow(2).mean(1).sqrt()
