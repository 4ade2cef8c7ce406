"""The committed flow-matching teacher: loads offline with plain diffusers, samples with its stock scheduler, and
its prompts mean something."""

from pathlib import Path

import pytest
import torch

TEACHER = Path(__file__).resolve().parents[2] / "checkpoints" / "emoji-sd3"
PROMPTS = ["grinning face", "red heart", "woman with headscarf"]


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(TEACHER, text_encoder_3=None, tokenizer_3=None)


def generate(pipe, prompts, steps):
    return torch.from_numpy(pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, height=32, width=32,
                                 max_sequence_length=16, output_type="np",
                                 generator=torch.Generator().manual_seed(0)).images).permute(0, 3, 1, 2) * 2 - 1


def test_its_stock_scheduler_samples_each_prompt_closer_to_its_own_emoji_than_to_the_others(pipe):
    """Prompt alignment, not only shapes: at 28 Euler steps (SD3's default) each prompt's sample is nearest, in
    pixels, to the real emoji of that caption among the three."""
    from distill.config import DataConfig
    from recipes.teacher import load_images

    images, captions = load_images(DataConfig(source="emoji:32", resolution=32))
    real = torch.stack([images[captions.index(p)] for p in PROMPTS])
    fake = generate(pipe, PROMPTS, 28)
    assert fake.shape == (3, 3, 32, 32) and torch.isfinite(fake).all()
    distance = torch.cdist(fake.flatten(1), real.flatten(1))  # [sample, real]
    assert distance.argmin(dim=1).tolist() == [0, 1, 2], distance


def test_it_is_the_committed_design(pipe):
    """Width 256 on 2x2 patches, velocity on the stock flow scheduler, no T5, weights stored in half precision."""
    from safetensors import safe_open

    config = pipe.transformer.config
    assert (config.patch_size, config.num_attention_heads * config.attention_head_dim) == (2, 256)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 1.0
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor == 0.0
    stored = safe_open(TEACHER / "transformer" / "diffusion_pytorch_model.safetensors", "pt")
    assert stored.get_tensor(next(iter(stored.keys()))).dtype == torch.float16
    assert next(pipe.transformer.parameters()).dtype == torch.float32


def test_teacher_adaptor_and_the_flow_samplers_take_it(pipe):
    import diffusers

    from distill.teacher import Teacher

    teacher = Teacher.from_pretrained(str(TEACHER))
    assert teacher.kind == "sd3" and teacher.latent_shape() == (4, 8, 8)
    pipe.scheduler = diffusers.FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
    out = generate(pipe, PROMPTS[:2], 4)
    assert out.shape == (2, 3, 32, 32) and out.std() > 0.05
