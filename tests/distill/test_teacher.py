"""distill.teacher: one interface over the tiny SD / SDXL / UNet2D pipelines, checked against diffusers."""

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from distill.errors import ConfigError, DataError, ModelError
from distill.guidance import cfg
from distill.teacher import Cond, Teacher

PROMPTS = ["a smiling face", "red heart"]


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    return Teacher.from_pretrained(tiny_sd_path)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_path):
    return Teacher.from_pretrained(tiny_sdxl_path)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class CallCounter:
    """Wraps a callable and records the batch size of each call."""

    def __init__(self, fn):
        self.fn, self.batches = fn, []

    def __call__(self, *args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        self.batches.append(len(first) if isinstance(first, (list, torch.Tensor)) else None)
        return self.fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize(
    "fixture, cls, kind, shape",
    [
        ("tiny_sd_path", "StableDiffusionPipeline", "sd", (4, 8, 8)),
        ("tiny_sd_v_path", "StableDiffusionPipeline", "sd", (4, 8, 8)),
        ("tiny_sd_bert_path", "StableDiffusionPipeline", "sd", (4, 8, 8)),
        ("tiny_sdxl_path", "StableDiffusionXLPipeline", "sdxl", (4, 8, 8)),
        ("tiny_unet2d_path", "DDPMPipeline", "unet2d", (3, 8, 8)),
        ("tiny_unet2d_class_path", "DDPMPipeline", "unet2d", (3, 8, 8)),
    ],
)
def test_tiny_pipelines_load_both_ways(request, fixture, cls, kind, shape):
    path = request.getfixturevalue(fixture)
    assert type(DiffusionPipeline.from_pretrained(path)).__name__ == cls
    teacher = Teacher.from_pretrained(path)
    assert (teacher.kind, teacher.latent_shape(), teacher.num_train_timesteps) == (kind, shape, 1000)
    assert teacher.prediction_type == ("v_prediction" if fixture == "tiny_sd_v_path" else "epsilon")
    assert teacher.schedule.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(teacher.schedule.alphas_cumprod, teacher.scheduler.alphas_cumprod)
    assert (teacher.vae is None) == (kind == "unet2d")
    assert not any(p.requires_grad for p in teacher.parameters())


def test_latent_shape_at_other_resolutions(sd):
    assert sd.vae_scale_factor == 2 and sd.latent_shape(32) == (4, 16, 16) and sd.latent_shape((16, 24)) == (4, 8, 12)
    with pytest.raises(ConfigError, match="not a multiple"):
        sd.latent_shape(17)


# ----------------------------------------------------------------------------------------- conditioning
def test_sd_encode_prompt_shapes_and_pipeline_values(sd):
    cond = sd.encode_prompt(PROMPTS)
    assert cond.encoder_hidden_states.shape == (2, 77, 32) and len(cond) == 2
    assert cond.added_cond_kwargs is None and cond.class_labels is None
    reference, _ = sd.pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    torch.testing.assert_close(cond.encoder_hidden_states, reference)


def test_bert_text_encoder(tiny_sd_bert_path):
    teacher = Teacher.from_pretrained(tiny_sd_bert_path)
    assert type(teacher.text_encoder).__name__ == "BertModel"
    cond = teacher.encode_prompt(PROMPTS)
    assert cond.encoder_hidden_states.shape == (2, 77, 32)
    out = teacher.guided(_randn(2, 4, 8, 8), torch.tensor([10, 900]), cond, 3.0)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_sdxl_cond_has_pooled_embeds_and_time_ids(sdxl):
    cond = sdxl.encode_prompt(PROMPTS)
    assert cond.encoder_hidden_states.shape == (2, 77, 64)
    assert cond.added_cond_kwargs["text_embeds"].shape == (2, 32)
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    at_32 = sdxl.encode_prompt(PROMPTS, resolution=32)
    assert at_32.added_cond_kwargs["time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
def test_uncond_is_computed_once_and_cached(request, fixture, monkeypatch):
    teacher = Teacher.from_pretrained(request.getfixturevalue(fixture))
    counter = CallCounter(teacher.pipe.encode_prompt)
    monkeypatch.setattr(teacher.pipe, "encode_prompt", counter)
    first, second = teacher.uncond(2), teacher.uncond(3)
    assert len(counter.batches) == 1 and len(first) == 2 and len(second) == 3
    torch.testing.assert_close(second.encoder_hidden_states[:2], first.encoder_hidden_states)
    if teacher.kind == "sd":  # the empty prompt, encoded
        torch.testing.assert_close(first.encoder_hidden_states[:1], teacher.encode_prompt([""]).encoder_hidden_states)
    else:  # SDXL base zeroes the empty prompt (force_zeros_for_empty_prompt)
        assert not first.encoder_hidden_states.any() and not first.added_cond_kwargs["text_embeds"].any()


def test_cond_batch_methods():
    cond = Cond(
        encoder_hidden_states=torch.arange(2.0).reshape(2, 1, 1),
        added_cond_kwargs={"text_embeds": torch.arange(2.0).reshape(2, 1), "time_ids": torch.ones(2, 6)},
    )
    both = cond.cat(cond)
    assert len(both) == 4 and both.added_cond_kwargs["text_embeds"].flatten().tolist() == [0, 1, 0, 1]
    assert cond.repeat(2).encoder_hidden_states.flatten().tolist() == [0, 0, 1, 1]
    assert cond.select(1).encoder_hidden_states.flatten().tolist() == [1]
    assert len(cond.select(torch.tensor([True, False]))) == 1
    half = cond.to("cpu", torch.float16)
    assert half.encoder_hidden_states.dtype == half.added_cond_kwargs["time_ids"].dtype == torch.float16
    labels = Cond(class_labels=torch.tensor([3])).to(dtype=torch.float16)
    assert labels.class_labels.dtype == torch.long
    empty = Cond(batch_size=2)
    assert len(empty.cat(empty)) == 4 and len(empty.repeat(3)) == 6 and len(empty.select(slice(0, 1))) == 1
    with pytest.raises(ValueError):
        cond.cat(Cond(encoder_hidden_states=torch.zeros(1, 1, 1)))


# ------------------------------------------------------------------------------------------ equivalence
def _manual_ddim(teacher, cond, latents, w, steps=3):
    scheduler = DDIMScheduler.from_config(teacher.scheduler.config, clip_sample=False)
    scheduler.set_timesteps(steps)
    z = latents.clone()
    for t in scheduler.timesteps:
        out = teacher.guided(z, t.expand(len(z)), cond, w)
        z = scheduler.step(out, t, z).prev_sample
    return z


@pytest.mark.parametrize(
    "fixture, w, resolution",
    [("tiny_sd_path", 5.0, None), ("tiny_sd_path", 1.0, None), ("tiny_sd_v_path", 4.0, None),
     ("tiny_sdxl_path", 5.0, None), ("tiny_sdxl_path", 3.0, 32)],
)
@torch.no_grad()
def test_manual_ddim_with_guided_equals_pipeline(request, fixture, w, resolution):
    teacher = Teacher.from_pretrained(request.getfixturevalue(fixture))
    pipe = teacher.pipe
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    latents = _randn(2, *teacher.latent_shape(resolution))
    size = teacher.resolution(resolution)
    reference = pipe(
        PROMPTS, num_inference_steps=3, guidance_scale=w, output_type="latent", latents=latents.clone(),
        height=size[0], width=size[1],
    ).images
    ours = _manual_ddim(teacher, teacher.encode_prompt(PROMPTS, resolution=resolution), latents, w)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert (ours - latents).abs().max() > 0.1  # the loop moved the latents


# -------------------------------------------------------------------------------------------- guidance
@torch.no_grad()
def test_guided_scale_one_is_one_conditional_forward(sd, monkeypatch):
    z, t, cond = _randn(2, 4, 8, 8), torch.tensor([100, 700]), sd.encode_prompt(PROMPTS)
    expected = sd(z, t, cond)
    counter = CallCounter(sd.unet.forward)
    monkeypatch.setattr(sd.unet, "forward", counter)
    torch.testing.assert_close(sd.guided(z, t, cond, 1.0), expected)
    torch.testing.assert_close(sd.guided(z, t, cond, torch.ones(2)), expected)
    assert counter.batches == [2, 2]


@torch.no_grad()
def test_guided_batches_both_passes_in_one_forward(sdxl, monkeypatch):
    z, t, cond = _randn(2, 4, 8, 8), torch.tensor([100, 700]), sdxl.encode_prompt(PROMPTS)
    negative = sdxl.uncond(2)
    separate = cfg(sdxl(z, t, cond), sdxl(z, t, negative), 6.0)
    counter = CallCounter(sdxl.unet.forward)
    monkeypatch.setattr(sdxl.unet, "forward", counter)
    torch.testing.assert_close(sdxl.guided(z, t, cond, 6.0), separate, rtol=1e-5, atol=1e-5)
    assert counter.batches == [4]


@torch.no_grad()
def test_guided_per_sample_scale(sd):
    z, t, cond = _randn(3, 4, 8, 8), torch.tensor([50, 500, 950]), sd.encode_prompt(PROMPTS + ["star"])
    w = torch.tensor([1.0, 2.5, 7.0])
    out = sd.guided(z, t, cond, w)
    for i in range(3):
        c, u = sd(z[i : i + 1], t[i : i + 1], cond.select(i)), sd(z[i : i + 1], t[i : i + 1], sd.uncond(1))
        torch.testing.assert_close(out[i : i + 1], u + w[i] * (c - u), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sd_v_path"])
def test_denoise_is_consistent_with_add_noise(request, fixture):
    teacher = Teacher.from_pretrained(request.getfixturevalue(fixture))
    x0, eps, t = _randn(2, 4, 8, 8), _randn(2, 4, 8, 8, seed=1), torch.tensor([30, 800])
    z_t = teacher.add_noise(x0, eps, t)
    torch.testing.assert_close(z_t, teacher.scheduler.add_noise(x0, eps, t))
    x0_hat, eps_hat = teacher.denoise(z_t, t, teacher.encode_prompt(PROMPTS))
    torch.testing.assert_close(teacher.add_noise(x0_hat, eps_hat, t), z_t, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------- VAE
@torch.no_grad()
def test_encode_decode_apply_scaling_factor(sd):
    images = _randn(2, 3, 16, 16).clamp(-1, 1)
    scale = sd.vae.config.scaling_factor
    latents = sd.encode_images(images)
    torch.testing.assert_close(latents, sd.vae.encode(images).latent_dist.mean * scale)
    assert latents.shape == (2, *sd.latent_shape())
    torch.testing.assert_close(sd.decode_latents(latents), sd.vae.decode(latents / scale).sample)
    sampled = sd.encode_images(images, generator=torch.Generator().manual_seed(0))
    again = sd.encode_images(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, again) and not torch.allclose(sampled, latents)


@torch.no_grad()
def test_encode_decode_apply_shift_factor(tiny_sd_path):
    teacher = Teacher.from_pretrained(tiny_sd_path)
    images = _randn(2, 3, 16, 16).clamp(-1, 1)
    plain = teacher.encode_images(images)
    teacher.vae.register_to_config(shift_factor=0.25)  # as SD3 / FLUX VAEs have
    scale = teacher.vae.config.scaling_factor
    shifted = teacher.encode_images(images)
    torch.testing.assert_close(shifted, (plain / scale - 0.25) * scale)
    torch.testing.assert_close(teacher.decode_latents(shifted), teacher.vae.decode(plain / scale).sample)


# ---------------------------------------------------------------------------------------------- UNet2D
@torch.no_grad()
def test_unconditional_unet2d(tiny_unet2d_path):
    teacher = Teacher.from_pretrained(tiny_unet2d_path)
    images = _randn(2, 3, 8, 8)
    assert torch.equal(teacher.encode_images(images), images) and torch.equal(teacher.decode_latents(images), images)
    cond = teacher.encode_prompt(["anything", "else"])
    assert len(cond) == 2 and len(teacher.uncond(4)) == 4 and not teacher.is_conditional
    t = torch.tensor([10, 600])
    expected = teacher.unet(images, t).sample
    torch.testing.assert_close(teacher(images, t, cond), expected)
    torch.testing.assert_close(teacher.guided(images, t, cond, 3.0), expected)


@torch.no_grad()
def test_class_conditional_unet2d(tiny_unet2d_class_path):
    teacher = Teacher.from_pretrained(tiny_unet2d_class_path)
    cond = teacher.encode_prompt(["1", "3"])
    assert cond.class_labels.tolist() == [1, 3]
    z, t = _randn(2, 3, 8, 8), torch.tensor([10, 600])
    torch.testing.assert_close(teacher(z, t, cond), teacher.unet(z, t, class_labels=torch.tensor([1, 3])).sample)
    teacher.guided(z, t, cond, 1.0)  # no null class needed without guidance
    with pytest.raises(ModelError, match=f"{tiny_unet2d_class_path}.*no null class.*null_class"):
        teacher.guided(z, t, cond, 2.0)
    with pytest.raises(DataError, match=r"class indices.*\[0, 5\)"):
        teacher.encode_prompt(["cat"])
    with pytest.raises(DataError, match="outside"):
        teacher.encode_prompt(["7"])
    guided = Teacher.from_pretrained(tiny_unet2d_class_path, null_class=4)
    c, u = guided(z, t, cond), guided(z, t, Cond(class_labels=torch.tensor([4, 4])))
    torch.testing.assert_close(guided.guided(z, t, cond, 2.0), u + 2.0 * (c - u), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors
def test_missing_local_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelError, match=f"{missing} does not exist"):
        Teacher.from_pretrained(missing)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelError, match=f"{tmp_path} is not a diffusers pipeline folder.*model_index.json"):
        Teacher.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["corrupt_unet", "missing_unet", "corrupt_text_encoder", "bad_index"])
def test_damaged_pipeline_names_the_path(tmp_path, tiny_sd_path, damage):
    folder = shutil.copytree(tiny_sd_path, tmp_path / "pipe")
    unet, text = folder / "unet" / "diffusion_pytorch_model.safetensors", folder / "text_encoder" / "model.safetensors"
    if damage == "corrupt_unet":
        unet.write_bytes(b"not a safetensors file")
    elif damage == "missing_unet":
        unet.unlink()
    elif damage == "corrupt_text_encoder":
        text.write_bytes(b"not a safetensors file")
    else:
        (folder / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match=str(folder)):
        Teacher.from_pretrained(folder)


def test_unsupported_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionUpscalePipeline"}))
    with pytest.raises(ModelError) as err:
        Teacher.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "StableDiffusionUpscalePipeline" in message
    assert "StableDiffusionPipeline" in message and "StableDiffusionXLPipeline" in message and "DDPMPipeline" in message


def test_unsupported_pipeline_object():
    from diffusers import DiffusionPipeline as Base

    with pytest.raises(ModelError, match="DiffusionPipeline, which distill cannot use"):
        Teacher(Base())


def test_hub_id_offline():
    with pytest.raises(ModelError, match="'nobody/no-such-model' is neither a local folder nor in the local cache, "
                                         r"and the Hugging Face Hub cannot be reached \(HF_HUB_OFFLINE is set"):
        Teacher.from_pretrained("nobody/no-such-model")


# ------------------------------------------------------------------------------------- family adaptors
@pytest.mark.parametrize("fixture, family", [("tiny_sd_path", "StableDiffusion"), ("tiny_sdxl_path", "StableDiffusionXL"),
                                             ("tiny_unet2d_path", "PixelUNet")])
def test_the_family_adaptor_is_chosen_by_pipeline_class(request, fixture, family):
    teacher = Teacher.from_pretrained(request.getfixturevalue(fixture))
    assert type(teacher.family).__name__ == family and teacher.network is teacher.pipe.unet


@torch.no_grad()
def test_forward_through_another_network_is_that_network(sd):
    import copy

    other = copy.deepcopy(sd.unet)
    with torch.no_grad():
        other.conv_out.bias += 0.5
    z, t, cond = _randn(2, 4, 8, 8), torch.tensor([100, 700]), sd.encode_prompt(PROMPTS)
    torch.testing.assert_close(sd(z, t, cond, network=other), sd(z, t, cond) + 0.5)
    guided = sd.guided(z, t, cond, 3.0, network=other)
    torch.testing.assert_close(guided, sd.guided(z, t, cond, 3.0) + 0.5, rtol=1e-5, atol=1e-5)


def test_features_are_the_named_blocks_outputs_with_gradient_to_the_input(sd):
    z = _randn(2, 4, 8, 8).requires_grad_(True)
    feats = sd.features(z, torch.tensor([10, 900]), sd.encode_prompt(PROMPTS), ["down_blocks.0", "mid_block"])
    channels = sd.unet.config.block_out_channels
    assert [f.shape[:2] for f in feats] == [(2, channels[0]), (2, channels[-1])]
    sum(f.square().mean() for f in feats).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in sd.unet.parameters())  # frozen
    assert not sd.unet._forward_hooks and not sd.unet.mid_block._forward_hooks  # hooks removed
    with pytest.raises(ConfigError, match="no block 'down_blocks.9'"):
        sd.features(z, torch.tensor([10, 900]), sd.encode_prompt(PROMPTS), ["down_blocks.9"])
