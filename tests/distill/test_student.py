"""distill.student: full and LoRA students start as the teacher, call it the teacher's way, save and load;
the guidance embedding is diffusers' own; named adapters share one base."""

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from peft import get_peft_model_state_dict

from distill.ema import AdapterEMA
from distill.errors import ModelError
from distill.guidance import guidance_embedding
from distill.info import LORA_WEIGHTS, StudentInfo
from distill.student import FullStudent, LoraStudent
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
    student = FullStudent(sd, time_cond_proj_dim=32)
    assert student.guidance_dim == 32 and sd.unet.config.time_cond_proj_dim is None
    assert student.network.dtype == torch.float32 and student.trainable_parameters() == list(student.parameters())
    assert not any(p.requires_grad for p in sd.unet.parameters())
    assert not any(p is q for p in student.parameters() for q in sd.unet.parameters())  # its own copy
    z, t, cond = _inputs(sd)
    with torch.no_grad():
        expected = sd(z, t, cond)
        for omega in (0.0, 2.0, 7.0):  # the zero-initialised projection ignores omega at first
            torch.testing.assert_close(student(z, t, cond, torch.full((2,), omega)), expected, rtol=1e-5, atol=1e-5)
        torch.nn.init.normal_(student.network.time_embedding.cond_proj.weight, std=0.5)
        a = student(z, t, cond, torch.full((2,), 1.0))
        b = student(z, t, cond, torch.full((2,), 5.0))
    assert (a - b).abs().max() > 1e-3  # once trained, omega changes the output
    target = student.frozen_copy()
    assert not target.trainable_parameters() and target.teacher is sd
    assert torch.equal(target.network.conv_in.weight, student.network.conv_in.weight)


def test_full_student_checkpoint_round_trip(sd, tmp_path):
    student = FullStudent(sd, time_cond_proj_dim=32)
    with torch.no_grad():
        student.network.conv_out.bias.add_(0.25)
    student.save_checkpoint(tmp_path)
    fresh = FullStudent(sd, time_cond_proj_dim=32)
    fresh.load_checkpoint(tmp_path)
    assert torch.equal(fresh.network.conv_out.bias, student.network.conv_out.bias)


def test_lora_student_is_the_teacher_with_adapters_disabled(tiny_sd_path):
    teacher = Teacher.from_pretrained(tiny_sd_path)
    z, t, cond = _inputs(teacher)
    with torch.no_grad():
        before = teacher(z, t, cond)
    student = LoraStudent(teacher, rank=4)
    params = student.trainable_parameters()
    trainable = [n for n, p in teacher.unet.named_parameters() if p.requires_grad]
    assert params and all("lora" in n for n in trainable) and len(trainable) == len(params)
    assert all(p.dtype == torch.float32 for p in params) and student.network is teacher.network
    with torch.no_grad():
        torch.testing.assert_close(student(z, t, cond), before)  # lora_B starts at zero
        for name, p in teacher.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        after = student(z, t, cond)
        with student.teacher_mode():
            torch.testing.assert_close(teacher(z, t, cond), before)
        torch.testing.assert_close(student(z, t, cond), after)  # re-enabled on exit
    assert (after - before).abs().max() > 1e-3
    assert student.trainable_parameters() == params  # teacher_mode leaves the adapters trainable afterwards
    # The LCM-LoRA targets cover attention, feed-forward, resnet convs and the time projections.
    targeted = {n.rsplit(".lora_", 1)[0].split(".")[-1] for n in trainable}
    assert {"to_q", "to_k", "to_v", "proj_in", "conv1", "conv2", "time_emb_proj"} <= targeted


def test_two_named_adapters_share_one_base(tiny_sd_path):
    """DMD2's shape: the generator's adapter and a fake-score adapter on the same frozen network."""
    teacher = Teacher.from_pretrained(tiny_sd_path)
    student = LoraStudent(teacher, rank=4)
    fake = student.add_adapter("fake_score", rank=2)
    mine = student.adapter_parameters()
    assert fake and mine and not {id(p) for p in fake} & {id(p) for p in mine}
    z, t, cond = _inputs(teacher)
    with torch.no_grad():
        for p in fake:
            p.normal_(std=0.1)
        generator_out = student(z, t, cond)  # its own adapter (B = 0): the teacher
        with student.adapter("fake_score"):
            fake_out = student(z, t, cond)
        torch.testing.assert_close(student(z, t, cond), generator_out)
    assert (fake_out - generator_out).abs().max() > 1e-3
    assert all(p.requires_grad for p in fake + mine)  # switching never freezes either optimizer's parameters


def test_lora_save_load_round_trip(tiny_sd_path, tmp_path):
    teacher = Teacher.from_pretrained(tiny_sd_path)
    student = LoraStudent(teacher, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in teacher.unet.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    state = {k: v.clone() for k, v in get_peft_model_state_dict(teacher.unet).items()}
    path = student.save_weights(tmp_path)
    assert path == tmp_path / LORA_WEIGHTS and path.is_file()
    fresh = Teacher.from_pretrained(tiny_sd_path)
    LoraStudent(fresh, rank=4, alpha=8).load_checkpoint(tmp_path)
    loaded = get_peft_model_state_dict(fresh.unet)
    assert loaded.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(loaded[key], state[key])


def test_bad_targets_and_teachers_are_model_errors(tiny_sd_path, tiny_unet2d_path, tmp_path):
    teacher = Teacher.from_pretrained(tiny_sd_path)
    with pytest.raises(ModelError, match="target modules"):
        LoraStudent(teacher, rank=4, target_modules=("no_such_layer",))
    with pytest.raises(ModelError, match="UNet2DConditionModel"):
        FullStudent(Teacher.from_pretrained(tiny_unet2d_path))
    with pytest.raises(ModelError, match="student.json"):
        StudentInfo.load(tmp_path)


def test_adapter_ema_averages_swaps_in_place_and_round_trips():
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
    other = AdapterEMA(params, decay=0.9)
    other.load_state_dict(ema.state_dict())
    for a, b in zip(other.shadow, ema.shadow):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        AdapterEMA(params[:1], 0.9).load_state_dict(ema.state_dict())
