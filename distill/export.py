"""Export a trained consistency student in the formats plain diffusers loads.

    distill export RUN_DIR --out DIR [--checkpoint CKPT]

- LoRA student -> DIR/pytorch_lora_weights.safetensors (diffusers LoRA format, every key holds "lora"),
  which `StableDiffusionPipeline` / `StableDiffusionXLPipeline.load_lora_weights` read and `fuse_lora` fuses,
  plus DIR/student.json (teacher, scheduler, steps, guidance) and DIR/README.md (how to load it).
- full student -> DIR is a complete pipeline folder: the teacher's VAE, text encoder(s) and tokenizer(s),
  the student UNet, and an LCMScheduler built from the teacher's scheduler config; plus student.json and README.md.

A run folder holds its final student in `student/`, and every checkpoint holds one in the same layout
(`checkpoints/step-NNNNNNN/`), so any of them can be exported.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from distill import runs
from distill.errors import ConfigError, ModelError
from distill.student import INFO_FILE, LORA_WEIGHTS, StudentInfo


def student_folder(run_dir: str | Path, checkpoint: str | Path | int | None = None) -> Path:
    """The folder holding a run's student: `checkpoint` (a path, a name under checkpoints/ or a step number),
    else the final `student/`, else the newest checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelError(f"Run folder {run_dir} does not exist; pass a folder under runs/ (see `distill ls`).")
    if checkpoint is not None:
        return _checkpoint_folder(run_dir, checkpoint)
    if (run_dir / "student" / INFO_FILE).is_file():
        return run_dir / "student"
    found = [c for c in runs.list_checkpoints(run_dir) if (c / INFO_FILE).is_file()]
    if not found:
        raise ModelError(
            f"{run_dir} holds no student (no student/ folder and no checkpoint); train it first or pass "
            "the run folder of a finished or checkpointed LCM run."
        )
    return found[-1]


def _checkpoint_folder(run_dir: Path, checkpoint) -> Path:
    text = str(checkpoint)
    candidates = [Path(text), run_dir / "checkpoints" / text]
    if text.isdigit():
        candidates.append(run_dir / "checkpoints" / f"step-{int(text):07d}")
    for path in candidates:
        if (path / INFO_FILE).is_file():
            return path
    names = ", ".join(c.name for c in runs.list_checkpoints(run_dir)) or "none"
    raise ModelError(
        f"Checkpoint {text} is not a student checkpoint of {run_dir} (available: {names}); "
        "pass one of those names, a step number, or a checkpoint folder."
    )


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | int | None = None) -> Path:
    """Export the run's student (see the module docstring) into `out_dir`, which must be new or empty."""
    source = student_folder(run_dir, checkpoint)
    info = StudentInfo.load(source)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"Export folder {out} already exists and is not empty; pass a new --out folder.")
    out.mkdir(parents=True, exist_ok=True)
    try:
        if info.kind == "lora":
            _export_lora(source, out)
        else:
            _export_full(source, out, info)
    except Exception:
        shutil.rmtree(out, ignore_errors=True)  # no half-written export that looks finished
        raise
    info.save(out)
    (out / "README.md").write_text(_readme(info, out))
    return out


def _export_lora(source: Path, out: Path) -> None:
    from safetensors import safe_open

    weights = source / LORA_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own error types for missing or damaged files
        raise ModelError(
            f"The LoRA weights {weights} are missing or corrupt ({err}); export another checkpoint."
        ) from err
    bad = [k for k in keys if "lora" not in k]
    if not keys or bad:
        raise ModelError(
            f"{weights} is not a diffusers LoRA file (e.g. key {bad[:1] or 'none'}); export another checkpoint."
        )
    shutil.copyfile(weights, out / LORA_WEIGHTS)


def _export_full(source: Path, out: Path, info: StudentInfo) -> None:
    from diffusers import UNet2DConditionModel

    from distill.sampling import lcm_scheduler
    from distill.teacher import Teacher

    try:
        unet = UNet2DConditionModel.from_pretrained(str(source / "unet"))
    except Exception as err:  # OSError, ValueError, SafetensorError, ...
        raise ModelError(f"The student UNet in {source / 'unet'} is missing or corrupt ({err}); "
                         "export another checkpoint.") from err
    pipe = Teacher.from_pretrained(info.teacher).pipe
    pipe.unet = unet
    pipe.scheduler = lcm_scheduler(pipe.scheduler.config, info)
    pipe.save_pretrained(str(out), safe_serialization=True)


def _readme(info: StudentInfo, out: Path) -> str:
    cls = "StableDiffusionXLPipeline" if info.teacher_kind == "sdxl" else "StableDiffusionPipeline"
    if info.kind == "lora":
        load = (
            f'pipe = {cls}.from_pretrained("{info.teacher}")\n'
            "pipe.scheduler = LCMScheduler.from_config(\n"
            f"    pipe.scheduler.config, original_inference_steps={info.num_ddim_timesteps}, "
            f"timestep_scaling={info.timestep_scaling})\n"
            f'pipe.load_lora_weights("{out}")\n'
            "pipe.fuse_lora()  # optional: merge the adapters for speed\n"
        )
        what = (f"An LCM-LoRA for the teacher `{info.teacher}` (guidance omega in [{info.w_min}, {info.w_max}] "
                "baked in).")
    else:
        load = f'pipe = {cls}.from_pretrained("{out}")  # scheduler: LCMScheduler\n'
        what = (f"A latent consistency model distilled from `{info.teacher}`, guidance omega in "
                f"[{info.w_min}, {info.w_max}] as an input (guidance_scale = omega + 1).")
    return (
        f"# Consistency student ({info.kind})\n\n{what}\nTrained {info.step} steps with distill's `lcm` recipe.\n\n"
        f"```python\nfrom diffusers import LCMScheduler, {cls}\n\n{load}"
        f'image = pipe("a prompt", num_inference_steps=4, guidance_scale={info.guidance_scale}).images[0]\n```\n\n'
        "Use 1-8 steps with LCMScheduler. `guidance_scale` matches the teacher at "
        f"{info.teacher_guidance_scale} when it is {info.guidance_scale}"
        + (" (a LoRA student has no guidance input: keep it at 1-2; above 1 it adds real CFG and doubles the cost)."
           if info.kind == "lora" else ".")
        + "\n"
    )
