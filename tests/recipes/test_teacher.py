"""A real, short run of the teacher recipe on the committed emoji, end to end."""

import json
from pathlib import Path

import pytest
import torch

from distill.config import load_config
from recipes import teacher as recipe

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "teacher" / "emoji_sd.yaml"


def test_center_latents_keeps_decoder_output_and_zeroes_the_mean():
    torch.manual_seed(0)
    vae = recipe.build_vae(recipe.VaeConfig()).eval()
    with torch.no_grad():  # make the latent mean clearly non-zero, as a trained VAE's is
        vae.quant_conv.bias[:4] += torch.tensor([1.5, 2.0, -0.8, 2.8])
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(images).latent_dist.mean).sample
        stats = recipe.center_latents(vae, images)
        means = vae.encode(images).latent_dist.mean
        after = vae.decode(means).sample
    assert torch.allclose(before, after, atol=1e-5)
    assert means.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert stats["scaling_factor"] == pytest.approx(1 / (means.std().item()), rel=1e-3)
    assert vae.config.scaling_factor == stats["scaling_factor"]


def test_diffusion_loss_targets_velocity_for_v_prediction():
    scheduler = recipe.build_scheduler(recipe.UnetConfig(prediction_type="v_prediction"))
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    v = scheduler.get_velocity(z0, eps, t)

    def perfect(z_t, t, encoder_hidden_states):  # a model that outputs exactly v
        return type("Out", (), {"sample": v})

    loss = recipe.diffusion_loss(perfect, scheduler, z0, None, t, eps, snr_gamma=5.0)
    assert loss.shape == (2,) and torch.allclose(loss, torch.zeros(2))


OVERRIDES = ["data.max_samples=64", "vae.max_train_steps=3", "vae.batch_size=8", "train_batch_size=8",
             "checkpointing_steps=2", "sample_steps=2", "sample_prompts=[banana, dog face]", "max_train_minutes=null",
             "vae.max_train_minutes=null", "report_to=none"]


def _run(tmp_path, *more):
    overrides = [f"output_dir={tmp_path / 'runs'}", f"teacher={tmp_path / 'teacher'}", *OVERRIDES, *more]
    return recipe.main(load_config(CONFIG, recipe.TeacherConfig, overrides))


def _weights(run_dir, step):
    from safetensors.torch import load_file

    checkpoint = run_dir / "unet" / "checkpoints" / f"step-{step:07d}" / "modules"
    unet = load_file(str(checkpoint / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = torch.load(checkpoint / "ema" / "state.pt", weights_only=True)["shadow_params"]
    return unet, ema


@pytest.mark.slow
def test_short_run_writes_a_loadable_pipeline_and_a_resume_after_a_kill_ends_exactly_where_it_would(tmp_path):
    import shutil

    from diffusers import StableDiffusionPipeline

    straight = _run(tmp_path / "a", "max_train_steps=5", "checkpoints_total_limit=null")
    assert (straight / "config.yaml").is_file() and (straight / "samples.png").is_file()
    assert json.loads((straight / "vae" / "final" / "stats.json").read_text())["psnr_db"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a" / "teacher")
    out = pipe(["banana"], num_inference_steps=2, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0), height=32, width=32).images
    assert out.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(out)).all()

    # A copy of the run as it was when killed after the VAE's step-2 checkpoint: nothing later exists.
    killed = tmp_path / "b" / "runs" / straight.name
    shutil.copytree(straight, killed)
    for later in (killed / "vae" / "checkpoints" / "step-0000003", killed / "vae" / "final", killed / "unet"):
        shutil.rmtree(later)
    resumed = _run(tmp_path / "b", "max_train_steps=5", "checkpoints_total_limit=null", "resume_from_checkpoint=latest",
                   "allow_config_change=true")  # the copy was started writing its pipeline to a/teacher, not b/teacher
    assert resumed == killed
    # Both stages went on from there and ended where the uninterrupted run ended: VAE, UNet, EMA, data order.
    (unet_a, ema_a), (unet_b, ema_b) = _weights(straight, 5), _weights(resumed, 5)
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    assert len(ema_a) == len(ema_b) and all(torch.equal(a, b) for a, b in zip(ema_a, ema_b))
