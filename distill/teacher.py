"""One denoiser interface over every supported diffusers teacher.

`Teacher.from_pretrained(path_or_id)` loads a pipeline once (local folder or hub id) and exposes what
distillation needs, whatever the pipeline: prompt -> `Cond`, images <-> latents, the forward process
z_t = alpha_t x0 + sigma_t eps, the raw network output, (x0, eps) and classifier-free guidance.

What differs between pipelines lives in two objects: the family adaptor (`distill.families`: prompt encoding,
the unconditional Cond, how the network is called), chosen by the pipeline class, and the schedule
(`distill.schedule`: alpha_t, sigma_t, the time grid and the network's time units), chosen by the scheduler.
Times `t` passed to this class are the schedule's (integer timesteps for the VP family, sigma for flow matching);
no `scheduler.scale_model_input` is applied (the identity for DDPM-family schedulers at integer t). What the output
means is `prediction_type`, turned into (x0, eps) by `distill.prediction`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from distill import prediction
from distill.cond import Cond
from distill.errors import ConfigError, ModelError
from distill.families import Family, family_class, unsupported
from distill.guidance import cfg, is_unguided
from distill.schedule import schedule_for
from distill.weights import check_components

__all__ = ["Cond", "Teacher", "dtype_kwarg"]


def pickle_allowed() -> bool:
    """Pickled weights load only when the user says so (DISTILL_ALLOW_PICKLE=1): they can run arbitrary code."""
    return os.environ.get("DISTILL_ALLOW_PICKLE", "") == "1"


def _pickles_only(source: str) -> bool:
    folder = Path(source)
    return folder.is_dir() and any(folder.rglob("*.bin")) and not any(folder.rglob("*.safetensors"))


def null_components(model_index: dict) -> dict:
    """What `from_pretrained` must be given for a pipeline folder to load: no safety checker, and None for each
    component saved as null (an SD3 without T5), which diffusers otherwise refuses."""
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in model_index else {}
    kwargs.update({name: None for name, value in model_index.items()
                   if not name.startswith("_") and isinstance(value, (list, tuple)) and value[0] is None})
    return kwargs


class Teacher(torch.nn.Module):
    """A frozen diffusers pipeline behind one denoiser interface (see the module docstring).

    Attributes: pipe, family (the adaptor), kind (its name: "sd" | "sdxl" | "unet2d"), network (the denoiser; also
    `unet`), vae (None in pixel space), text_encoder / text_encoder_2 (None where absent), scheduler, schedule,
    prediction_type, num_train_timesteps, vae_scale_factor, sample_size (latent side, from the network).
    All weights have requires_grad False and are in eval mode; gradients still flow to inputs.
    """

    def __init__(self, pipe, null_class: int | None = None, source: str | None = None):
        super().__init__()
        self.source = source or type(pipe).__name__
        self.family: Family = family_class(type(pipe), self.source)(pipe, self.source, null_class)
        self.kind = self.family.name
        self.pipe = pipe
        self.unet = self.network = self.family.network
        self.vae = getattr(pipe, "vae", None)
        self.text_encoder = getattr(pipe, "text_encoder", None)
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        self.schedule = schedule_for(pipe.scheduler, f"the teacher at {self.source}", **self.family.schedule_kwargs())
        self.prediction_type = self.schedule.prediction_type
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self.vae_scale_factor = getattr(pipe, "vae_scale_factor", 1) if self.vae is not None else 1
        self.sample_size = self.family.sample_size
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
        config, cache_only = check_pipeline(source)  # refuse before loading any weights
        kwargs = {dtype_kwarg(): torch_dtype}
        if cache_only:
            kwargs["local_files_only"] = True
        if variant is not None:
            kwargs["variant"] = variant
        if not pickle_allowed():  # .bin/.ckpt weights are pickles, which run code when loaded
            kwargs["use_safetensors"] = True
        kwargs.update(null_components(config))
        try:
            pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
        except Exception as err:  # the library raises OSError, ValueError, SafetensorError, ... for bad folders
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            if _pickles_only(source):
                raise ModelError(
                    f"The teacher pipeline at {source} has pickle weights (.bin) and no .safetensors: pickles can run "
                    "code when loaded, so distill refuses them; re-save it with save_pretrained(..., "
                    "safe_serialization=True), or set DISTILL_ALLOW_PICKLE=1 if you trust the files."
                ) from err
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
        return self.family.is_conditional

    def resolution(self, resolution: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """(H, W) in pixels: the given one, or the UNet's native sample_size times vae_scale_factor."""
        if resolution is None:
            side = self.sample_size
            resolution = tuple(side) if isinstance(side, (list, tuple)) else (side, side)
            resolution = (resolution[0] * self.vae_scale_factor, resolution[1] * self.vae_scale_factor)
        height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        multiple = self.vae_scale_factor * self.family.latent_multiple
        if height % multiple or width % multiple:
            raise ConfigError(
                f"Resolution {height}x{width} is not a multiple of {multiple} (the VAE's downscale factor times the "
                f"network's patch) for the teacher at {self.source}; pick a multiple of it."
            )
        return height, width

    def latent_shape(self, resolution: int | tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(C, H, W) of the samples the UNet denoises at `resolution` pixels (default: native size)."""
        height, width = self.resolution(resolution)
        f = self.vae_scale_factor
        return self.family.latent_channels, height // f, width // f

    # ------------------------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompts: list[str] | str, resolution: int | tuple[int, int] | None = None) -> Cond:
        """Conditioning for each prompt, via the family adaptor (the pipeline's own encode_prompt, no CFG duplication).

        SD: encoder_hidden_states [B, L, D]. SDXL: also text_embeds [B, D_pooled] and time_ids [B, 6]
        (original size = target size = `resolution`, crop (0, 0), as the SDXL pipeline builds them).
        UNet2DModel: class-conditional models take class indices written as strings ("3"); for
        unconditional ones the prompts only set the batch size.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.family.encode(prompts, self.resolution(resolution), self.device, self.dtype)

    def uncond(self, batch_size: int) -> Cond:
        """The unconditional (empty-prompt / null-class) Cond repeated `batch_size` times, computed once and cached."""
        if self._uncond is None:
            self._uncond = self.family.negative(self.device, self.dtype)
        return self._uncond.to(self.device).repeat(batch_size)

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
        """(alpha_t, sigma_t) at times t [B] (or 0-d), shaped [B, 1, ...] and typed like `like`."""
        return self.schedule.alpha_sigma(t, like)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """z_t = alpha_t x0 + sigma_t eps at times t [B]."""
        return self.schedule.add_noise(x0, eps, t)

    def forward(self, z_t: Tensor, t: Tensor, cond: Cond, timestep_cond: Tensor | None = None,
                network: torch.nn.Module | None = None) -> Tensor:
        """Raw network output (eps, v, x0 or velocity, as `prediction_type` says) for z_t [B, C, H, W] at t [B] or 0-d.

        `network`: another denoiser with the teacher's signature (a student); default the teacher's own.
        A network that also predicts variances (out_channels = 2C) has its first C channels returned.
        timestep_cond: [B, D] for UNets with `time_cond_proj_dim` (e.g. a guidance embedding).
        """
        t = self.schedule.model_time(torch.as_tensor(t, device=z_t.device))
        out = self.family.forward(self.network if network is None else network, z_t, t, cond, timestep_cond)
        return out[:, : z_t.shape[1]] if out.shape[1] == 2 * z_t.shape[1] else out

    def denoise(self, z_t: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """(x0, eps) the teacher predicts for z_t at t (see `distill.prediction.to_x0_eps`)."""
        return self.to_x0_eps(self(z_t, t, cond), z_t, t)

    def to_x0_eps(self, model_output: Tensor, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, eps) from a raw output of this teacher's parameterisation (also for guided outputs)."""
        alpha, sigma = self.alpha_sigma(t, z_t)
        return prediction.to_x0_eps(model_output, z_t, alpha, sigma, self.prediction_type)

    def guided(
        self, z_t: Tensor, t: Tensor, cond: Cond, guidance_scale: float | Tensor, timestep_cond: Tensor | None = None,
        network: torch.nn.Module | None = None,
    ) -> Tensor:
        """Classifier-free guided network output: uncond + w (cond - uncond) (`distill.guidance.cfg`).

        The conditional and unconditional passes run as one forward on the doubled batch. guidance_scale:
        a float or a [B] tensor; when it is exactly 1 (or the model is unconditional) only the
        conditional pass runs. Returns the same parameterisation as `forward`, [B, C, H, W].
        """
        if self.family.embeds_guidance:  # guidance-distilled (FLUX.1-dev): the scale is an input, one pass
            scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=z_t.device).reshape(-1)
            return self(z_t, t, cond, scale.expand(len(z_t)) if timestep_cond is None else timestep_cond, network)
        if is_unguided(guidance_scale) or not self.is_conditional:
            return self(z_t, t, cond, timestep_cond, network)
        negative = self.family.pair(self.uncond(len(cond)), cond)
        t = torch.as_tensor(t, device=z_t.device)
        both = self(
            torch.cat([z_t, z_t]),
            t if t.ndim == 0 else torch.cat([t, t]),
            cond.cat(negative),
            None if timestep_cond is None else torch.cat([timestep_cond, timestep_cond]),
            network,
        )
        cond_out, uncond_out = both.chunk(2)
        return cfg(cond_out, uncond_out, guidance_scale)

    def features(self, z_t: Tensor, t: Tensor, cond: Cond, blocks: list[str] | tuple[str, ...] | None = None,
                 network: torch.nn.Module | None = None) -> list[Tensor]:
        """Intermediate activations of the denoiser at the named blocks (e.g. "down_blocks.1", "mid_block"), in order.

        For discriminators that read the teacher's own features (LADD). blocks default to the family's
        `default_feature_blocks`. Gradients flow to z_t (the weights stay frozen). A block returning a tuple
        contributes its first element (the hidden states). Returns [B, C_i, H_i, W_i] per block.
        """
        network = self.network if network is None else network
        names = list(blocks or self.family.default_feature_blocks)
        modules = dict(network.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"The teacher's denoiser has no block {missing[0]!r}; pick from "
                              f"{', '.join(n for n in modules if n.count('.') <= 1 and n)}.")
        found: dict[str, Tensor] = {}

        def keep(name):
            return lambda _module, _inputs, output: found.__setitem__(name, self.family.feature_map(output, z_t))

        handles = [modules[n].register_forward_hook(keep(n)) for n in names]
        try:
            self(z_t, t, cond, network=network)
        finally:
            for handle in handles:
                handle.remove()
        return [found[n] for n in names]


# --------------------------------------------------------------------------------------------- helpers
def _looks_like_path(source: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that does not exist is a missing local path."""
    return (
        source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1 or source.endswith("/")
        or os.path.isabs(source)
    )


def check_pipeline(source: str) -> tuple[dict, bool]:
    """(model_index.json, whether to load from the local cache only) of a teacher folder or hub id, after every check
    that loads no weights: the folder or the hub (asked once), the pipeline class, each component's weight files."""
    config, cache_only = _load_index(source)
    _pipeline_class(config.get("_class_name"), source)
    path = Path(source).expanduser()
    if path.is_dir():
        check_components(path, config, "The teacher")
    return config, cache_only


def _load_index(source: str) -> tuple[dict, bool]:
    """(model_index.json, cache only) of a local folder or hub id, with a ModelError for each way that can fail."""
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
    if local:
        try:
            return dict(DiffusionPipeline.load_config(str(path))), False
        except (OSError, ValueError) as err:
            raise ModelError(f"The model_index.json in {source} cannot be read ({err}); re-save the pipeline.") from err
    return _hub_index(source)


def _hub_index(source: str) -> tuple[dict, bool]:
    """model_index.json of a hub id: from the hub if it answers a first request, else from the local cache only,
    so that no network means one sentence in seconds, not huggingface_hub's retries."""
    from diffusers import DiffusionPipeline

    from distill.hub import unreachable

    reason = unreachable()
    try:
        with warnings.catch_warnings():  # diffusers passes hf_hub_download an argument it deprecated: not the user's
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return dict(DiffusionPipeline.load_config(source, local_files_only=reason is not None)), reason is not None
    except (OSError, ValueError) as err:
        if reason:
            raise ModelError(f"The teacher {source!r} is neither a local folder nor in the local cache, and the "
                             f"Hugging Face Hub cannot be reached ({reason}): pass a local pipeline folder, or go "
                             "online.") from err
        raise ModelError(f"The teacher {source!r} is not a local folder and the Hugging Face Hub has no such "
                         "repository (or it is private): check the id, or pass a local pipeline folder.") from err


def _pipeline_class(name: str | None, source: str):
    """The diffusers class named in model_index.json, if a family adaptor serves it (or a base class of it)."""
    import diffusers

    pipeline_cls = getattr(diffusers, name, None) if name else None
    if not isinstance(pipeline_cls, type):
        raise ModelError(unsupported(name, source))
    family_class(pipeline_cls, source)  # raises the sentence naming the supported pipelines
    return pipeline_cls


def dtype_kwarg() -> str:
    """diffusers renamed from_pretrained's `torch_dtype` to `dtype` (0.36); use whichever this version takes."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
