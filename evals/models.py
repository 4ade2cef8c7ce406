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
from distill.info import SamplerSpec
from distill.teacher import Cond, Teacher, dtype_kwarg

# The single few-step baseline when the sweep is off: trailing DDIM on the VP schedule, the stock Euler on flow.
PLAIN = {"vp": ("DDIMScheduler", {"timestep_spacing": "trailing"}, "DDIM with trailing timesteps"),
         "flow": ("FlowMatchEulerDiscreteScheduler", {}, "Euler on the flow ODE")}

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
    sigmas: dict | None = None  # {str(steps): sigmas} a flow student samples at (its sampler spec), if pinned
    timesteps: dict | None = None  # {str(steps): timesteps} a tuned schedule (its sampler spec), if pinned

    @property
    def guidance_input(self) -> bool:
        """True for a UNet that takes the guidance scale as an input (an LCM with `time_cond_proj_dim`)."""
        return bool(getattr(self.model.unet.config, "time_cond_proj_dim", None))

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance runs (two UNet passes a step), as StableDiffusionPipeline decides it."""
        return (self.guidance_scale > 1 and not self.guidance_input and self.model.is_conditional
                and not self.model.family.embeds_guidance)  # FLUX.1-dev: guidance is an input, one pass

    def supports(self, steps: int) -> bool:
        """Whether its scheduler can take this many steps: an LCMScheduler only up to its `original_inference_steps`
        (an ADD student's grid of 4 timesteps has no 8-step schedule)."""
        if self.sigmas:
            return str(steps) in self.sigmas
        limit = self.scheduler_config.get("original_inference_steps") if self.scheduler_cls.__name__ == "LCMScheduler" else None
        return limit is None or steps <= limit

    def pinned(self, steps: int) -> dict:
        """`set_timesteps` keywords for this step count's pinned schedule ({} for the scheduler's own spacing)."""
        return SamplerSpec("", sigmas=self.sigmas, timesteps=self.timesteps).pinned(steps)

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
def auto_dtype(device: str) -> str:
    """bf16 where the device computes it natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX),
    else fp32. On the emoji teachers bf16 sampled 1.6-1.8x as fast on such a CPU as fp32, its images 42 dB
    (median PSNR) from fp32's after 50 CFG steps; fp16 stays opt-in (SD VAEs can overflow in it)."""
    if str(device).startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if str(device) == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def cpu_has_bf16() -> bool:
    """oneDNN's own test for native bf16 matmuls on this CPU (AVX512-BF16 or AMX); without them bf16 is emulated
    and slower than fp32."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def parse_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype of --dtype; "auto" is `auto_dtype(device)`."""
    name = auto_dtype(device) if name == "auto" else name
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name} is not one of auto, {', '.join(DTYPES)}; pick one of them.")
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
    model = Teacher.from_pretrained(source, torch_dtype=dtype, device=device)
    _maybe_compile(model, compile_unet)
    scale = default_guidance(model.pipe) if guidance_scale is None else float(guidance_scale)
    own = model.scheduler
    usual = Candidate("teacher", "teacher", "teacher", source, model, type(own), dict(own.config), scale,
                      f"teacher, its own {type(own).__name__}", {"class": type(model.pipe).__name__})
    base_scale = scale if baseline_guidance is None else float(baseline_guidance)
    name, settings, what = PLAIN[model.schedule.family]
    baseline = teacher_candidate(model, source, name, settings, base_scale, "teacher",
                                 f"teacher, {what} (no distillation)")
    return usual, baseline


def teacher_candidate(model: Teacher, source: str, scheduler: str, settings: dict, guidance: float, name: str,
                      description: str) -> Candidate:
    """The loaded teacher sampled with another diffusers scheduler (built from its own config + `settings`)."""
    import diffusers

    cls = getattr(diffusers, scheduler)
    if settings.get("use_flow_sigmas") and "flow_shift" not in settings:  # DPM-Solver/UniPC on the teacher's shift
        settings = {**settings, "flow_shift": model.schedule.shift}
    config = dict(cls.from_config(model.scheduler.config, **settings).config)
    config.update(settings)
    if "clip_sample" in config and model.vae is not None:
        config["clip_sample"] = False  # latents are not in [-1, 1]: never clip them
    return Candidate(name, "teacher", "teacher", source, model, cls, config, float(guidance), description,
                     {"class": type(model.pipe).__name__, "scheduler_settings": str(settings or "")})


def check_student(source: str) -> None:
    """ModelError now if `source` cannot be a student: no folder, or no pipeline / student.json / LoRA file / run
    student in it."""
    from distill.info import INFO_FILE, LORA_WEIGHTS
    from distill.runs import student_folder

    path = Path(source)
    if not path.exists():
        raise ModelError(f"Student {source} does not exist; pass a run folder, a LoRA export or a pipeline export.")
    if not any((path / f).is_file() for f in ("model_index.json", INFO_FILE, LORA_WEIGHTS)):
        student_folder(path)  # raises a ModelError naming what the run folder lacks


def load_student(source: str, teacher_source: str, device: str, dtype: torch.dtype, compile_unet: bool = False,
                 sampler: str | None = None) -> Candidate:
    """A student from a run folder, a LoRA export or a pipeline export, sampled as its metadata says.

    A LoRA is loaded into a fresh copy of the `--teacher` pipeline, fused and unloaded (deployment form).
    Without distill's student.json (a pipeline folder, or a bare `pytorch_lora_weights.safetensors` such as a
    published LCM-LoRA), `sampler` (Class[:k=v]@g, e.g. "LCMScheduler@1") says how to sample it; by default its own
    scheduler (or the teacher's) at guidance 1.
    """
    from distill.info import INFO_FILE
    from distill.sampling import load_student_pipeline

    check_student(source)
    path = Path(source)
    if not (path / INFO_FILE).is_file() and ((path / "model_index.json").is_file() or _bare_lora(path)):
        return _foreign(path, teacher_source, device, dtype, compile_unet, sampler)
    is_pipeline = (path / "model_index.json").is_file()
    base = None if is_pipeline else Teacher.from_pretrained(teacher_source, torch_dtype=dtype, device=device).pipe
    pipe, info = load_student_pipeline(path, teacher_pipe=base, device=device)
    adapter_mb = _fuse(pipe) if info.kind == "lora" else None
    model = _model(pipe, path, device, dtype, compile_unet)
    kind = "lora" if info.kind == "lora" else "full"
    what = (f"{info.method.upper()}-LoRA fused into the teacher" if kind == "lora"
            else f"{info.method.upper()}, full student network")
    metadata = {"teacher": info.teacher, **info.details, "guidance_scale": info.guidance_scale,
                "teacher_guidance_scale": info.teacher_guidance_scale, "step": info.step, "method": info.method,
                "sampler": info.sampler.scheduler, "feature_network": info.feature_network or "",
                "adapter_mb": adapter_mb, "training": info.training or _run_training(path)}
    scheduler = pipe.scheduler
    return Candidate(_name(path), "student", kind, str(path), model, type(scheduler), dict(scheduler.config),
                     float(info.guidance_scale), what, metadata, sigmas=info.sampler.sigmas, timesteps=info.sampler.timesteps)


def _bare_lora(path: Path) -> bool:
    from distill.info import LORA_WEIGHTS

    return (path / LORA_WEIGHTS).is_file()


def _fuse(pipe) -> float:
    """Fuse the loaded LoRA into the weights (deployment form); returns the adapter's size in MiB."""
    network = getattr(pipe, "unet", None) or pipe.transformer
    adapter_mb = sum(p.numel() * p.element_size() for n, p in network.named_parameters() if "lora_" in n) / 2**20
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    return round(adapter_mb, 3)


def _model(pipe, path: Path, device: str, dtype: torch.dtype, compile_unet: bool) -> Teacher:
    pipe.to(device=device, dtype=dtype)
    model = Teacher(pipe, source=str(path))
    _maybe_compile(model, compile_unet)
    return model


def _foreign(path: Path, teacher_source: str, device: str, dtype: torch.dtype, compile_unet: bool,
             sampler: str | None) -> Candidate:
    """A pipeline folder or a bare LoRA file made elsewhere, sampled as `sampler` says (or as it comes, guidance 1)."""
    from diffusers import DiffusionPipeline

    from distill.info import LORA_WEIGHTS

    lora = not (path / "model_index.json").is_file()
    try:
        if lora:
            pipe = Teacher.from_pretrained(teacher_source, torch_dtype=dtype, device=device).pipe
            pipe.load_lora_weights(str(path), weight_name=LORA_WEIGHTS)
        else:
            pipe = DiffusionPipeline.from_pretrained(str(path), **{dtype_kwarg(): dtype})
    except Exception as err:  # diffusers raises many types for a broken folder
        raise ModelError(f"The student at {path} could not be loaded ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160]}); check the files or re-export it.") from err
    adapter_mb = _fuse(pipe) if lora else None
    guidance, how = 1.0, f"its own {type(pipe.scheduler).__name__}"
    if sampler:
        from evals.specs import parse_sampler

        spec = parse_sampler(sampler)
        pipe.scheduler = spec.build(pipe.scheduler.config)
        guidance, how = spec.guidance_scale, f"{spec.scheduler} (--student-sampler)"
    model = _model(pipe, path, device, dtype, compile_unet)
    what = f"{'LoRA' if lora else 'pipeline'} made elsewhere (no student.json), {how}, guidance {guidance:g}"
    scheduler = pipe.scheduler
    return Candidate(_name(path), "student", "lora" if lora else "pipeline", str(path), model, type(scheduler),
                     dict(scheduler.config), guidance, what, {"class": type(pipe).__name__, "adapter_mb": adapter_mb,
                                                              "training": _run_training(path)})


def _run_training(path: Path) -> dict | None:
    """What the run that made a student cost, from its report.json (a run folder, or its student/ inside one)."""
    import json

    for folder in (path, path.parent):
        report = folder / "report.json"
        if report.is_file() and (folder / "config.yaml").is_file():
            data = json.loads(report.read_text())
            cost = {k: data[k] for k in ("steps", "minutes", "device", "device_hours", "samples_seen", "processes")
                    if k in data}
            return _pro_rata(cost, _student_step(path))
    return None


def _student_step(path: Path) -> int | None:
    """The training step a student was saved at (student.json's "step": a run's best/ may be an early one)."""
    import json

    info = path / "student.json"
    return json.loads(info.read_text()).get("step") if info.is_file() else None


def _pro_rata(cost: dict, step: int | None) -> dict:
    """A run's cost scaled to a student saved at an earlier step: it cost those steps' share of the run."""
    steps = cost.get("steps")
    if not step or not steps or step >= steps:
        return cost
    share = step / steps
    out = {**cost, "steps": step, "pro_rata_of_steps": steps}
    out.update({k: cost[k] * share for k in ("minutes", "device_hours") if k in cost})
    if "samples_seen" in cost:
        out["samples_seen"] = round(cost["samples_seen"] * share)
    return out


def _name(path: Path) -> str:
    """A run folder's or export's name; a run's student/ or checkpoint folder is named after its run."""
    parts = [p for p in path.resolve().parts if p]
    if parts[-1] in ("student", "best") or (len(parts) > 1 and parts[-2] == "checkpoints"):
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
    if hasattr(candidate, "spec"):  # a cascade: its student's and teacher's conds
        return candidate.encode(prompts)
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
    if hasattr(candidate, "spec"):  # a cascade: the student drafts, the teacher refines
        return candidate.denoise(steps, cond, noise, generators)
    model, scheduler = candidate.model, candidate.scheduler()
    pinned = candidate.pinned(steps)
    scheduler.set_timesteps(**({"num_inference_steps": steps} if not pinned else pinned), device=model.device)
    z = (noise.to(model.device) * getattr(scheduler, "init_noise_sigma", 1.0)).to(model.dtype)  # flow: none, 1
    w = 1.0 if not candidate.cfg else candidate.guidance_scale
    w_embedding = guidance_cond(candidate, len(z))
    extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        z_in = scheduler.scale_model_input(z, t) if hasattr(scheduler, "scale_model_input") else z
        out = model.guided(z_in, model.schedule.from_model_time(t), cond, w, timestep_cond=w_embedding)
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
