"""The models an eval compares, and the one sampling loop they all go through.

A `Candidate` is a pipeline wrapped by `distill.teacher.Teacher` (the toolkit's one denoiser interface)
plus how a user would sample it: which scheduler, which guidance, whether that guidance costs a second
(unconditional) pass. The teacher appears twice: with its own scheduler at its usual step count, and with
DDIM (trailing spacing, so one step starts at t = T - 1) at few steps, the no-distillation baseline.
Students come from `distill.sampling.load_student_pipeline` (run folder, LoRA export, pipeline export);
a LoRA is fused into the teacher's weights and unloaded, as one would deploy it.

`encode` / `denoise` / `decode` are StableDiffusionPipeline.__call__ taken apart so that each stage can be
timed on its own and the decode batched; tests/evals/test_run.py checks that together they give exactly
the pipeline's images. Noise is seeded per sample (`sample_generators`), so sample i starts from the same
z_T in every model and a stochastic scheduler (LCM) draws its per-step noise from that sample's own stream.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill.errors import ConfigError, ModelError
from distill.teacher import Cond, Teacher, dtype_kwarg

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DIVERSITY_STREAM = 1 << 31  # seeds of the per-prompt diversity samples never meet those of the main set


@dataclass(eq=False)  # compared and hashed by identity: one object per way of sampling
class Candidate:
    """One way of sampling one model: `label(steps)` names a row of the report."""

    name: str  # "teacher" or the student's folder name
    role: str  # "teacher" | "student"
    kind: str  # "teacher" | "lora" | "full" | "pipeline"
    source: str
    model: Teacher
    scheduler_cls: type
    scheduler_config: dict
    guidance_scale: float
    description: str
    metadata: dict = field(default_factory=dict)

    @property
    def guidance_input(self) -> bool:
        """True for a UNet that takes the guidance scale as an input (an LCM with `time_cond_proj_dim`)."""
        return bool(getattr(self.model.unet.config, "time_cond_proj_dim", None))

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance runs (two UNet passes a step), as StableDiffusionPipeline decides it."""
        return self.guidance_scale > 1 and not self.guidance_input and self.model.is_conditional

    def nfe(self, steps: int) -> int:
        """UNet evaluations per image: steps, doubled by CFG."""
        return steps * (2 if self.cfg else 1)

    def scheduler(self):
        """A fresh scheduler (multistep schedulers keep state between steps)."""
        return self.scheduler_cls.from_config(self.scheduler_config)

    @property
    def scheduler_name(self) -> str:
        spacing = self.scheduler_config.get("timestep_spacing")  # LCMScheduler picks its own timesteps
        lcm = self.scheduler_cls.__name__ == "LCMScheduler"
        return f"{self.scheduler_cls.__name__} ({spacing})" if spacing and not lcm else self.scheduler_cls.__name__

    def label(self, steps: int) -> str:
        return f"{self.name}@{steps}"


# --------------------------------------------------------------------------------------------- loading
def parse_dtype(name: str, device: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name} is not one of {', '.join(DTYPES)}; pick one of them.")
    if name == "fp16" and not str(device).startswith("cuda"):
        raise ConfigError("--dtype fp16 runs on CUDA only; on CPU use fp32 or bf16.")
    return DTYPES[name]


def check_device(device: str) -> str:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but this torch sees no CUDA GPU; use --device cpu.")
    if not (str(device) == "cpu" or str(device).startswith("cuda")):
        raise ConfigError(f"--device {device} is not supported: use cpu or cuda (cuda:N).")
    return str(device)


def default_guidance(pipe) -> float:
    """The guidance_scale the pipeline's own __call__ defaults to (7.5 for SD, 5.0 for SDXL)."""
    default = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return float(default.default) if default is not None and default.default is not inspect.Parameter.empty else 1.0


def load_teacher(source: str, device: str, dtype: torch.dtype, guidance_scale: float | None,
                 baseline_guidance: float | None, compile_unet: bool = False) -> tuple[Candidate, Candidate]:
    """(teacher with its own scheduler, teacher with DDIM trailing) sharing one loaded pipeline."""
    from diffusers import DDIMScheduler

    model = Teacher.from_pretrained(source, torch_dtype=dtype, device=device)
    _maybe_compile(model, compile_unet)
    scale = default_guidance(model.pipe) if guidance_scale is None else float(guidance_scale)
    own = model.scheduler
    usual = Candidate("teacher", "teacher", "teacher", source, model, type(own), dict(own.config), scale,
                      f"teacher, its own {type(own).__name__}", {"class": type(model.pipe).__name__})
    ddim_config = dict(DDIMScheduler.from_config(own.config, timestep_spacing="trailing").config)
    # Latents are not in [-1, 1]: never clip them (a pixel-space teacher keeps its own setting).
    ddim_config.update(timestep_spacing="trailing", clip_sample=False if model.vae is not None else
                       own.config.get("clip_sample", True))
    base_scale = scale if baseline_guidance is None else float(baseline_guidance)
    baseline = Candidate("teacher", "teacher", "teacher", source, model, DDIMScheduler, ddim_config, base_scale,
                         "teacher, DDIM with trailing timesteps (no distillation)", usual.metadata)
    return usual, baseline


def check_student(source: str) -> None:
    """ModelError now if `source` cannot be a student: no folder, or no pipeline / student.json / run student in it."""
    from distill.runs import student_folder
    from distill.info import INFO_FILE

    path = Path(source)
    if not path.exists():
        raise ModelError(f"Student {source} does not exist; pass a run folder, a LoRA export or a pipeline export.")
    if not ((path / "model_index.json").is_file() or (path / INFO_FILE).is_file()):
        student_folder(path)  # raises a ModelError naming what the run folder lacks


def load_student(source: str, teacher_source: str, device: str, dtype: torch.dtype,
                 compile_unet: bool = False) -> Candidate:
    """A student from a run folder, a LoRA export or a pipeline export, sampled as its metadata says.

    A LoRA is loaded into a fresh copy of the `--teacher` pipeline, fused and unloaded (deployment form).
    A pipeline folder without distill's student.json is used as it is: its own scheduler, guidance 1.
    """
    from distill.sampling import load_student_pipeline

    check_student(source)
    path = Path(source)
    is_pipeline = (path / "model_index.json").is_file()
    if is_pipeline and not (path / "student.json").is_file():
        return _plain_pipeline(path, device, dtype, compile_unet)
    base = None if is_pipeline else Teacher.from_pretrained(teacher_source, torch_dtype=dtype, device=device).pipe
    pipe, info = load_student_pipeline(path, teacher_pipe=base, device=device)
    if info.kind == "lora":
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    pipe.to(device=device, dtype=dtype)
    model = Teacher(pipe, source=str(path))
    _maybe_compile(model, compile_unet)
    scheduler = pipe.scheduler
    kind = "lora" if info.kind == "lora" else "full"
    what = (f"{info.method.upper()}-LoRA fused into the teacher" if kind == "lora"
            else f"{info.method.upper()}, full student network")
    metadata = {"teacher": info.teacher, **info.details, "guidance_scale": info.guidance_scale,
                "teacher_guidance_scale": info.teacher_guidance_scale, "step": info.step, "method": info.method,
                "sampler": info.sampler.scheduler}
    return Candidate(_name(path), "student", kind, str(path), model, type(scheduler), dict(scheduler.config),
                     float(info.guidance_scale), what, metadata)


def _plain_pipeline(path: Path, device: str, dtype: torch.dtype, compile_unet: bool) -> Candidate:
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), **{dtype_kwarg(): dtype})
    except Exception as err:  # diffusers raises many types for a broken folder
        raise ModelError(f"The student pipeline at {path} could not be loaded ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160]}); re-export it.") from err
    pipe.to(device)
    model = Teacher(pipe, source=str(path))
    _maybe_compile(model, compile_unet)
    scheduler = pipe.scheduler
    return Candidate(_name(path), "student", "pipeline", str(path), model, type(scheduler), dict(scheduler.config),
                     1.0, f"pipeline folder with its own {type(scheduler).__name__}, guidance 1 (no student.json)",
                     {"class": type(pipe).__name__})


def _name(path: Path) -> str:
    """A run folder's or export's name; a run's student/ or checkpoint folder is named after its run."""
    parts = [p for p in path.resolve().parts if p]
    if parts[-1] == "student" or (len(parts) > 1 and parts[-2] == "checkpoints"):
        return "/".join(parts[-3:] if parts[-2] == "checkpoints" else parts[-2:])
    return parts[-1]


def _maybe_compile(model: Teacher, compile_unet: bool) -> None:
    if compile_unet:
        model.unet = torch.compile(model.unet)


def weights_mb(model: Teacher) -> float:
    """Parameter memory of the UNet, VAE and text encoder(s), in MiB."""
    modules = [m for m in (model.unet, model.vae, model.text_encoder, model.text_encoder_2) if m is not None]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**20


# -------------------------------------------------------------------------------------------- sampling
def sample_generators(seed: int, indices, stream: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample: sample i of every model draws from manual_seed((seed << 32) + stream + i)."""
    return [torch.Generator().manual_seed((int(seed) << 32) + stream + int(i)) for i in indices]


def initial_noise(candidate: Candidate, generators: list[torch.Generator]) -> torch.Tensor:
    """z_T for each sample [B, C, h, w], drawn as StableDiffusionPipeline.prepare_latents does (CPU, per generator)."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (len(generators), *candidate.model.latent_shape())
    return randn_tensor(shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32)


def encode(candidate: Candidate, prompts: list[str]) -> Cond:
    """Prompt conditioning (the empty prompt for CFG is encoded once per model and cached by `Teacher`)."""
    cond = candidate.model.encode_prompt(list(prompts))
    if candidate.cfg:
        candidate.model.uncond(1)  # first use computes and caches it: keep that out of the loop's time
    return cond


def guidance_cond(candidate: Candidate, batch: int) -> torch.Tensor | None:
    """The guidance-scale embedding a UNet with `time_cond_proj_dim` takes (the pipeline's own helper)."""
    if not candidate.guidance_input:
        return None
    model = candidate.model
    scale = torch.tensor(candidate.guidance_scale - 1).repeat(batch)
    emb = model.pipe.get_guidance_scale_embedding(scale, embedding_dim=model.unet.config.time_cond_proj_dim)
    return emb.to(model.device, model.dtype)


@torch.inference_mode()
def denoise(candidate: Candidate, steps: int, cond: Cond, noise: torch.Tensor,
            generators: list[torch.Generator]) -> torch.Tensor:
    """The pipeline's denoising loop from z_T = `noise` (CPU) to latents z_0 on the model's device."""
    model, scheduler = candidate.model, candidate.scheduler()
    scheduler.set_timesteps(steps, device=model.device)
    z = (noise.to(model.device) * scheduler.init_noise_sigma).to(model.dtype)
    w = 1.0 if not candidate.cfg else candidate.guidance_scale
    w_embedding = guidance_cond(candidate, len(z))
    extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        z_in = scheduler.scale_model_input(z, t)
        out = model.guided(z_in, t, cond, w, timestep_cond=w_embedding)
        z = scheduler.step(out, t, z, return_dict=False, **extra)[0].to(model.dtype)
    return z


@torch.inference_mode()
def decode(candidate: Candidate, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images [B, 3, H, W] in [-1, 1], float32."""
    return candidate.model.decode_latents(latents).float().clamp(-1, 1)


def free(candidate: Candidate) -> None:
    """Drop a model's weights from the device before the next one loads."""
    import gc

    candidate.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
