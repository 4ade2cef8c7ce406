"""Random-weight miniature flow-matching pipelines (SD3, FLUX), built offline, for tests and smoke runs.

As `distill.tiny` does for the UNet families: the real diffusers / transformers classes at tiny sizes, seeded so
the weights are the same on every call, saved with `save_pretrained` into a folder that a bare
`DiffusionPipeline.from_pretrained(path)` loads (so both carry a tiny T5 encoder and tokenizer, built here
without a download).

- `build_tiny_sd3`:  StableDiffusion3Pipeline (two CLIP encoders with projections, a T5, SD3Transformer2DModel,
  FlowMatchEulerDiscreteScheduler with SD3's shift 3), latents 4x8x8, images 16 px.
- `build_tiny_flux`: FluxPipeline (CLIP pooled + T5 sequence, FluxTransformer2DModel with a guidance embedding,
  2x2-packed latents, dynamic shifting as FLUX.1-dev ships), latents 4x8x8, images 16 px.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.tiny import SEED, TEXT_DIM, clip_text_model, save_pipeline, tiny_vae, write_clip_tokenizer

T5_DIM = 2 * TEXT_DIM  # SD3 pads the concatenated CLIP states up to the T5 width (joint_attention_dim)
T5_TOKENS = 32  # max_sequence_length the tiny pipelines are called with


def write_t5_tokenizer(folder: str | Path):
    """A character-level T5 tokenizer (Unigram over "▁x" and "x" pieces) written to `folder` and returned."""
    from transformers import T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?-':"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + c, -1.0) for c in chars] + [(c, -2.0) for c in chars] + [("▁", -3.0)]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(str(folder))
    return T5TokenizerFast.from_pretrained(str(folder))


def _t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=T5_DIM, d_ff=2 * T5_DIM, d_kv=16, num_layers=1,
                      num_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(SEED + 6)
    return T5EncoderModel(config).eval()


def _flow_vae():
    """The tiny VAE with SD3/FLUX's latent shift written out (their pipelines add `shift_factor` unconditionally)."""
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1, scaling_factor=0.9)
    return vae


def build_tiny_sd3(path: str | Path, patch_size: int = 1) -> Path:
    """Build and save a tiny StableDiffusion3Pipeline at `path` (see the module docstring); patch_size 2 as the
    embedded emoji SD3 and SD3 itself."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    path = Path(path)
    clip, t5 = _tokenizers(path)
    torch.manual_seed(SEED + 7)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=patch_size, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=T5_DIM, caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=16 // patch_size,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(),
        text_encoder=clip_text_model(clip, projection=True), tokenizer=clip,
        text_encoder_2=clip_text_model(clip, projection=True), tokenizer_2=clip,
        text_encoder_3=_t5(t5), tokenizer_3=t5,
    )
    return _save_flow(pipe, path)


def build_tiny_flux(path: str | Path) -> Path:
    """Build and save a tiny FluxPipeline at `path` (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    path = Path(path)
    clip, t5 = _tokenizers(path)
    torch.manual_seed(SEED + 8)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
        max_shift=1.15)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_flow_vae(), text_encoder=clip_text_model(clip), tokenizer=clip,
        text_encoder_2=_t5(t5), tokenizer_2=t5,
    )
    return _save_flow(pipe, path)


def _tokenizers(path: Path):
    """(CLIP, T5) tokenizers written into scratch folders of `path` (removed once the pipeline is saved)."""
    return write_clip_tokenizer(path / "_tokenizer"), write_t5_tokenizer(path / "_t5")


def _save_flow(pipe, path: Path) -> Path:
    import shutil

    save_pipeline(pipe, path)
    shutil.rmtree(path / "_t5", ignore_errors=True)
    return path
