"""Train the embedded flow-matching teacher: a miniature Stable Diffusion 3 on emoji.

    distill train teacher_sd3/emoji_sd3

0. The VAE is the emoji teacher's (its latents are already centred and unit-scaled); SD3's pipeline adds the VAE's
   `shift_factor` unconditionally, so the copy's config says 0.
1. Text: two small CLIP text encoders (the pipeline's `CLIPTextModelWithProjection`) learn MiniLM's meaning. They
   read MiniLM's own WordPiece tokens (its vocabulary cut to the pieces the captions use, plus single characters),
   so token i is the same piece for both, and are trained so that a linear read-out of their penultimate token
   states (what SD3 conditions on) gives MiniLM's token states, and one of their pooled projections gives MiniLM's
   sentence embedding. The read-outs are thrown away.
2. Transformer: an `SD3Transformer2DModel` on the cached latents, rectified flow (Esser et al. 2024,
   arXiv:2403.03206): z_t = (1 - sigma) x0 + sigma eps, the network predicts u = eps - x0, sigma drawn logit-normal
   and shifted as the scheduler shifts; caption dropout for classifier-free guidance; an EMA of the weights ships.
   Its conditioning is cached through the pipeline's own `encode_prompt`, so training sees what sampling sees.
3. Assemble: a `StableDiffusion3Pipeline` with the stock `FlowMatchEulerDiscreteScheduler` and no T5 (as the
   pipeline allows; load it with `text_encoder_3=None, tokenizer_3=None`).

Without T5 the pipeline still appends `max_sequence_length` zero tokens (256 unless told) to the 16 CLIP tokens, and
the transformer attends over all of them; a count it was not trained with changes its attention. It is trained with
as many zero tokens as CLIP tokens (`text.max_length`), 6x cheaper than 256, so it is sampled with
`max_sequence_length=16` (distill's SD3 adaptor passes the CLIP length for a pipeline without T5).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

from distill import engine
from distill.config import DataConfig, TrainConfig
from distill.method import Method
from distill.text import load_minilm
from recipes.teacher import encode_moments, fit_and_ship_ema, load_images, save_sample_grid


@dataclass
class TextConfig:
    hidden_size: int = 64  # per encoder; SD3 concatenates the two encoders' states (joint dim 2 x 64)
    num_layers: int = 3  # SD3 reads the penultimate layer's states
    num_heads: int = 4
    projection_dim: int = 64  # pooled projection per encoder (SD3 concatenates them)
    max_length: int = 16  # MiniLM tokens per caption with [CLS]/[SEP]: 98% of the emoji captions fit
    max_train_steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 1.0e-3
    pooled_weight: float = 1.0  # weight of the sentence-embedding term beside the token-state term


@dataclass
class TransformerConfig:
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32  # width 4 x 32 = 128
    patch_size: int = 1  # 8x8 latents -> 64 image tokens
    qk_norm: str | None = "rms_norm"  # as SD3.5: keeps attention logits tame at a high learning rate
    shift: float = 1.0  # the scheduler's sigma shift; SD3's 3.0 is for 1024 px, these latents are 8x8
    logit_mean: float = 0.0  # sigma ~ shift(sigmoid(N(mean, std))), SD3's logit-normal sampling
    logit_std: float = 1.0
    caption_dropout: float = 0.1  # share of empty captions, so CFG works at sampling time
    ema_decay: float = 0.999
    warmup_steps: int = 200
    weight_decay: float = 0.01


@dataclass
class Sd3TeacherConfig(TrainConfig):
    vae_from: str = "checkpoints/emoji-sd"  # the pipeline folder whose VAE is reused
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    sample_prompts: list[str] = field(default_factory=lambda: ["grinning face", "dog face", "banana", "flag: France"])
    guidance_scale: float = 3.0  # for the sample grid
    sample_steps: int = 28  # Euler steps of the sample grid (SD3's default)
    num_threads: int | None = None  # torch CPU threads; null leaves torch's default


CONFIG = Sd3TeacherConfig  # `distill train` loads this recipe's YAML into it


# ---------------------------------------------------------------- stage 0: VAE and tokenizer
def load_vae(source: str) -> AutoencoderKL:
    vae = AutoencoderKL.from_pretrained(Path(source) / "vae").eval()
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline adds it; these latents are centred already
    return vae


def cut_tokenizer(captions: list[str], folder: Path, max_length: int):
    """MiniLM's BertTokenizer with only the pieces `captions` use, plus single ASCII characters (so any word still
    tokenizes); greedy longest-match WordPiece then splits every caption exactly as MiniLM does. [SEP] is the
    CLIP encoders' end-of-text token (their pooled output is read there)."""
    from transformers import BertTokenizer

    full, _ = load_minilm(max_length)
    used = {piece for caption in captions for piece in full.tokenize(caption)}
    chars = [t for t in full.vocab if t.isascii() and (len(t) == 1 or (t.startswith("##") and len(t) == 3))]
    words = ["[PAD]", "[UNK]", "[MASK]", "[CLS]", "[SEP]"] + sorted(used | set(chars))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(words)) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, model_max_length=max_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


# ---------------------------------------------------------------- stage 1: text encoders
def build_text_encoder(cfg: TextConfig, tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_length,
        projection_dim=cfg.projection_dim, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config)


def minilm_targets(captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM's token states [N, L, 384] (no mask, as the emoji SD pipeline feeds them) and its sentence embedding
    [N, 384] (mean over real tokens, L2-normalised, as sentence-transformers gives it)."""
    tokenizer, model = load_minilm(max_length)
    states, pooled = [], []
    with torch.no_grad():
        for i in range(0, len(captions), 256):
            batch = tokenizer(captions[i:i + 256], padding="max_length", max_length=max_length, truncation=True,
                              return_tensors="pt")
            states.append(model(batch.input_ids)[0])
            masked = model(**batch)[0] * batch.attention_mask[..., None]
            pooled.append(F.normalize(masked.sum(1) / batch.attention_mask.sum(1, keepdim=True), dim=-1))
    return torch.cat(states), torch.cat(pooled)


def text_loss(encoder, readout, ids, states, pooled, pooled_weight):
    """||W h_{L-1}(ids) - s_MiniLM||^2 averaged over tokens + w ||V e_pooled(ids) - p_MiniLM||^2, per sample [B]."""
    out = encoder(ids, output_hidden_states=True)
    tokens = readout["tokens"](out.hidden_states[-2])
    sentence = readout["pooled"](out.text_embeds)
    return (tokens - states).square().mean(dim=(1, 2)) + pooled_weight * (sentence - pooled).square().mean(dim=1)


class TextStage(Method):
    """Stage 1: both CLIP encoders regress MiniLM through linear read-outs."""

    name = "text"

    def __init__(self, cfg: Sd3TeacherConfig, tokenizer, ids, states, pooled, device):
        super().__init__()
        self.cfg, self.ids, self.states, self.pooled = cfg.text, ids, states, pooled
        for i in (1, 2):
            self.modules[f"encoder_{i}"] = build_text_encoder(cfg.text, tokenizer, cfg.seed + 10 + i).to(device)
            self.modules[f"readout_{i}"] = torch.nn.ModuleDict({
                "tokens": torch.nn.Linear(cfg.text.hidden_size, states.shape[-1]),
                "pooled": torch.nn.Linear(cfg.text.projection_dim, pooled.shape[-1])}).to(device)
        params = [p for name in self.modules for p in self.modules[name].parameters()]
        self.optimizers["text"] = torch.optim.AdamW(params, lr=cfg.text.learning_rate, weight_decay=0.0)

    def batch(self, generator):
        idx = torch.randint(len(self.ids), (self.cfg.batch_size,), generator=generator)
        return self.ids[idx], self.states[idx], self.pooled[idx]

    def step(self, batch, iteration, generator):
        device = next(self.encoder_1.parameters()).device
        ids, states, pooled = (v.to(device) for v in batch)
        losses = {f"loss_{i}": text_loss(self.modules[f"encoder_{i}"], self.modules[f"readout_{i}"], ids, states,
                                         pooled, self.cfg.pooled_weight).mean() for i in (1, 2)}
        return losses

    def loop(self, teacher_cfg: Sd3TeacherConfig) -> engine.Loop:
        return engine.Loop.from_config(teacher_cfg, max_steps=self.cfg.max_train_steps, max_minutes=None,
                                       batch_size=self.cfg.batch_size, lr_schedule="cosine", lr_warmup_steps=100,
                                       lr_floor=0.05)


def train_text(cfg: Sd3TeacherConfig, tokenizer, captions: list[str], run: engine.Run) -> list:
    final = run.dir / "text" / "final"
    if (final / "encoder_2" / "config.json").is_file():
        print(f"text stage already finished: {final}")
        from transformers import CLIPTextModelWithProjection

        return [CLIPTextModelWithProjection.from_pretrained(final / f"encoder_{i}").eval() for i in (1, 2)]
    ids = tokenizer(captions, padding="max_length", max_length=cfg.text.max_length, truncation=True,
                    return_tensors="pt").input_ids
    stage = TextStage(cfg, tokenizer, ids, *minilm_targets(captions, cfg.text.max_length), run.device)
    engine.fit(run, stage, stage.loop(cfg), stage="text")
    encoders = [stage.unwrapped(f"encoder_{i}").eval() for i in (1, 2)]
    if run.is_main:
        for i, encoder in enumerate(encoders, 1):
            encoder.save_pretrained(final / f"encoder_{i}")
    return encoders


# ---------------------------------------------------------------- stage 2: transformer
def build_transformer(cfg: TransformerConfig, text: TextConfig, latent_side: int) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=latent_side, patch_size=cfg.patch_size, in_channels=4, out_channels=4, num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=2 * text.hidden_size, caption_projection_dim=cfg.num_attention_heads * cfg.attention_head_dim,
        pooled_projection_dim=2 * text.projection_dim, pos_embed_max_size=latent_side // cfg.patch_size,
        qk_norm=cfg.qk_norm,
    )


def flow_matching_loss(transformer, z0, text, pooled, sigma, eps):
    """Rectified flow (Esser et al. 2024, Eq. 2 with the velocity target): z_t = (1 - sigma) x0 + sigma eps,
    ||u_theta(z_t, 1000 sigma) - (eps - x0)||^2 per sample [B]. z0, eps [B, C, H, W]; sigma [B]."""
    s = sigma[:, None, None, None]
    z_t = (1 - s) * z0 + s * eps
    u = transformer(hidden_states=z_t, timestep=sigma * 1000, encoder_hidden_states=text, pooled_projections=pooled,
                    return_dict=False)[0]
    return (u.float() - (eps - z0).float()).square().mean(dim=(1, 2, 3))


class TransformerStage(Method):
    """Stage 2: the SD3 transformer on cached latents and cached pipeline conditioning; EMA ships."""

    name = "transformer"

    def __init__(self, cfg: Sd3TeacherConfig, moments, cond, empty, device):
        super().__init__()
        self.cfg, self.moments, self.cond, self.empty = cfg, moments, cond, empty
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.transformer.shift)
        torch.manual_seed(cfg.seed + 1)
        net = build_transformer(cfg.transformer, cfg.text, moments.shape[-1]).to(device)
        self.modules["transformer"] = net
        self.modules["ema"] = EMAModel(net.parameters(), decay=cfg.transformer.ema_decay, use_ema_warmup=True,
                                       power=2 / 3)
        self.optimizers["transformer"] = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate,
                                                           weight_decay=cfg.transformer.weight_decay)

    def batch(self, generator):
        t = self.cfg.transformer
        # 1. latents z0 ~ q(z | x) from the cached moments
        idx = torch.randint(len(self.moments), (self.cfg.train_batch_size,), generator=generator)
        mean, std = self.moments[idx].chunk(2, dim=1)
        z0 = mean + std * torch.randn(mean.shape, generator=generator)
        # 2. caption dropout: some samples see the empty prompt's conditioning
        drop = torch.rand(len(idx), generator=generator) < t.caption_dropout
        text = torch.where(drop[:, None, None], self.empty[0], self.cond[0][idx])
        pooled = torch.where(drop[:, None], self.empty[1], self.cond[1][idx])
        # 3. sigma: logit-normal, then the scheduler's shift
        u = torch.sigmoid(t.logit_mean + t.logit_std * torch.randn(len(idx), generator=generator))
        sigma = t.shift * u / (1 + (t.shift - 1) * u)
        return z0, text, pooled, sigma, torch.randn(z0.shape, generator=generator)

    def step(self, batch, iteration, generator):
        device = next(self.transformer.parameters()).device
        # 4. the flow-matching loss per sample, averaged over the batch
        return {"loss": flow_matching_loss(self.transformer, *(v.to(device) for v in batch)).mean()}

    def after_step(self, iteration, stepped):
        self.ema.step(self.transformer.parameters())

    def loop(self) -> engine.Loop:
        return engine.Loop.from_config(self.cfg, lr_schedule="cosine", lr_warmup_steps=self.cfg.transformer.warmup_steps,
                                       max_grad_norm=1.0)


def train_transformer(cfg, moments, cond, empty, run: engine.Run) -> SD3Transformer2DModel:
    return fit_and_ship_ema(run, TransformerStage(cfg, moments, cond, empty, run.device), "transformer")


# ---------------------------------------------------------------- assemble + main
def build_pipeline(cfg: Sd3TeacherConfig, vae, encoders, tokenizer, transformer) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.transformer.shift), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


@torch.no_grad()
def encode_conditioning(pipe, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence [N, 2 x max_length, D], pooled [N, D_p]) exactly as the pipeline conditions its transformer when
    called with max_sequence_length=max_length (the zero T5 block as long as the CLIP one)."""
    seq, pooled = [], []
    for i in range(0, len(captions), 256):
        embeds, _, pool, _ = pipe.encode_prompt(captions[i:i + 256], None, None, device="cpu",
                                                do_classifier_free_guidance=False, max_sequence_length=max_length)
        seq.append(embeds)
        pooled.append(pool)
    return torch.cat(seq), torch.cat(pooled)


def main(cfg: Sd3TeacherConfig) -> Path:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    with engine.start_run(cfg) as run:
        return _train(cfg, run)


def _train(cfg: Sd3TeacherConfig, run) -> Path:
    images, captions = load_images(cfg.data)
    report = {"images": len(images), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    vae = load_vae(cfg.vae_from)
    tokenizer = cut_tokenizer(captions + [""], run.dir / "tokenizer", cfg.text.max_length)
    encoders = train_text(cfg, tokenizer, captions, run)
    side = images.shape[-1] // 2 ** (len(vae.config.block_out_channels) - 1)
    pipe = build_pipeline(cfg, vae, encoders, tokenizer, build_transformer(cfg.transformer, cfg.text, side))
    n = cfg.text.max_length
    cond, empty = encode_conditioning(pipe, captions, n), encode_conditioning(pipe, [""], n)
    transformer = train_transformer(cfg, encode_moments(vae, images), cond, empty, run)
    if run.is_main:
        pipe = build_pipeline(cfg, vae, encoders, tokenizer, transformer)
        assemble(pipe, cfg)
        save_sample_grid(pipe, cfg, run.dir / "samples.png", max_sequence_length=cfg.text.max_length)
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        (run.dir / "report.json").write_text(json.dumps(report, indent=2))
        print(f"teacher written to {cfg.teacher}")
    return run.dir


def assemble(pipe, cfg: Sd3TeacherConfig) -> None:
    """save_pretrained, with the VAE's weights file copied byte for byte from `vae_from` (git stores it once) and the
    transformer's weights stored in float16 (half the bytes in git history; a plain `from_pretrained` loads them as
    float32). The pipeline in memory is rounded the same way, so what is sampled and measured next is what ships."""
    out = Path(cfg.teacher)
    pipe.save_pretrained(out, safe_serialization=True)
    weights = "diffusion_pytorch_model.safetensors"
    shutil.copyfile(Path(cfg.vae_from) / "vae" / weights, out / "vae" / weights)
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in pipe.transformer.state_dict().items()}
    save_file(half, out / "transformer" / weights, metadata={"format": "pt"})
    pipe.transformer.load_state_dict({k: v.float() for k, v in half.items()})


if __name__ == "__main__":
    import sys

    from distill.config import load_config

    main(load_config(sys.argv[1], Sd3TeacherConfig, sys.argv[2:]))
