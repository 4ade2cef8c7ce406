"""One denoiser interface over every supported diffusers teacher.

`Teacher.from_pretrained(path_or_id)` loads a pipeline once (local folder or hub id) and exposes what
distillation needs, whatever the pipeline: prompt -> `Cond`, images <-> latents, the forward process
z_t = alpha_t x0 + sigma_t eps, the raw network output, (x0, eps) and classifier-free guidance.

Supported: StableDiffusionPipeline (SD 1.x / 2.x and fine-tunes; CLIP or BERT text encoder),
StableDiffusionXLPipeline, and DDPMPipeline / DDIMPipeline over a UNet2DModel (unconditional or
class-conditional). The network sees z_t in the variance-preserving parameterisation; no
`scheduler.scale_model_input` is applied (it is the identity for DDPM-family schedulers at integer t).
What the output means is `prediction_type`, turned into (x0, eps) by `distill.prediction`, so a
flow-matching teacher would only change `alpha_sigma` and `prediction_type`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from distill import prediction
from distill.errors import ConfigError, DataError, ModelError
from distill.guidance import cfg, is_unguided

SUPPORTED = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "DDPMPipeline": "unet2d",
    "DDIMPipeline": "unet2d",
}


@dataclass
class Cond:
    """Everything the network needs besides z_t and t, for a batch of B samples.

    encoder_hidden_states: [B, L, D] text embeddings (SD, SDXL).
    added_cond_kwargs: SDXL's {"text_embeds": [B, D_pooled], "time_ids": [B, 6]}.
    class_labels: [B] long class indices (class-conditional UNet2DModel).
    batch_size: only for a Cond that holds no tensors (unconditional models), to keep its length.
    """

    encoder_hidden_states: Tensor | None = None
    added_cond_kwargs: dict[str, Tensor] | None = None
    class_labels: Tensor | None = None
    batch_size: int | None = None

    def tensors(self) -> list[Tensor]:
        extra = list(self.added_cond_kwargs.values()) if self.added_cond_kwargs else []
        return [x for x in (self.encoder_hidden_states, self.class_labels, *extra) if x is not None]

    def __len__(self) -> int:
        tensors = self.tensors()
        if tensors:
            return tensors[0].shape[0]
        if self.batch_size is None:
            raise ValueError("This Cond holds no tensors and no batch_size, so it has no length.")
        return self.batch_size

    def _map(self, fn, other: Cond | None = None, batch_size: int | None = None) -> Cond:
        """Apply fn(x), or fn(x, y) with y the other Cond's matching tensor, to every tensor."""

        def one(x, y):
            if x is None:
                return None
            if other is None:
                return fn(x)
            if y is None:
                raise ValueError("Cannot combine Conds that hold different fields.")
            return fn(x, y)

        mine, theirs = self.added_cond_kwargs, getattr(other, "added_cond_kwargs", None) or {}
        return Cond(
            encoder_hidden_states=one(self.encoder_hidden_states, getattr(other, "encoder_hidden_states", None)),
            added_cond_kwargs=None if mine is None else {k: one(v, theirs.get(k)) for k, v in mine.items()},
            class_labels=one(self.class_labels, getattr(other, "class_labels", None)),
            batch_size=None if self.tensors() else batch_size,
        )

    def cat(self, other: Cond) -> Cond:
        """Batch concatenation [self; other]; both must hold the same fields."""
        if len(self.tensors()) != len(other.tensors()):
            raise ValueError("Cannot concatenate Conds that hold different fields.")
        return self._map(lambda x, y: torch.cat([x, y]), other, len(self) + len(other))

    def repeat(self, n: int) -> Cond:
        """Each sample repeated n times in place (repeat_interleave): [a, b] -> [a, a, b, b]."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0), batch_size=len(self) * n)

    def to(self, device=None, dtype: torch.dtype | None = None) -> Cond:
        """Move every tensor to `device`; cast floating-point ones to `dtype` (class labels stay long)."""

        def move(x):
            return x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None)

        return self._map(move, batch_size=self.batch_size)

    def select(self, index) -> Cond:
        """The samples at `index` (int, slice, list, long or bool tensor), batch dim kept."""
        if isinstance(index, int):
            index = [index]
        size = torch.arange(len(self))[index].numel()
        return self._map(lambda x: x[index], batch_size=size)


class Teacher(torch.nn.Module):
    """A frozen diffusers pipeline behind one denoiser interface (see the module docstring).

    Attributes: pipe, unet, vae (None in pixel space), text_encoder / text_encoder_2 (None where absent),
    scheduler, kind ("sd" | "sdxl" | "unet2d"), prediction_type, num_train_timesteps,
    alphas_cumprod (buffer [T], float32), vae_scale_factor, sample_size (latent side, from the UNet).
    All weights have requires_grad False and are in eval mode; gradients still flow to inputs.
    """

    def __init__(self, pipe, null_class: int | None = None, source: str | None = None):
        super().__init__()
        self.source = source or type(pipe).__name__
        self.kind = _kind_of(pipe, self.source)
        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = getattr(pipe, "vae", None)
        self.text_encoder = getattr(pipe, "text_encoder", None)
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.requires_grad_(False).eval()
        self.prediction_type = pipe.scheduler.config.prediction_type
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.register_buffer("alphas_cumprod", _alphas_cumprod(self.scheduler, self.source), persistent=False)
        self.vae_scale_factor = getattr(pipe, "vae_scale_factor", 1) if self.vae is not None else 1
        self.sample_size = self.unet.config.sample_size
        self.null_class = null_class
        self._uncond: Cond | None = None

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        null_class: int | None = None,
        variant: str | None = None,
    ) -> Teacher:
        """Load a supported pipeline from a local folder or a hub id (via DiffusionPipeline.from_pretrained).

        null_class: for a class-conditional UNet2DModel, the class index trained as "no class"
        (needed only for guidance). variant: the weights variant to load, e.g. "fp16".
        A pipeline's safety checker is not loaded (the teacher only denoises).
        With torch_dtype float16 a VAE marked `force_upcast` (SDXL's) is kept in float32.
        """
        from diffusers import DiffusionPipeline

        source = str(path_or_id)
        config = _load_index(source)
        _pipeline_class(config.get("_class_name"), source)
        kwargs = {_dtype_kwarg(): torch_dtype}
        if variant is not None:
            kwargs["variant"] = variant
        if "safety_checker" in config:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
        except Exception as err:  # the library raises OSError, ValueError, SafetensorError, ... for bad folders
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ModelError(
                f"The teacher pipeline at {source} could not be loaded ({reason}); check that every component's "
                "config and weights are present and intact, or re-save it with save_pretrained."
            ) from err
        pipe.to(device)
        vae = getattr(pipe, "vae", None)
        if vae is not None and torch_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)
        return cls(pipe, null_class=null_class, source=source)

    # -------------------------------------------------------------------------------------- properties
    @property
    def scheduler(self):
        """The pipeline's scheduler (the one it was loaded with, unless the caller swapped it)."""
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def is_conditional(self) -> bool:
        """True for text-conditioned pipelines and class-conditional UNet2DModels."""
        if self.kind != "unet2d":
            return True
        config = self.unet.config
        return config.num_class_embeds is not None or config.class_embed_type is not None

    def resolution(self, resolution: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """(H, W) in pixels: the given one, or the UNet's native sample_size times vae_scale_factor."""
        if resolution is None:
            side = self.sample_size
            resolution = tuple(side) if isinstance(side, (list, tuple)) else (side, side)
            resolution = (resolution[0] * self.vae_scale_factor, resolution[1] * self.vae_scale_factor)
        height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ConfigError(
                f"Resolution {height}x{width} is not a multiple of the VAE's downscale factor "
                f"{self.vae_scale_factor} for the teacher at {self.source}; pick a multiple of it."
            )
        return height, width

    def latent_shape(self, resolution: int | tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(C, H, W) of the samples the UNet denoises at `resolution` pixels (default: native size)."""
        height, width = self.resolution(resolution)
        f = self.vae_scale_factor
        return self.unet.config.in_channels, height // f, width // f

    # ------------------------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompts: list[str] | str, resolution: int | tuple[int, int] | None = None) -> Cond:
        """Conditioning for each prompt, via the pipeline's own encode_prompt (no CFG duplication).

        SD: encoder_hidden_states [B, L, D]. SDXL: also text_embeds [B, D_pooled] and time_ids [B, 6]
        (original size = target size = `resolution`, crop (0, 0), as the SDXL pipeline builds them).
        UNet2DModel: class-conditional models take class indices written as strings ("3"); for
        unconditional ones the prompts only set the batch size.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.kind == "unet2d":
            return self._class_cond(prompts)
        if self.kind == "sd":
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
            return Cond(encoder_hidden_states=embeds.to(self.dtype))
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return self._sdxl_cond(embeds, pooled, resolution)

    def uncond(self, batch_size: int) -> Cond:
        """The unconditional (empty-prompt / null-class) Cond repeated `batch_size` times.

        Computed once by the pipeline's own negative-prompt path (so SDXL's force_zeros_for_empty_prompt
        is honoured) and cached. For SDXL the cached time_ids are at the native resolution; `guided`
        replaces them with the conditional ones, as the pipeline does.
        """
        if self._uncond is None:
            self._uncond = self._compute_uncond()
        return self._uncond.to(self.device).repeat(batch_size)

    def _compute_uncond(self) -> Cond:
        if self.kind == "unet2d":
            if not self.is_conditional:
                return Cond(batch_size=1)
            if self.null_class is None:
                raise ModelError(
                    f"The class-conditional teacher at {self.source} has no null class, so it cannot be guided; "
                    "pass null_class=<index> to Teacher.from_pretrained if it was trained with one, "
                    "or use guidance_scale 1."
                )
            return Cond(class_labels=torch.tensor([self.null_class], device=self.device))
        if self.kind == "sd":
            _, negative = self.pipe.encode_prompt([""], self.device, 1, True)
            return Cond(encoder_hidden_states=negative.to(self.dtype))
        _, negative, _, negative_pooled = self.pipe.encode_prompt(
            prompt=[""], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        return self._sdxl_cond(negative, negative_pooled, None)

    def _sdxl_cond(self, embeds: Tensor, pooled: Tensor, resolution) -> Cond:
        size = self.resolution(resolution)
        projection_dim = (
            self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else int(pooled.shape[-1])
        )
        time_ids = self.pipe._get_add_time_ids(
            size, (0, 0), size, dtype=self.dtype, text_encoder_projection_dim=projection_dim
        )
        return Cond(
            encoder_hidden_states=embeds.to(self.dtype),
            added_cond_kwargs={
                "text_embeds": pooled.to(self.dtype),
                "time_ids": time_ids.to(self.device).repeat(len(embeds), 1),
            },
        )

    def _class_cond(self, prompts: list[str]) -> Cond:
        if not self.is_conditional:
            return Cond(batch_size=len(prompts))
        n = self.unet.config.num_class_embeds
        try:
            labels = [int(p) for p in prompts]
        except ValueError as err:
            raise DataError(
                f"The class-conditional teacher at {self.source} takes class indices as prompts, got {prompts[:3]!r}; "
                f"give integers in [0, {n})."
            ) from err
        if n is not None and any(not 0 <= label < n for label in labels):
            raise DataError(
                f"Class indices {labels} are outside [0, {n}) for the teacher at {self.source}; give valid ones."
            )
        return Cond(class_labels=torch.tensor(labels, device=self.device, dtype=torch.long))

    # ------------------------------------------------------------------------------------------- VAE
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents (z - shift_factor) * scaling_factor, [B, C, H/f, W/f].

        Uses the posterior mean, or a sample from it when `generator` is given. Identity without a VAE.
        """
        if self.vae is None:
            return images.to(self.dtype)
        posterior = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        latents = posterior.mean if generator is None else posterior.sample(generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(self.dtype)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Inverse of `encode_images`: latents -> images [B, 3, H, W] in about [-1, 1] (not clamped)."""
        if self.vae is None:
            return latents
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].to(latents.dtype)

    # -------------------------------------------------------------------------------------- denoising
    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) at timesteps t [B] (or 0-d), shaped [B, 1, ...] and typed like `like`."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        alpha, sigma = prediction.alpha_sigma(self.alphas_cumprod, t, like.ndim)
        return alpha.to(like.device, like.dtype), sigma.to(like.device, like.dtype)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """z_t = alpha_t x0 + sigma_t eps at timesteps t [B]."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return prediction.add_noise(x0, eps, alpha, sigma)

    def forward(self, z_t: Tensor, t: Tensor, cond: Cond, timestep_cond: Tensor | None = None) -> Tensor:
        """Raw network output (eps, v or x0 as `prediction_type` says) for z_t [B, C, H, W] at t [B] or 0-d.

        A UNet that also predicts variances (out_channels = 2C) has its first C channels returned.
        timestep_cond: [B, D] for UNets with `time_cond_proj_dim` (e.g. a guidance embedding).
        """
        t = torch.as_tensor(t, device=z_t.device)
        if self.kind == "unet2d":
            out = self.unet(z_t, t, class_labels=cond.class_labels, return_dict=False)[0]
        else:
            out = self.unet(
                z_t, t, encoder_hidden_states=cond.encoder_hidden_states, timestep_cond=timestep_cond,
                added_cond_kwargs=cond.added_cond_kwargs, class_labels=cond.class_labels, return_dict=False,
            )[0]
        return out[:, : z_t.shape[1]] if out.shape[1] == 2 * z_t.shape[1] else out

    def denoise(self, z_t: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """(x0, eps) the teacher predicts for z_t at t (see `distill.prediction.to_x0_eps`)."""
        return self.to_x0_eps(self(z_t, t, cond), z_t, t)

    def to_x0_eps(self, model_output: Tensor, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, eps) from a raw output of this teacher's parameterisation (also for guided outputs)."""
        alpha, sigma = self.alpha_sigma(t, z_t)
        return prediction.to_x0_eps(model_output, z_t, alpha, sigma, self.prediction_type)

    def guided(
        self, z_t: Tensor, t: Tensor, cond: Cond, guidance_scale: float | Tensor, timestep_cond: Tensor | None = None
    ) -> Tensor:
        """Classifier-free guided network output: uncond + w (cond - uncond) (`distill.guidance.cfg`).

        The conditional and unconditional passes run as one forward on the doubled batch. guidance_scale:
        a float or a [B] tensor; when it is exactly 1 (or the model is unconditional) only the
        conditional pass runs. Returns the same parameterisation as `forward`, [B, C, H, W].
        """
        if is_unguided(guidance_scale) or not self.is_conditional:
            return self(z_t, t, cond, timestep_cond)
        negative = self.uncond(len(cond))
        if self.kind == "sdxl":  # the pipeline pairs the negative prompt with the same size ids
            negative.added_cond_kwargs["time_ids"] = cond.added_cond_kwargs["time_ids"]
        t = torch.as_tensor(t, device=z_t.device)
        both = self(
            torch.cat([z_t, z_t]),
            t if t.ndim == 0 else torch.cat([t, t]),
            cond.cat(negative),
            None if timestep_cond is None else torch.cat([timestep_cond, timestep_cond]),
        )
        cond_out, uncond_out = both.chunk(2)
        return cfg(cond_out, uncond_out, guidance_scale)


# --------------------------------------------------------------------------------------------- helpers
def _looks_like_path(source: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that does not exist is a missing local path."""
    return (
        source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1 or source.endswith("/")
        or os.path.isabs(source)
    )


def _load_index(source: str) -> dict:
    """model_index.json of a local folder or hub id, with a ModelError for each way that can fail."""
    from diffusers import DiffusionPipeline

    path = Path(source).expanduser()
    local = path.exists() or _looks_like_path(source)
    if local and not path.exists():
        raise ModelError(f"The teacher path {source} does not exist; pass a diffusers pipeline folder or a hub id.")
    if local and not (path / "model_index.json").is_file():
        raise ModelError(
            f"{source} is not a diffusers pipeline folder (no model_index.json); pass the folder a pipeline's "
            "save_pretrained wrote, or a hub id."
        )
    try:
        return dict(DiffusionPipeline.load_config(str(path) if local else source))
    except (OSError, ValueError) as err:
        if local:
            raise ModelError(f"The model_index.json in {source} cannot be read ({err}); re-save the pipeline.") from err
        raise ModelError(
            f"The teacher {source!r} is not a local folder and could not be downloaded from the Hugging Face Hub "
            "(offline, or no such repository); pass a local pipeline folder, or go online and check the id."
        ) from err


def _pipeline_class(name: str | None, source: str):
    """The diffusers class named in model_index.json, if it is (a subclass of) a supported one."""
    import diffusers

    pipeline_cls = getattr(diffusers, name, None) if name else None
    supported = [getattr(diffusers, n) for n in SUPPORTED]
    if not (isinstance(pipeline_cls, type) and issubclass(pipeline_cls, tuple(supported))):
        raise ModelError(_unsupported(name, source))
    return pipeline_cls


def _unsupported(name: str | None, source: str) -> str:
    return (
        f"The pipeline at {source} is a {name}, which distill cannot use as a teacher; "
        f"use one of {', '.join(SUPPORTED)} (or a subclass)."
    )


def _kind_of(pipe, source: str) -> str:
    for cls in type(pipe).__mro__:
        if cls.__name__ in SUPPORTED and cls.__module__.startswith("diffusers"):
            return SUPPORTED[cls.__name__]
    raise ModelError(_unsupported(type(pipe).__name__, source))


def _dtype_kwarg() -> str:
    """diffusers renamed from_pretrained's `torch_dtype` to `dtype` (0.36); use whichever this version takes."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def _alphas_cumprod(scheduler, source: str) -> Tensor:
    """abar_t [T] from the scheduler itself, or from a DDPM scheduler built on its beta config."""
    from diffusers import DDPMScheduler

    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        if "beta_schedule" not in scheduler.config:
            raise ModelError(
                f"The scheduler {type(scheduler).__name__} of the teacher at {source} has no DDPM noise schedule; "
                "use a pipeline whose scheduler has betas (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...)."
            )
        alphas_cumprod = DDPMScheduler.from_config(scheduler.config).alphas_cumprod
    return torch.as_tensor(alphas_cumprod, dtype=torch.float32).clone()
