"""distill.tiny: deterministic, small, loadable, with a working offline tokenizer."""

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from distill.tiny import build_tiny_unet2d


def _size(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_tiny_pipelines_are_small(tiny_sd_path, tiny_sdxl_path, tiny_unet2d_path):
    for path in (tiny_sd_path, tiny_sdxl_path, tiny_unet2d_path):
        assert _size(path) < 2.5e6, path


def test_builds_are_deterministic(tmp_path, tiny_unet2d_path):
    again = build_tiny_unet2d(tmp_path / "again")
    a = load_file(tiny_unet2d_path / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(again / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_clip_tokenizer_is_byte_level_bpe(tiny_sd_path):
    tokenizer = DiffusionPipeline.from_pretrained(tiny_sd_path).tokenizer
    ids = tokenizer("The face").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "the</w>", "face</w>", "<|endoftext|>"]  # lower-cased, merged
    assert tokenizer.unk_token_id not in tokenizer("héllo ✨ 123").input_ids[1:-1]  # every byte is in the vocab
    assert tokenizer.model_max_length == 77
    assert (tiny_sd_path / "tokenizer" / "vocab.json").is_file()
