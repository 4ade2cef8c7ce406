"""Random-weight miniature pipelines, built offline from configs, for tests and smoke runs.

Each builder uses the real diffusers / transformers classes at tiny sizes, seeds every module so
the weights are the same on every call, and writes a complete pipeline folder with
`save_pretrained` that `DiffusionPipeline.from_pretrained(path)` loads:

- `build_tiny_sd`:    StableDiffusionPipeline (CLIP or BERT text encoder), latents 4x8x8, images 16 px.
- `build_tiny_sdxl`:  StableDiffusionXLPipeline (two CLIP encoders, pooled embeds, text_time embedding).
- `build_tiny_unet2d`: DDPMPipeline with a pixel-space UNet2DModel, optionally class-conditional.

Sizes follow the real models' structure (scaled_linear betas, 4 latent channels, 77-token prompts)
so that code which works here meets the same shapes and code paths as SD 1.5 / SDXL.
Each folder is under ~2 MB and builds in well under a second once the libraries are imported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Block widths: (16, 32) keeps a whole pipeline under ~2 MB; GroupNorm needs groups | channels.
BLOCKS = (16, 32)
GROUPS = 8
TEXT_DIM = 32
MAX_TOKENS = 77
SAMPLE_SIZE = 8  # latent side; the VAE has 2 levels so images are 16 px
SEED = 0

# A few merges so the BPE code path is exercised (words the emoji captions use often).
MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "n</w>"), ("f", "a"),
          ("fa", "c"), ("fac", "e</w>"), ("s", "m"), ("i", "l"), ("e", "s</w>"), ("r", "e")]
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False}


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (the GPT-2 / CLIP mapping)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_clip_tokenizer(folder: str | Path, max_length: int = MAX_TOKENS):
    """Write vocab.json + merges.txt for a byte-level CLIP tokenizer and return the loaded CLIPTokenizer."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def write_bert_tokenizer(folder: str | Path, max_length: int = MAX_TOKENS):
    """Write a character-level vocab.txt for a BertTokenizer and return it loaded."""
    from transformers import BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"]
    words += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def clip_text_model(tokenizer, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED + 1 + projection)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _bert_text(tokenizer):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED + 1)
    return BertModel(config).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED + 3)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=BLOCKS, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=GROUPS, sample_size=SAMPLE_SIZE * 2,
    ).eval()


def _unet(**extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED + 4)
    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE, in_channels=4, out_channels=4, block_out_channels=BLOCKS, layers_per_block=1,
        norm_num_groups=GROUPS, **extra,
    ).eval()


def build_tiny_sd(path: str | Path, prediction_type: str = "epsilon", text_encoder: str = "clip") -> Path:
    """Build and save a tiny StableDiffusionPipeline (SD 1.x/2.x layout) at `path`.

    prediction_type: "epsilon" (SD 1.5, SD 2.1-base), "v_prediction" (SD 2.1-768) or "sample".
    text_encoder: "clip" (CLIPTextModel + CLIPTokenizer) or "bert" (BertModel + BertTokenizer, as the
    embedded MiniLM teacher). Scheduler: PNDM with SD's betas, as the real checkpoints ship.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    path = Path(path)
    if text_encoder == "clip":
        tokenizer = write_clip_tokenizer(path / "_tokenizer")
        encoder = clip_text_model(tokenizer)
    elif text_encoder == "bert":
        tokenizer = write_bert_tokenizer(path / "_tokenizer")
        encoder = _bert_text(tokenizer)
    else:
        raise ValueError(f"text_encoder must be 'clip' or 'bert', got {text_encoder!r}")
    unet = _unet(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8,
    )
    scheduler = PNDMScheduler(**SCHEDULER, skip_prk_steps=True, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return save_pipeline(pipe, path)


def build_tiny_sdxl(path: str | Path, prediction_type: str = "epsilon") -> Path:
    """Build and save a tiny StableDiffusionXLPipeline at `path`.

    Two CLIP text encoders (the second with a projection, giving pooled `text_embeds`), hidden states
    concatenated to 64 channels, and the `text_time` addition embedding fed 6 size ids (original, crop,
    target) of 8 channels each plus the pooled 32: projection_class_embeddings_input_dim = 6*8 + 32.
    Scheduler: Euler with SD's betas, as SDXL base ships.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    path = Path(path)
    tokenizer = write_clip_tokenizer(path / "_tokenizer")
    time_dim = 8
    unet = _unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_DIM, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * time_dim + TEXT_DIM,
    )
    sched = {k: v for k, v in SCHEDULER.items() if k != "set_alpha_to_one"}
    scheduler = EulerDiscreteScheduler(**sched, prediction_type=prediction_type, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=clip_text_model(tokenizer), text_encoder_2=clip_text_model(tokenizer, projection=True),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    return save_pipeline(pipe, path)


def build_tiny_unet2d(path: str | Path, num_class_embeds: int | None = None, prediction_type: str = "epsilon") -> Path:
    """Build and save a tiny pixel-space DDPMPipeline (UNet2DModel, 3x8x8 images, linear betas) at `path`.

    num_class_embeds: None for an unconditional model, else the number of class embeddings
    (the model then takes `class_labels` in [0, num_class_embeds)).
    """
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(SEED + 5)
    unet = UNet2DModel(
        sample_size=SAMPLE_SIZE, in_channels=3, out_channels=3, block_out_channels=BLOCKS, layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=GROUPS, attention_head_dim=8, num_class_embeds=num_class_embeds,
    ).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)
    return save_pipeline(DDPMPipeline(unet=unet, scheduler=scheduler), Path(path))


def save_pipeline(pipe, path: Path) -> Path:
    """save_pretrained, plus the plain vocab files next to tokenizer.json so older transformers load them too."""
    import shutil

    pipe.save_pretrained(str(path), safe_serialization=True)
    source = path / "_tokenizer"
    for folder in path.glob("tokenizer*"):
        for name in ("vocab.json", "merges.txt", "vocab.txt"):
            if (source / name).is_file() and not (folder / name).exists():
                shutil.copy(source / name, folder / name)
    shutil.rmtree(source, ignore_errors=True)
    return path
