"""Sampling a consistency student: in the toolkit (training grids) and with plain diffusers (`distill sample`).

`lcm_sample` is multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1) written
with the toolkit's own pieces: z_T ~ N(0, I); at each t_i: x0 = f(z_{t_i}, t_i); z_{t_{i+1}} =
alpha_{t_{i+1}} x0 + sigma_{t_{i+1}} eps. It visits the timesteps LCMScheduler visits and draws its noise
in the same order from the same generator, so it gives what a diffusers pipeline with LCMScheduler gives.

`sample_grid` loads a run folder or an export with plain diffusers only (a LoRA into the teacher pipeline
with `load_lora_weights`, a full student as a pipeline folder), as a user would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from distill.consistency import consistency_output
from distill.errors import ConfigError, ModelError
from distill.families import family_class
from distill.images import check_image_path, save_grid
from distill.info import INFO_FILE, LORA_WEIGHTS, StudentInfo
from distill.runs import student_folder
from distill.teacher import Cond, Teacher, check_pipeline, null_components
from distill.weights import check_components, check_student_weights


@torch.no_grad()
def lcm_sample(
    student, teacher: Teacher, cond: Cond, steps: int, generator: torch.Generator, guidance_scale: float = 1.0,
    original_steps: int = 50, timestep_scaling: float = 10.0, resolution: int | None = None,
    times: dict | None = None,
) -> Tensor:
    """Images [B, 3, H, W] in about [-1, 1] from a `distill.student.Student` for the B conditions in `cond`.

    A student with a guidance input (full LCM) gets omega = guidance_scale - 1 as that input; one without (a LoRA)
    gets classifier-free guidance when guidance_scale != 1, as a pipeline does. times: {steps: the schedule times
    to visit} for a student trained on its own grid (ADD) or a pinned schedule (step counts it does not name: the
    schedule's consistency sampler's).
    """
    device, batch = teacher.device, len(cond)
    z = torch.randn((batch, *teacher.latent_shape(resolution)), generator=generator).to(device)
    timesteps = times[steps] if times and steps in times else teacher.schedule.consistency_times(steps, original_steps)
    for i, t in enumerate(timesteps.tolist()):
        t_batch = torch.full((batch,), t, device=device, dtype=timesteps.dtype)
        if student.guidance_dim:  # a full student may be held in another dtype than the teacher
            dtype = student.network.dtype
            out = student(z.to(dtype), t_batch, cond.to(dtype=dtype), torch.full((batch,), guidance_scale - 1.0))
        else:
            out = teacher.guided(z, t_batch, cond, guidance_scale, network=student.network)
        x0, _ = teacher.to_x0_eps(out.float(), z.float(), t_batch)
        z = consistency_output(z.float(), x0, t_batch, timestep_scaling=timestep_scaling, schedule=teacher.schedule)
        if i + 1 < len(timesteps):
            noise = torch.randn(z.shape, generator=generator).to(device)
            z = teacher.add_noise(z, noise, torch.full((batch,), timesteps[i + 1].item(), device=device))
        z = z.to(teacher.dtype)
    return teacher.decode_latents(z).float().cpu()


def student_rows(unet, teacher: Teacher, prompts: list[str], steps: Sequence[int], seed: int, **kwargs) -> list[list]:
    """PIL rows (one per prompt, one column per step count) from `lcm_sample`, each count from `seed`."""
    from distill.images import to_pil

    cond = teacher.encode_prompt(prompts, kwargs.get("resolution"))
    columns = [to_pil(lcm_sample(unet, teacher, cond, s, torch.Generator().manual_seed(seed), **kwargs)) for s in steps]
    return [list(row) for row in zip(*columns)]


# -------------------------------------------------------------------------------------- plain diffusers
def load_student_pipeline(source: str | Path, teacher_pipe=None, device: str | torch.device | None = None):
    """(pipeline with the student's own scheduler, StudentInfo) from a run folder, a LoRA export or a pipeline export.

    `teacher_pipe`: an already loaded teacher pipeline to build on (for LoRA and run folders); it is changed
    in place. Loads through plain diffusers: `load_lora_weights`, `UNet2DConditionModel.from_pretrained`,
    `DiffusionPipeline.from_pretrained`. device: where to run (default: CUDA if there is one, else CPU).
    """
    from diffusers import DiffusionPipeline

    source = Path(source)
    if (source / "model_index.json").is_file():
        info = StudentInfo.load(source)
        return DiffusionPipeline.from_pretrained(str(source), **_no_safety(source)).to(_device(device)), info
    folder = source if (source / INFO_FILE).is_file() else student_folder(source)
    info = StudentInfo.load(folder)
    pipe = teacher_pipe
    if pipe is None:
        pipe = Teacher.from_pretrained(info.teacher, device=_device(device)).pipe
    if info.kind == "lora":
        try:
            pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS)
        except (OSError, ValueError, RuntimeError) as err:  # a LoRA that is damaged or made for another model
            raise ModelError(f"The LoRA in {folder} could not be loaded into {info.teacher} "
                             f"({str(err).strip().splitlines()[0][:160]}); re-export it, or load it with the "
                             "model it was trained on.") from err
    else:
        network = getattr(pipe, info.network)
        setattr(pipe, info.network, type(network).from_pretrained(str(folder / info.weights)).to(pipe.device,
                                                                                                  network.dtype))
    pipe.scheduler = info.sampler.build(pipe.scheduler.config)
    return pipe, info


def _device(device) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _no_safety(folder: Path) -> dict:
    """from_pretrained's keywords for a pipeline folder: no safety checker, None for its null components."""
    return null_components(json.loads((folder / "model_index.json").read_text()))


def _images(pipe, prompts, steps, seed, guidance_scale, pinned: dict | None = None) -> list:
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(seed)  # SD3's pipeline draws its consistency sampler's re-noising from the global generator
    generator = torch.Generator().manual_seed(seed)
    extra = family_class(type(pipe), "the pipeline")(pipe, "the pipeline").call_kwargs()
    extra.update(pinned or {})  # a student's own sigmas or tuned timesteps (its sampler spec), not the default spacing
    return pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                **extra).images


def sample_grid(
    source: str | Path, prompts: Sequence[str], steps: int | Sequence[int], seed: int, out_path: str | Path,
    teacher_steps: int | None = None, guidance_scale: float | None = None, device: str | torch.device | None = None,
) -> Path:
    """Write a PNG grid: one row per prompt, one column per student step count, then (with `teacher_steps`)
    the teacher with its own scheduler at that many steps. Every column starts from the same seed. Rows are labelled
    with their prompt, columns with model and steps ("student@2", "teacher@50").

    source: a run folder, or an export (LoRA folder or pipeline folder). guidance_scale: what the student
    pipeline is called with (default: the one recorded at training, 1 + mid omega for a full student,
    1.0 for a LoRA, whose guidance is baked in); the teacher column uses the teacher guidance the student
    imitates. device: default CUDA if there is one, else CPU.
    """
    from diffusers import DiffusionPipeline

    prompts = list(prompts)
    if not prompts:
        raise ConfigError("sample_grid needs at least one prompt; pass prompts or a prompt file.")
    steps = [steps] if isinstance(steps, int) else list(steps)
    source = Path(source)
    info = check_sample(source, steps, out_path, teacher_steps)
    teacher_pipe = teacher_column = None
    if teacher_steps:
        teacher_pipe = Teacher.from_pretrained(info.teacher, device=_device(device)).pipe
        teacher_column = _images(teacher_pipe, prompts, teacher_steps, seed, info.teacher_guidance_scale)
        if (source / "model_index.json").is_file():
            teacher_pipe = None  # a pipeline export brings its own components
    name = "student"
    if (source / "model_index.json").is_file() and not (source / INFO_FILE).is_file():
        # A plain pipeline (a teacher): its own scheduler; diffusers' default guidance unless given.
        pipe = DiffusionPipeline.from_pretrained(str(source), **_no_safety(source)).to(_device(device))
        scale, name = (7.5 if guidance_scale is None else guidance_scale), "pipeline"
    else:
        pipe, info = load_student_pipeline(source, teacher_pipe, device)
        scale = info.guidance_scale if guidance_scale is None else guidance_scale
    columns = [_images(pipe, prompts, s, seed, scale, info.sampler.pinned(s) if info is not None else None)
               for s in steps]
    names = [f"{name}@{s}" for s in steps]
    if teacher_column is not None:
        columns.append(teacher_column)
        names.append(f"teacher@{teacher_steps}")
    return save_grid([list(row) for row in zip(*columns)], Path(out_path), labels=(prompts, names))


def check_sample(source: Path, steps: list[int], out_path: str | Path, teacher_steps: int | None) -> StudentInfo | None:
    """Everything `sample_grid` can check before a model loads: where the grid goes, the source's files (and its
    teacher's), the step counts against the student's sampler. Returns the student's info (None: a plain pipeline)."""
    check_image_path(out_path, "--out")
    if teacher_steps is not None and teacher_steps < 0:
        raise ConfigError(f"--teacher-steps {teacher_steps} is negative; give a step count such as 50 (0: no column).")
    if not source.exists():
        raise ModelError(f"{source} does not exist; pass a run folder or an exported student.")
    if (source / "model_index.json").is_file():
        check_components(source, json.loads((source / "model_index.json").read_text()), "The pipeline")
        if not (source / INFO_FILE).is_file():
            if teacher_steps:
                raise ConfigError(f"{source} is a plain pipeline, not a student: drop --teacher-steps (it adds the "
                                  "teacher a student was made from).")
            return None
        info = StudentInfo.load(source)
    else:
        folder = student_info_folder(source)
        info = StudentInfo.load(folder)
        check_pipeline(info.teacher)
        check_student_weights(folder, info, info.teacher, "point its student.json's teacher at that model")
    info.sampler.check_steps(steps, f"The student {source}")
    return info


def student_info_folder(source: Path) -> Path:
    if (source / INFO_FILE).is_file():
        return source
    return student_folder(source)
