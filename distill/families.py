"""Teacher families: one small adaptor per kind of diffusers pipeline (k-diffusion's `external.py` idea).

An adaptor knows, for its pipelines only, how prompts become a `Cond`, what the unconditional Cond is, and how
its denoising network is called. Everything else (schedule, guidance, solvers, students, samplers) sees the
adaptor's uniform `forward(network, z_t, t_model, cond, timestep_cond)` and a `distill.schedule` object.
The network is passed in, so a student (a trained copy, or the same network with LoRA adapters) is called
exactly as its teacher is.

Adding a family is one subclass here registered in `FAMILIES`, plus its schedule in `distill.schedule`; no other
module branches on the family. The flow-matching transformers (SD3, FLUX) are two such subclasses: what differs
(the transformer's call, FLUX's 2x2-packed latents and guidance input, where a block's image tokens are) stays here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.cond import Cond
from distill.errors import DataError, ModelError


class Family:
    """Base adaptor: a pipeline whose denoiser is `pipe.unet` and which is text-conditioned."""

    name = ""
    pipelines: tuple[str, ...] = ()  # diffusers pipeline class names this adaptor serves (and their subclasses)
    network_attr = "unet"
    default_feature_blocks: tuple[str, ...] = ()  # blocks a discriminator reads by default (`Teacher.features`)
    latent_multiple = 1  # the latent side must be a multiple of this (a transformer's patch, FLUX's packing)
    embeds_guidance = False  # True: guidance is a network input (guidance-distilled FLUX), not two passes (CFG)

    def __init__(self, pipe, source: str, null_class: int | None = None):
        self.pipe, self.source, self.null_class = pipe, source, null_class

    @property
    def network(self) -> torch.nn.Module:
        return getattr(self.pipe, self.network_attr)

    @property
    def is_conditional(self) -> bool:
        return True

    @property
    def sample_size(self):
        """The network's native latent side (int or (H, W))."""
        return self.network.config.sample_size

    @property
    def latent_channels(self) -> int:
        return self.network.config.in_channels

    def schedule_kwargs(self) -> dict:
        """What `distill.schedule.schedule_for` needs to know of this pipeline besides its scheduler."""
        return {}

    def call_kwargs(self) -> dict:
        """Arguments a plain `pipe(...)` call needs to condition as `encode` does (none for most pipelines)."""
        return {}

    def feature_map(self, output, z_t: Tensor) -> Tensor:
        """A block's output as a feature map [B, C, H_i, W_i] (a UNet block's hidden states, first of a tuple)."""
        return output[0] if isinstance(output, tuple) else output

    def encode(self, prompts: list[str], size: tuple[int, int], device, dtype) -> Cond:
        raise NotImplementedError

    def negative(self, device, dtype) -> Cond:
        """The unconditional Cond, one row (the empty prompt or the null class)."""
        raise NotImplementedError

    def pair(self, negative: Cond, cond: Cond) -> Cond:
        """The negative Cond matched to a conditional one before the two are batched (default: as it is)."""
        return negative

    def forward(self, network, z_t: Tensor, t: Tensor, cond: Cond, timestep_cond: Tensor | None = None) -> Tensor:
        return network(
            z_t, t, encoder_hidden_states=cond.encoder_hidden_states, timestep_cond=timestep_cond,
            added_cond_kwargs=cond.added_cond_kwargs, class_labels=cond.class_labels, return_dict=False,
        )[0]


class StableDiffusion(Family):
    """SD 1.x / 2.x and fine-tunes (CLIP or BERT text encoder): text embeddings [B, L, D]."""

    name = "sd"
    pipelines = ("StableDiffusionPipeline",)
    default_feature_blocks = ("down_blocks.0", "down_blocks.1", "mid_block")

    def encode(self, prompts, size, device, dtype) -> Cond:
        embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        return Cond(encoder_hidden_states=embeds.to(dtype))

    def negative(self, device, dtype) -> Cond:
        _, negative = self.pipe.encode_prompt([""], device, 1, True)
        return Cond(encoder_hidden_states=negative.to(dtype))


class StableDiffusionXL(Family):
    """SDXL: also pooled text embeddings and size/crop time ids, as the pipeline builds them."""

    name = "sdxl"
    pipelines = ("StableDiffusionXLPipeline",)
    default_feature_blocks = ("down_blocks.0", "down_blocks.1", "mid_block")

    def encode(self, prompts, size, device, dtype) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return self._cond(embeds, pooled, size, device, dtype)

    def negative(self, device, dtype) -> Cond:
        """The pipeline's own negative path, so force_zeros_for_empty_prompt is honoured; time ids at native size
        (`pair` replaces them with the conditional ones, as the pipeline does)."""
        _, negative, _, negative_pooled = self.pipe.encode_prompt(
            prompt=[""], device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        side = self.network.config.sample_size * self.pipe.vae_scale_factor
        return self._cond(negative, negative_pooled, (side, side), device, dtype)

    def pair(self, negative: Cond, cond: Cond) -> Cond:
        negative.added_cond_kwargs["time_ids"] = cond.added_cond_kwargs["time_ids"]
        return negative

    def _cond(self, embeds: Tensor, pooled: Tensor, size, device, dtype) -> Cond:
        encoder_2 = getattr(self.pipe, "text_encoder_2", None)
        projection_dim = encoder_2.config.projection_dim if encoder_2 is not None else int(pooled.shape[-1])
        time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype,
                                               text_encoder_projection_dim=projection_dim)
        return Cond(encoder_hidden_states=embeds.to(dtype), added_cond_kwargs={
            "text_embeds": pooled.to(dtype), "time_ids": time_ids.to(device).repeat(len(embeds), 1)})


class PixelUNet(Family):
    """DDPM/DDIM pipelines over a UNet2DModel: unconditional, or class-conditional (prompts are class indices)."""

    name = "unet2d"
    pipelines = ("DDPMPipeline", "DDIMPipeline")
    default_feature_blocks = ("down_blocks.0", "mid_block")

    @property
    def is_conditional(self) -> bool:
        config = self.network.config
        return config.num_class_embeds is not None or config.class_embed_type is not None

    def encode(self, prompts, size, device, dtype) -> Cond:
        if not self.is_conditional:
            return Cond(batch_size=len(prompts))
        n = self.network.config.num_class_embeds
        try:
            labels = [int(p) for p in prompts]
        except ValueError as err:
            raise DataError(
                f"The class-conditional teacher at {self.source} takes class indices as prompts, got {prompts[:3]!r}; "
                f"give integers in [0, {n})."
            ) from err
        if n is not None and any(not 0 <= label < n for label in labels):
            raise DataError(f"Class indices {labels} are outside [0, {n}) for the teacher at {self.source}; "
                            "give valid ones.")
        return Cond(class_labels=torch.tensor(labels, device=device, dtype=torch.long))

    def negative(self, device, dtype) -> Cond:
        if not self.is_conditional:
            return Cond(batch_size=1)
        if self.null_class is None:
            raise ModelError(
                f"The class-conditional teacher at {self.source} has no null class, so it cannot be guided; "
                "pass null_class=<index> to Teacher.from_pretrained if it was trained with one, or use guidance_scale 1."
            )
        return Cond(class_labels=torch.tensor([self.null_class], device=device))

    def forward(self, network, z_t, t, cond, timestep_cond=None) -> Tensor:
        return network(z_t, t, class_labels=cond.class_labels, return_dict=False)[0]


class _Transformer(Family):
    """Flow-matching transformers: the network is `pipe.transformer`; blocks return (text tokens, image tokens)."""

    network_attr = "transformer"

    def feature_map(self, output, z_t: Tensor) -> Tensor:
        tokens = output[1] if isinstance(output, tuple) else output  # [B, N, D] image tokens
        height = z_t.shape[-2] // self.latent_multiple
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, -1)

    @property
    def default_feature_blocks(self) -> tuple[str, ...]:
        """Four blocks spread over the depth (LADD reads the teacher's intermediate tokens, Sauer et al. 2024)."""
        depth = len(self.network.transformer_blocks)
        return tuple(dict.fromkeys(f"transformer_blocks.{i * (depth - 1) // 3}" for i in range(4)))


def _batch_time(t: Tensor, z_t: Tensor) -> Tensor:
    """Transformers embed one time per sample: a 0-d t becomes [B]."""
    return t.reshape(-1).expand(len(z_t)) if t.numel() == 1 else t


class StableDiffusion3(_Transformer):
    """SD3 / SD3.5 (MMDiT): token states of CLIP-L, CLIP-G and T5 [B, L, D] and pooled CLIP embeddings [B, 2048];
    the transformer predicts the flow velocity at timestep sigma * 1000 (`FlowSchedule.model_time`)."""

    name = "sd3"
    pipelines = ("StableDiffusion3Pipeline",)

    @property
    def latent_multiple(self) -> int:
        return self.network.config.patch_size

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens: the pipeline's 256, or without T5 as many zero tokens as CLIP's length (the emoji SD3 was
        trained so; the transformer attends over every appended zero token, so their count matters)."""
        return 256 if self.pipe.text_encoder_3 is not None else self.pipe.tokenizer_max_length

    def call_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def encode(self, prompts, size, device, dtype) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return Cond(encoder_hidden_states=embeds.to(dtype), added_cond_kwargs={"pooled_projections": pooled.to(dtype)})

    def negative(self, device, dtype) -> Cond:
        """The pipeline's own negative: the empty prompt through all encoders (SD3 does not zero it)."""
        _, negative, _, negative_pooled = self.pipe.encode_prompt(
            prompt=[""], prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=True,
            max_sequence_length=self.max_sequence_length)
        return Cond(encoder_hidden_states=negative.to(dtype),
                    added_cond_kwargs={"pooled_projections": negative_pooled.to(dtype)})

    def forward(self, network, z_t, t, cond, timestep_cond=None) -> Tensor:
        return network(hidden_states=z_t, timestep=_batch_time(t, z_t), encoder_hidden_states=cond.encoder_hidden_states,
                       pooled_projections=cond.added_cond_kwargs["pooled_projections"], return_dict=False)[0]


class Flux(_Transformer):
    """FLUX.1: T5 token states [B, L, D] and pooled CLIP [B, 768]; latents [B, C, H, W] are packed into 2x2 patches
    [B, HW/4, 4C] for the transformer and unpacked after, so every other module sees SD-shaped latents. FLUX.1-dev is
    guidance-distilled: the guidance scale is a network input (`timestep_cond` here), one pass, no CFG."""

    name = "flux"
    pipelines = ("FluxPipeline",)
    latent_multiple = 2
    default_guidance = 3.5  # FluxPipeline's default guidance_scale

    @property
    def embeds_guidance(self) -> bool:
        return bool(self.network.config.guidance_embeds)

    @property
    def sample_size(self) -> int:
        return self.pipe.default_sample_size  # FluxPipeline's native latent side (128: 1024 px)

    @property
    def latent_channels(self) -> int:
        return self.network.config.in_channels // 4

    def schedule_kwargs(self) -> dict:
        return {"image_seq_len": (self.sample_size // 2) ** 2}  # FLUX's shift grows with the number of patches

    def encode(self, prompts, size, device, dtype) -> Cond:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
        return Cond(encoder_hidden_states=embeds.to(dtype), added_cond_kwargs={"pooled_projections": pooled.to(dtype)})

    def negative(self, device, dtype) -> Cond:
        return self.encode([""], None, device, dtype)  # what FluxPipeline's true CFG encodes for no negative prompt

    def forward(self, network, z_t, t, cond, timestep_cond=None) -> Tensor:
        b, c, h, w = z_t.shape
        f = self.pipe.vae_scale_factor
        text = cond.encoder_hidden_states
        guidance = None
        if self.embeds_guidance:
            guidance = timestep_cond if timestep_cond is not None else torch.full((b,), self.default_guidance)
            guidance = guidance.to(z_t.device, torch.float32)
        out = network(
            hidden_states=self.pipe._pack_latents(z_t, b, c, h, w), timestep=_batch_time(t, z_t) / 1000,
            guidance=guidance, pooled_projections=cond.added_cond_kwargs["pooled_projections"],
            encoder_hidden_states=text, txt_ids=torch.zeros(text.shape[1], 3, device=z_t.device, dtype=z_t.dtype),
            img_ids=self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, z_t.device, z_t.dtype), return_dict=False,
        )[0]
        return self.pipe._unpack_latents(out, h * f, w * f, f)


FAMILIES: tuple[type[Family], ...] = (StableDiffusion, StableDiffusionXL, PixelUNet, StableDiffusion3, Flux)


def supported_pipelines() -> list[str]:
    return [name for family in FAMILIES for name in family.pipelines]


def family_class(pipeline_cls: type, source: str) -> type[Family]:
    """The adaptor serving a diffusers pipeline class (or a subclass of one it serves)."""
    for cls in pipeline_cls.__mro__:
        if cls.__module__.startswith("diffusers"):
            for family in FAMILIES:
                if cls.__name__ in family.pipelines:
                    return family
    raise ModelError(unsupported(pipeline_cls.__name__, source))


def unsupported(name: str | None, source: str) -> str:
    return (f"The pipeline at {source} is a {name}, which distill cannot use as a teacher; "
            f"use one of {', '.join(supported_pipelines())} (or a subclass).")
