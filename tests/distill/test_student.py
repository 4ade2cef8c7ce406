"""distill.student: guidance embedding as diffusers' pipelines build it; full and LoRA students start as the teacher."""

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from distill.errors import ModelError
from distill.student import (
    AdapterEMA,
    LORA_WEIGHTS, StudentInfo, adapters_disabled, add_lora, build_full_student, guidance_embedding, load_lora,
    lora_state_dict, predict, save_lora,
)
from distill.teacher import Teacher


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    return Teacher.from_pretrained(tiny_sd_path)


def _inputs(teacher, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, *teacher.latent_shape(), generator=g)
    return z, torch.tensor([999, 259][:batch]), teacher.encode_prompt(["a face", "red heart"][:batch])


@pytest.mark.parametrize("dim", [256, 33])
def test_guidance_embedding_matches_diffusers_pipelines(dim):
    omega = torch.tensor([0.0, 1.0, 2.5, 13.0])  # = guidance_scale - 1, as the pipelines pass it
    ours = guidance_embedding(omega, dim)
    for pipeline in (StableDiffusionPipeline, StableDiffusionXLPipeline, LatentConsistencyModelPipeline):
        reference = pipeline.get_guidance_scale_embedding(None, omega, embedding_dim=dim)
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert ours.shape == (4, dim)


def test_full_student_starts_as_the_teacher_and_takes_guidance(sd):
    student = build_full_student(sd.unet, time_cond_proj_dim=32)
    assert student.config.time_cond_proj_dim == 32 and sd.unet.config.time_cond_proj_dim is None
    assert student.dtype == torch.float32 and all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in sd.unet.parameters())
    z, t, cond = _inputs(sd)
    with torch.no_grad():
        expected = sd(z, t, cond)
        for omega in (0.0, 2.0, 7.0):  # the zero-initialised projection ignores omega at first
            emb = guidance_embedding(torch.full((2,), omega), 32)
            torch.testing.assert_close(predict(student, z, t, cond, emb), expected, rtol=1e-5, atol=1e-5)
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.5)
        a = predict(student, z, t, cond, guidance_embedding(torch.full((2,), 1.0), 32))
        b = predict(student, z, t, cond, guidance_embedding(torch.full((2,), 5.0), 32))
    assert (a - b).abs().max() > 1e-3  # once trained, omega changes the output


def test_lora_student_is_the_teacher_with_adapters_disabled(tiny_sd_path):
    teacher = Teacher.from_pretrained(tiny_sd_path)
    z, t, cond = _inputs(teacher)
    with torch.no_grad():
        before = teacher(z, t, cond)
    params = add_lora(teacher.unet, rank=4)
    trainable = [n for n, p in teacher.unet.named_parameters() if p.requires_grad]
    assert params and all("lora" in n for n in trainable) and len(trainable) == len(params)
    assert all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        torch.testing.assert_close(teacher(z, t, cond), before)  # lora_B starts at zero
        for name, p in teacher.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        after = teacher(z, t, cond)
        with adapters_disabled(teacher.unet):
            torch.testing.assert_close(teacher(z, t, cond), before)
        torch.testing.assert_close(teacher(z, t, cond), after)  # re-enabled on exit
    assert (after - before).abs().max() > 1e-3
    # The LCM-LoRA targets cover attention, feed-forward, resnet convs and the time projections.
    targeted = {n.rsplit(".lora_", 1)[0].split(".")[-1] for n in trainable}
    assert {"to_q", "to_k", "to_v", "proj_in", "conv1", "conv2", "time_emb_proj"} <= targeted


def test_lora_save_load_round_trip(tiny_sd_path, tmp_path):
    teacher = Teacher.from_pretrained(tiny_sd_path)
    add_lora(teacher.unet, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in teacher.unet.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    state = {k: v.clone() for k, v in lora_state_dict(teacher.unet).items()}
    path = save_lora(teacher.unet, tmp_path, "sd")
    assert path == tmp_path / LORA_WEIGHTS and path.is_file()
    fresh = Teacher.from_pretrained(tiny_sd_path)
    add_lora(fresh.unet, rank=4, alpha=8)
    load_lora(fresh.unet, tmp_path, "sd")
    loaded = lora_state_dict(fresh.unet)
    assert loaded.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(loaded[key], state[key])


def test_bad_targets_and_teachers_are_model_errors(tiny_sd_path, tiny_unet2d_path, tmp_path):
    teacher = Teacher.from_pretrained(tiny_sd_path)
    with pytest.raises(ModelError, match="target modules"):
        add_lora(teacher.unet, rank=4, target_modules=("no_such_layer",))
    with pytest.raises(ModelError, match="UNet2DConditionModel"):
        build_full_student(Teacher.from_pretrained(tiny_unet2d_path).unet)
    with pytest.raises(ModelError, match="student.json"):
        StudentInfo.load(tmp_path)


def test_adapter_ema_averages_and_swaps_in_place():
    layer = torch.nn.Linear(3, 2)
    params = list(layer.parameters())
    start = [p.detach().clone() for p in params]
    ema = AdapterEMA(params, decay=0.9)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ema.update()  # shadow = 0.9 start + 0.1 (start + 1) = start + 0.1
    online = [p.detach().clone() for p in params]
    x = torch.randn(4, 3)
    with ema.applied():
        assert list(layer.parameters())[0] is params[0]  # the optimizer's objects, with other values
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, start[0] + 0.1, start[1] + 0.1))
    for p, o in zip(params, online):
        assert torch.equal(p, o)  # swapped back exactly
    ema.reset()
    for shadow, o in zip(ema.shadow, online):
        assert torch.equal(shadow, o)
