"""recipes/teacher_sd3.py: its pieces against references, and a real, short run that writes a loadable SD3 pipeline."""

from pathlib import Path

import pytest
import torch

from distill.config import load_config
from distill.text import load_minilm
from recipes import teacher_sd3 as recipe

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "teacher_sd3" / "emoji_sd3.yaml"
CAPTIONS = ["grinning face", "woman firefighter: medium-dark skin tone", "flag: France", "banana"]


def test_cut_tokenizer_splits_captions_exactly_as_minilm_and_ends_them_with_its_eos(tmp_path):
    full, _ = load_minilm(16)
    cut = recipe.cut_tokenizer(CAPTIONS, tmp_path, 16)
    assert len(cut) < 600 < len(full)
    for caption in CAPTIONS + ["zebra"]:  # an unseen word still tokenizes (single characters are kept)
        assert cut.tokenize(caption) == (full.tokenize(caption) if caption != "zebra" else cut.tokenize(caption))
        assert "[UNK]" not in cut.tokenize(caption)
    encoder = recipe.build_text_encoder(recipe.TextConfig(), cut, seed=0)
    ids = cut(["banana"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    eos = (ids[0] == cut.sep_token_id).nonzero()[0].item()
    out = encoder(ids, output_hidden_states=True)
    # CLIP pools at the end-of-text token: the projection of that position's final state
    expected = encoder.text_projection(out.last_hidden_state[0, eos])
    torch.testing.assert_close(out.text_embeds[0], expected)


def test_flow_matching_loss_is_zero_for_the_true_velocity():
    z0, eps, sigma = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9])

    def perfect(hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        expected_z = (1 - sigma[:, None, None, None]) * z0 + sigma[:, None, None, None] * eps
        assert torch.allclose(hidden_states, expected_z) and torch.allclose(timestep, sigma * 1000)
        return (eps - z0,)

    loss = recipe.flow_matching_loss(perfect, z0, None, None, sigma, eps)
    assert loss.shape == (3,) and torch.allclose(loss, torch.zeros(3))
    assert recipe.flow_matching_loss(lambda **kw: (torch.zeros_like(z0),), z0, None, None, sigma, eps).min() > 0.5


@pytest.mark.slow
def test_short_run_writes_an_sd3_pipeline_that_plain_diffusers_and_distill_load(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from safetensors import safe_open

    from distill.teacher import Teacher

    cfg = load_config(CONFIG, recipe.Sd3TeacherConfig, [
        f"output_dir={tmp_path / 'runs'}", f"teacher={tmp_path / 'sd3'}", "data.max_samples=32", "max_train_steps=3",
        "train_batch_size=8", "text.max_train_steps=3", "text.batch_size=8", "transformer.num_layers=1",
        "checkpointing_steps=2", "sample_steps=2", "sample_prompts=[banana]", "report_to=none"])
    run = recipe.main(cfg)
    assert (run / "samples.png").is_file() and (run / "transformer" / "checkpoints").is_dir()
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3", text_encoder_3=None, tokenizer_3=None)
    out = pipe(["banana"], num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(out)).all()
    assert pipe.vae.config.shift_factor == 0.0
    stored = safe_open(tmp_path / "sd3" / "transformer" / "diffusion_pytorch_model.safetensors", "pt")
    assert {stored.get_tensor(k).dtype for k in stored.keys()} == {torch.float16}  # half the bytes in git
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}  # a plain load computes in float32
    teacher = Teacher.from_pretrained(tmp_path / "sd3")  # the null T5 is passed as None for the user
    assert teacher.kind == "sd3" and teacher.latent_shape() == (4, 8, 8)
