"""distill.prediction checked against diffusers' own schedulers."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from distill.prediction import PREDICTION_TYPES, add_noise, from_x0_eps, to_x0_eps
from distill.schedule import FlowSchedule, VPSchedule

VP_TYPES = [p for p in PREDICTION_TYPES if p != "flow_prediction"]  # flow needs alpha + sigma = 1

SCHEDULES = {
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
    "linear": {"beta_start": 0.0001, "beta_end": 0.02},
}


def _scheduler(beta_schedule, prediction_type="epsilon"):
    return DDIMScheduler(
        beta_schedule=beta_schedule, **SCHEDULES[beta_schedule], prediction_type=prediction_type,
        clip_sample=False, set_alpha_to_one=False, num_train_timesteps=1000,
    )


def _tensors(seed=0, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(beta_schedule):
    sched = _scheduler(beta_schedule)
    x0, eps = _tensors()
    t = torch.tensor([5, 400, 980])
    alpha, sigma = VPSchedule(sched.alphas_cumprod).alpha_sigma(t, x0)
    torch.testing.assert_close(add_noise(x0, eps, alpha, sigma), sched.add_noise(x0, eps, t))
    torch.testing.assert_close(from_x0_eps(x0, eps, alpha, sigma, "v_prediction"), sched.get_velocity(x0, eps, t))


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("prediction_type", VP_TYPES)
def test_to_x0_eps_matches_ddim_step(beta_schedule, prediction_type):
    """DDIM (eta=0): x0 is its pred_original_sample, and x_prev = alpha_prev x0 + sigma_prev eps."""
    sched = _scheduler(beta_schedule, prediction_type)
    sched.set_timesteps(10)
    z_t, model_output = _tensors(seed=1)
    for t in sched.timesteps[[0, 4, 9]]:
        step = sched.step(model_output, t, z_t)
        alpha, sigma = VPSchedule(sched.alphas_cumprod).alpha_sigma(t.expand(len(z_t)), z_t)
        x0, eps = to_x0_eps(model_output, z_t, alpha, sigma, prediction_type)
        torch.testing.assert_close(x0, step.pred_original_sample, rtol=1e-4, atol=1e-4)
        t_prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
        abar_prev = sched.alphas_cumprod[t_prev] if t_prev >= 0 else sched.final_alpha_cumprod
        x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
        torch.testing.assert_close(x_prev, step.prev_sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("prediction_type", VP_TYPES)
def test_round_trips(beta_schedule, prediction_type):
    abar = DDPMScheduler(beta_schedule=beta_schedule, **SCHEDULES[beta_schedule]).alphas_cumprod
    x0, eps = _tensors(seed=2)
    alpha, sigma = VPSchedule(abar).alpha_sigma(torch.tensor([50, 500, 950]), x0)
    z_t = add_noise(x0, eps, alpha, sigma)
    target = from_x0_eps(x0, eps, alpha, sigma, prediction_type)
    x0_back, eps_back = to_x0_eps(target, z_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_back, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_back, eps, rtol=1e-4, atol=1e-4)
    out = torch.randn_like(z_t)
    x0_out, eps_out = to_x0_eps(out, z_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(from_x0_eps(x0_out, eps_out, alpha, sigma, prediction_type), out, rtol=1e-4, atol=1e-4)


def test_unknown_prediction_type_names_the_valid_ones():
    x = torch.zeros(1, 1)
    for fn in (lambda: to_x0_eps(x, x, x, x, "flow"), lambda: from_x0_eps(x, x, x, x, "flow")):
        with pytest.raises(ValueError, match="'flow'.*'epsilon', 'v_prediction', 'sample', 'flow_prediction'"):
            fn()


def test_flow_prediction_matches_flow_match_euler_step():
    """Rectified flow: x0 = z_t - sigma u, and one Euler step of FlowMatchEulerDiscreteScheduler is
    z_{t'} = (1 - sigma') x0 + sigma' eps with (x0, eps) from `to_x0_eps`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    z_t, u = _tensors(seed=3)
    schedule = FlowSchedule(shift=3.0)
    for i in (0, 2):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        alpha_t, sigma_t = schedule.alpha_sigma(sigma.expand(len(z_t)), z_t)
        x0, eps = to_x0_eps(u, z_t, alpha_t, sigma_t, "flow_prediction")
        sched._step_index = i
        expected = sched.step(u, sched.timesteps[i], z_t).prev_sample
        torch.testing.assert_close(schedule.add_noise(x0, eps, sigma_next.expand(len(z_t))), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(from_x0_eps(x0, eps, alpha_t, sigma_t, "flow_prediction"), u, rtol=1e-4, atol=1e-4)
