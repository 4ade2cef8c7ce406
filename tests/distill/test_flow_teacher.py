"""The flow-matching families (SD3, FLUX) behind the one denoiser interface, on tiny random pipelines."""

import pytest
import torch
from diffusers import DiffusionPipeline

from distill.schedule import FlowSchedule
from distill.teacher import Teacher


@pytest.fixture(scope="module")
def sd3(tiny_sd3_path):
    return Teacher.from_pretrained(tiny_sd3_path)


@pytest.fixture(scope="module")
def sd3_patch2(tmp_path_factory):
    """SD3 with 2x2 latent patches, as the embedded emoji SD3 (and SD3 itself): 4x4 image tokens on 8x8 latents."""
    from distill.tiny_flow import build_tiny_sd3

    return Teacher.from_pretrained(build_tiny_sd3(tmp_path_factory.mktemp("sd3_patch2") / "pipe", patch_size=2))


@pytest.fixture(scope="module")
def flux(tiny_flux_path):
    return Teacher.from_pretrained(tiny_flux_path)


def test_sd3_teacher_loads_with_its_flow_schedule_and_shapes(sd3):
    assert sd3.kind == "sd3" and isinstance(sd3.schedule, FlowSchedule) and sd3.schedule.shift == 3.0
    assert sd3.prediction_type == "flow_prediction" and sd3.latent_shape(16) == (4, 8, 8)
    assert not any(p.requires_grad for p in sd3.pipe.text_encoder_3.parameters())
    cond = sd3.encode_prompt(["grinning face", "banana"], 16)
    assert cond.encoder_hidden_states.shape[0] == 2 and cond.pooled().shape == (2, 64)


def test_flow_conversions_step_as_flow_match_euler_does(sd3):
    """x0/eps from a velocity, then the schedule's forward process at the next sigma, is the scheduler's Euler step."""
    scheduler = sd3.pipe.scheduler
    scheduler.set_timesteps(4)
    z, u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, sigma, sigma_next = scheduler.timesteps[1], scheduler.sigmas[1], scheduler.sigmas[2]
    expected = scheduler.step(u, t, z, return_dict=False)[0]
    x0, eps = sd3.to_x0_eps(u, z, sigma.expand(2))
    torch.testing.assert_close(sd3.add_noise(x0, eps, sigma_next.expand(2)), expected, atol=1e-5, rtol=1e-5)


def _euler(teacher, cond, sigmas, z, guidance):
    """A manual flow sampler through the interface only: x0/eps from the guided output, then z at the next sigma."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        out = teacher.guided(z, sigma.expand(len(z)), cond, guidance)
        x0, eps = teacher.to_x0_eps(out, z, sigma.expand(len(z)))
        z = teacher.add_noise(x0, eps, sigma_next.expand(len(z)))
    return z


def test_manual_euler_through_the_sd3_adaptor_reproduces_the_pipeline(sd3, tiny_sd3_path):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd3_path)
    prompts = ["grinning face", "dog face"]
    expected = pipe(prompts, height=16, width=16, num_inference_steps=4, guidance_scale=3.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images
    z = torch.randn((2, *sd3.latent_shape(16)), generator=torch.Generator().manual_seed(0))
    sigmas = torch.cat([sd3.schedule.grid(4).flip(0), torch.zeros(1)])  # the schedule's own 4-step grid
    got = _euler(sd3, sd3.encode_prompt(prompts, 16), sigmas, z, 3.0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_flux_adaptor_packs_latents_and_feeds_guidance_as_an_input(flux, tiny_flux_path):
    assert flux.kind == "flux" and flux.family.embeds_guidance and flux.latent_shape(16) == (4, 8, 8)
    pipe = DiffusionPipeline.from_pretrained(tiny_flux_path)
    expected = pipe("banana", height=16, width=16, num_inference_steps=3, guidance_scale=3.5, output_type="latent",
                    generator=torch.Generator().manual_seed(1)).images
    z = torch.randn((1, *flux.latent_shape(16)), generator=torch.Generator().manual_seed(1))
    pipe.scheduler.set_timesteps(sigmas=[1.0, 2 / 3, 1 / 3], mu=_mu(16))  # FluxPipeline's sigmas at 3 steps, 16 patches
    got = _euler(flux, flux.encode_prompt(["banana"], 16), pipe.scheduler.sigmas, z, 3.5)
    packed = pipe._pack_latents(got, 1, 4, 8, 8)
    torch.testing.assert_close(packed, expected, atol=1e-4, rtol=1e-4)
    other = flux.guided(z, torch.ones(1), flux.encode_prompt(["banana"], 16), 1.0)
    assert not torch.allclose(other, flux.guided(z, torch.ones(1), flux.encode_prompt(["banana"], 16), 3.5))


def _mu(patches):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(patches, 256, 4096, 0.5, 1.15)


@pytest.mark.parametrize("name", ["sd3", "sd3_patch2", "flux"])
def test_transformer_features_are_image_token_maps(name, request):
    teacher = request.getfixturevalue(name)
    z = torch.randn(2, *teacher.latent_shape(16), requires_grad=True)
    feats = teacher.features(z, torch.full((2,), 0.5), teacher.encode_prompt(["a", "b"], 16))
    side = 8 // teacher.family.latent_multiple
    assert feats and all(f.shape[0] == 2 and f.shape[-2:] == (side, side) for f in feats)
    sum(f.square().mean() for f in feats).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
