"""distill.consistency against diffusers' own DDIMScheduler and LCMScheduler."""

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from distill import prediction
from distill.consistency import DDIMSolver, boundary_scalings, consistency_output, inference_timesteps, lcm_sampler
from distill.schedule import FlowSchedule, VPSchedule

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_solver_timesteps_are_the_skipping_grid():
    solver = DDIMSolver(VPSchedule(DDIMScheduler(**SD_BETAS).alphas_cumprod), 50)
    assert solver.timesteps[0] == 19 and solver.timesteps[-1] == 999
    index = torch.tensor([0, 1, 49])
    assert solver.start(index).tolist() == [19, 39, 999]
    assert solver.end(index).tolist() == [0, 19, 979]  # t_n = t_{n+k} - k, clamped at 0
    n = solver.sample_index(4096, torch.Generator().manual_seed(0))
    assert n.min() == 0 and n.max() == 49


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_solver_step_matches_ddim_scheduler(prediction_type):
    """Same z_{t_n} as DDIMScheduler.step (eta 0, trailing spacing, 50 steps) from the output that encodes x0, eps."""
    scheduler = DDIMScheduler(**SD_BETAS, prediction_type=prediction_type, clip_sample=False,
                              set_alpha_to_one=False, timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    schedule = VPSchedule(scheduler.alphas_cumprod)
    solver = DDIMSolver(schedule, 50)
    assert sorted(scheduler.timesteps.tolist()) == solver.timesteps.tolist()
    x0, eps = _randn(2, 4, 8, 8, seed=1), _randn(2, 4, 8, 8, seed=2)
    for n in (0, 1, 13, 49):
        t = int(solver.timesteps[n])
        alpha, sigma = schedule.alpha_sigma(torch.tensor([t, t]), x0)
        z_t = prediction.add_noise(x0, eps, alpha, sigma)
        output = prediction.from_x0_eps(x0, eps, alpha, sigma, prediction_type)
        expected = scheduler.step(output, t, z_t, eta=0.0).prev_sample
        got = solver.step(x0, eps, torch.tensor([n, n]))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("timestep_scaling", [10.0, 4.0])
def test_boundary_scalings_match_lcm_scheduler(timestep_scaling):
    scheduler = LCMScheduler(**SD_BETAS, timestep_scaling=timestep_scaling)
    t = torch.tensor([0, 1, 19, 259, 500, 999])
    c_skip, c_out = boundary_scalings(t, timestep_scaling=timestep_scaling)
    for i, ti in enumerate(t.tolist()):
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(float(ref_skip), rel=1e-6, abs=1e-12)
        assert c_out[i].item() == pytest.approx(float(ref_out), rel=1e-6, abs=1e-12)
    assert c_skip[0] == 1 and c_out[0] == 0  # f(z, 0) = z


def test_consistency_output_is_identity_at_t0_and_x0_at_large_t():
    z, x0 = _randn(2, 4, 8, 8, seed=3), _randn(2, 4, 8, 8, seed=4)
    torch.testing.assert_close(consistency_output(z, x0, torch.tensor([0, 0])), z)
    far = consistency_output(z, x0, torch.tensor([999, 999]))
    torch.testing.assert_close(far, x0, atol=1e-3, rtol=0)  # c_skip(999) ~ 2.5e-8, c_out ~ 1
    mixed = consistency_output(z, x0, torch.tensor([0, 999]))
    torch.testing.assert_close(mixed[0], z[0])


@pytest.mark.parametrize("original_steps", [50, 25])
def test_inference_timesteps_match_lcm_scheduler(original_steps):
    scheduler = LCMScheduler(**SD_BETAS)
    for steps in (1, 2, 3, 4, 8):
        scheduler.set_timesteps(steps, original_inference_steps=original_steps)
        assert inference_timesteps(steps, original_steps).tolist() == scheduler.timesteps.tolist()
    with pytest.raises(ValueError):
        inference_timesteps(0)


def test_solver_on_a_flow_schedule_is_flow_match_euler():
    """The same solver on a flow-matching schedule: one step is FlowMatchEulerDiscreteScheduler's Euler step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    schedule = FlowSchedule(shift=3.0)
    solver = DDIMSolver(schedule, 4)
    x0, eps = _randn(2, 4, 8, 8, seed=1), _randn(2, 4, 8, 8, seed=2)
    for n in (1, 3):  # ascending index n is the scheduler's step 3 - n
        sigma = solver.start(torch.tensor([n, n]))
        z_t = schedule.add_noise(x0, eps, sigma)
        scheduler._step_index = 3 - n
        expected = scheduler.step(eps - x0, scheduler.timesteps[3 - n], z_t).prev_sample
        torch.testing.assert_close(solver.step(x0, eps, torch.tensor([n, n])), expected, rtol=1e-4, atol=1e-5)


def test_lcm_sampler_builds_the_lcm_scheduler_of_the_teacher_schedule():
    spec = lcm_sampler(10, 10.0, "v_prediction", 1.0, steps=[1, 2, 4, 8, 16])
    scheduler = spec.build(DDIMScheduler(**SD_BETAS, prediction_type="v_prediction").config)
    assert isinstance(scheduler, LCMScheduler) and spec.steps == [1, 2, 4, 8]
    assert scheduler.config.original_inference_steps == 10 and scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear" and not scheduler.config.clip_sample
