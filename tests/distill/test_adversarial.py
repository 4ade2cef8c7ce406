"""Adversarial pieces of ADD/LADD: the losses against hand-computed values, the heads, the frozen backbones, DiffAugment.
"""

import pytest
import torch

from distill.augment import color, cutout, diff_augment, translation
from distill.backbones import Dinov2, EffNetLite1, build_backbone
from distill.cond import Cond
from distill.discriminator import Heads, timestep_embedding
from distill.errors import ConfigError
from distill.losses import add_distillation, hinge_fake, hinge_generator, hinge_real, r1_penalty


# ------------------------------------------------------------------------------------------------ losses
def test_hinge_terms_by_hand():
    logits = torch.tensor([[2.0, 0.5], [-3.0, 0.0]])  # 2 samples x 2 heads
    # real: max(0, 1 - l): [0, 0.5] -> 0.25 ; [4, 1] -> 2.5
    assert torch.allclose(hinge_real(logits), torch.tensor([0.25, 2.5]))
    # fake: max(0, 1 + l): [3, 1.5] -> 2.25 ; [0, 1] -> 0.5
    assert torch.allclose(hinge_fake(logits), torch.tensor([2.25, 0.5]))
    assert torch.allclose(hinge_generator(logits), torch.tensor([-1.25, 1.5]))


def test_r1_is_the_squared_gradient_norm_of_the_real_logits():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    logits = (x ** 2).sum(dim=1, keepdim=True)  # D(x) = |x|^2, grad 2x, |grad|^2 = 4 |x|^2
    (grad,) = torch.autograd.grad(logits.sum(), [x], create_graph=True)
    penalty = r1_penalty([grad])
    assert torch.allclose(penalty, torch.tensor([20.0, 40.0]))
    penalty.sum().backward()  # differentiable: R1 trains the discriminator
    assert torch.allclose(x.grad, 8 * x.detach())


def test_add_distillation_weights_by_c_t_and_stops_the_teacher_gradient():
    student = torch.zeros(2, 1, 2, 2, requires_grad=True)
    teacher = torch.ones(2, 1, 2, 2, requires_grad=True)
    loss = add_distillation(student, teacher, torch.tensor([0.5, 2.0]))
    assert torch.allclose(loss, torch.tensor([0.5, 2.0]))  # c(t) * mean (0 - 1)^2
    loss.sum().backward()
    assert teacher.grad is None and torch.allclose(student.grad[1], torch.full((1, 2, 2), -1.0))  # 2 * 2 * (0-1) / 4


def test_add_weight_c_t_is_alpha_t_of_the_teacher_schedule():
    from diffusers import DDPMScheduler

    from distill.schedule import schedule_for

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = schedule_for(scheduler, "test")
    t = torch.tensor([0, 499, 999])
    alpha = schedule.alpha_sigma(t, torch.zeros(3, 1))[0].flatten()
    assert torch.allclose(alpha, scheduler.alphas_cumprod[t].sqrt(), atol=1e-6)
    assert alpha[0] > alpha[1] > alpha[2]  # the teacher's x0 weighs most where it is sharpest


# ------------------------------------------------------------------------------------------------- heads
def test_heads_give_one_logit_per_sample_per_map_and_read_the_condition():
    torch.manual_seed(0)
    heads = Heads([8, 16], cond_dim=5, width=8, cmap_dim=8)
    maps = [torch.randn(3, 8, 4, 4), torch.randn(3, 16, 2, 2)]
    cond = torch.randn(3, 5)
    logits = heads(maps, cond)
    assert logits.shape == (3, 2)
    assert not torch.allclose(logits, heads(maps, cond.flip(0)))  # projection conditioning: text changes the logit
    with pytest.raises(ValueError, match="2 heads"):
        heads(maps[:1], cond)


def test_time_conditioned_heads_read_t():
    torch.manual_seed(0)
    heads = Heads([4], cond_dim=3, width=4, cmap_dim=8, time_conditioned=True)
    maps, cond = [torch.randn(2, 4, 2, 2)], torch.randn(2, 3)
    assert not torch.allclose(heads(maps, cond, torch.tensor([10, 10])), heads(maps, cond, torch.tensor([900, 900])))
    emb = timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert emb.shape == (2, 8) and torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_heads_are_spectrally_normalised():
    heads = Heads([4], cond_dim=3, width=4, cmap_dim=4)
    for _ in range(30):  # power iterations converge during forward passes in training mode
        heads([torch.randn(2, 4, 3, 3)], torch.randn(2, 3))
    weight = heads.heads[0].body[0].weight  # the normalised weight a forward uses
    assert float(torch.linalg.matrix_norm(weight.detach().flatten(1), ord=2)) == pytest.approx(1.0, abs=0.05)


def test_cond_pooled_prefers_sdxl_pooled_embedding():
    states = torch.arange(12.0).view(1, 3, 4)
    assert torch.equal(Cond(encoder_hidden_states=states).pooled(), states.mean(dim=1))
    pooled = torch.ones(1, 7)
    sdxl = Cond(encoder_hidden_states=states, added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.zeros(1, 6)})
    assert torch.equal(sdxl.pooled(), pooled)


# -------------------------------------------------------------------------------------------- backbones
def test_effnet_lite1_taps_are_frozen_and_pass_gradients_to_the_image():
    net = EffNetLite1(64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    maps = net.train()(images * 2 - 1)  # train() is refused: BatchNorm keeps its statistics
    assert [m.shape[1:] for m in maps] == [(24, 16, 16), (40, 8, 8), (112, 4, 4), (320, 2, 2)]
    assert net.channels == [24, 40, 112, 320] and net.name == "effnet-lite1"
    sum(m.mean() for m in maps).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_the_judge_cannot_be_a_discriminator_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="judge"):
        build_backbone("effnet-lite0")
    with pytest.raises(ConfigError, match="effnet-lite1"):
        build_backbone("resnet50")


def test_dinov2_patch_tokens_become_maps():
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                                     patch_size=14, image_size=56))
    net = Dinov2("local-test", layers=(0, 2), resolution=56, model=model)
    maps = net(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert [m.shape for m in maps] == [(2, 16, 4, 4)] * 2 and net.name == "dinov2:local-test"


# ------------------------------------------------------------------------------------------- DiffAugment
def test_augmentations_are_differentiable_seeded_and_shape_preserving():
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    out = diff_augment(x, ["color", "translation", "cutout"], torch.Generator().manual_seed(0))
    again = diff_augment(x, ["color", "translation", "cutout"], torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out, again) and not torch.allclose(out, x)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(diff_augment(x, []), x)


def test_cutout_zeroes_a_quarter_and_translation_moves_content():
    x = torch.ones(3, 1, 8, 8)
    assert (cutout(x, torch.Generator().manual_seed(1)) == 0).float().mean(dim=(1, 2, 3)).tolist() == [0.25] * 3
    shifted = translation(x, torch.Generator().manual_seed(1))
    assert (shifted < 0.5).any()  # zero padding entered from some side
    mean_before = torch.rand(2, 3, 4, 4)
    assert color(mean_before, torch.Generator().manual_seed(0)).shape == mean_before.shape
