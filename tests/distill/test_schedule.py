"""distill.schedule checked against diffusers' schedulers: the VP (DDPM) and flow-matching families."""

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from distill.errors import ModelError
from distill.schedule import FlowSchedule, VPSchedule, schedule_for

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_vp_alpha_sigma_gathers_sqrt_alphas_cumprod():
    scheduler = DDIMScheduler(**SD)
    schedule = schedule_for(scheduler)
    assert isinstance(schedule, VPSchedule) and schedule.prediction_type == "epsilon"
    t = torch.tensor([0, 499, 999])
    alpha, sigma = schedule.alpha_sigma(t, torch.zeros(3, 4, 8, 8))
    assert alpha.shape == sigma.shape == (3, 1, 1, 1)
    torch.testing.assert_close(alpha.flatten(), scheduler.alphas_cumprod[t].sqrt())
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    assert schedule.alpha_sigma(torch.tensor(10), torch.zeros(2, 3))[0].shape == (1, 1)


def test_vp_add_noise_matches_diffusers():
    scheduler = DDIMScheduler(**SD)
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 400, 980])
    torch.testing.assert_close(schedule_for(scheduler).add_noise(x0, eps, t), scheduler.add_noise(x0, eps, t))


def test_vp_grid_is_lcms_skipping_grid_and_sampling_covers_every_timestep():
    schedule = VPSchedule(DDIMScheduler(**SD).alphas_cumprod)
    assert schedule.grid(10).tolist() == list(range(99, 1000, 100))
    assert schedule.previous(torch.tensor([99, 999]), 10).tolist() == [0, 899]
    t = schedule.sample(20_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 999
    assert schedule.model_time(t) is t or torch.equal(schedule.model_time(t), t)


def test_vp_schedule_without_betas_is_a_model_error():
    class NoBetas:
        config = {"num_train_timesteps": 1000}

    with pytest.raises(ModelError, match="no DDPM noise schedule"):
        VPSchedule.from_scheduler(NoBetas(), "the pipeline at x")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_add_noise_and_grid_match_flow_match_euler(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = schedule_for(scheduler)
    assert isinstance(schedule, FlowSchedule) and schedule.prediction_type == "flow_prediction"
    scheduler.set_timesteps(8)
    sigmas = scheduler.sigmas[:-1]  # descending; the last entry is the terminal 0
    torch.testing.assert_close(schedule.grid(8), sigmas.flip(0).float())
    torch.testing.assert_close(schedule.model_time(sigmas), scheduler.timesteps.float())
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    expected = scheduler.scale_noise(x0, scheduler.timesteps[[1, 5]], eps)
    torch.testing.assert_close(schedule.add_noise(x0, eps, sigmas[[1, 5]]), expected)


def test_flow_previous_and_sample_stay_on_the_unit_interval():
    schedule = FlowSchedule(shift=3.0)
    grid = schedule.grid(4)
    torch.testing.assert_close(schedule.previous(grid, 4), torch.cat([torch.zeros(1), grid[:-1]]))
    sigma = schedule.sample(10_000, torch.Generator().manual_seed(0))
    assert 0 < sigma.min() and sigma.max() <= 1
    assert sigma.median() > 0.5  # shift 3 moves mass towards noise, as SD3 trains


def test_dynamic_shifting_is_refused_with_a_sentence():
    with pytest.raises(ModelError, match="dynamic"):
        schedule_for(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def test_dynamic_shift_is_the_one_fluxs_pipeline_computes_for_that_many_patches():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    schedule = schedule_for(scheduler, image_seq_len=1024)
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)  # what FluxPipeline does at 4 steps
    torch.testing.assert_close(schedule.shifted(torch.tensor([1.0, 0.75, 0.5, 0.25])), scheduler.sigmas[:-1].float())


def test_from_model_time_inverts_model_time_on_both_families():
    vp, flow = VPSchedule(torch.linspace(0.99, 0.01, 1000)), FlowSchedule(shift=3.0)
    t = torch.tensor([999, 500, 0])
    assert torch.equal(vp.from_model_time(vp.model_time(t)), t)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    torch.testing.assert_close(flow.from_model_time(scheduler.timesteps), scheduler.sigmas[:-1])
