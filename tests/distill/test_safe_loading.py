"""Safe loading: pickle weights are refused unless the user says so; nothing sets trust_remote_code."""

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from distill.errors import ModelError
from distill.teacher import Teacher


def test_a_teacher_with_pickle_weights_is_refused_unless_allowed(tiny_sd_path, tmp_path, monkeypatch):
    pickled = tmp_path / "pickled"
    DiffusionPipeline.from_pretrained(tiny_sd_path).save_pretrained(pickled, safe_serialization=False)
    for weights in pickled.rglob("*.safetensors"):  # transformers saves safetensors regardless: make it a pickle
        torch.save(load_file(str(weights)), weights.with_name("pytorch_model.bin"))
        weights.unlink()
    assert not list(pickled.rglob("*.safetensors")) and list(pickled.rglob("*.bin"))
    monkeypatch.delenv("DISTILL_ALLOW_PICKLE", raising=False)
    with pytest.raises(ModelError, match="pickle weights .* DISTILL_ALLOW_PICKLE=1"):
        Teacher.from_pretrained(pickled)
    monkeypatch.setenv("DISTILL_ALLOW_PICKLE", "1")
    assert Teacher.from_pretrained(pickled).kind == "sd"


def test_no_code_sets_trust_remote_code():
    root = Path(__file__).resolve().parents[2]
    sources = [p for folder in ("distill", "recipes", "evals") for p in (root / folder).rglob("*.py")]
    assert sources and not [p for p in sources if "trust_remote_code=True" in p.read_text()]
