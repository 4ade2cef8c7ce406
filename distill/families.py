"""Teacher families: one small adaptor per kind of diffusers pipeline (k-diffusion's `external.py` idea).

An adaptor knows, for its pipelines only, how prompts become a `Cond`, what the unconditional Cond is, and how
its denoising network is called. Everything else (schedule, guidance, solvers, students, samplers) sees the
adaptor's uniform `forward(network, z_t, t_model, cond, timestep_cond)` and a `distill.schedule` object.
The network is passed in, so a student (a trained copy, or the same network with LoRA adapters) is called
exactly as its teacher is.

Adding a family (SD3, FLUX, ...) is one subclass here registered in `FAMILIES`, plus its schedule in
`distill.schedule`; no other module branches on the family.
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

    def __init__(self, pipe, source: str, null_class: int | None = None):
        self.pipe, self.source, self.null_class = pipe, source, null_class

    @property
    def network(self) -> torch.nn.Module:
        return getattr(self.pipe, self.network_attr)

    @property
    def is_conditional(self) -> bool:
        return True

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


FAMILIES: tuple[type[Family], ...] = (StableDiffusion, StableDiffusionXL, PixelUNet)


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
