"""Export a trained student in the formats plain diffusers loads, with the sampler it needs and a model card.

    distill export RUN_DIR --out DIR [--checkpoint CKPT]

- LoRA student -> DIR/pytorch_lora_weights.safetensors (diffusers LoRA format, every key holds "lora"),
  which the teacher pipeline's `load_lora_weights` reads and `fuse_lora` fuses, plus DIR/student.json.
- full student -> DIR is a complete pipeline folder: the teacher's VAE, text encoder(s) and tokenizer(s), the
  student network, and the scheduler its sampler spec names, built from the teacher's scheduler config.
- Both get DIR/README.md: a model card (base model, tags, the sampler to use, how to load it, the training
  numbers of the run when there are any), as diffusers' training scripts write.

A run folder holds its final student in `student/`, and every checkpoint holds one in `checkpoints/step-N/student/`,
so any of them can be exported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distill.errors import ConfigError, ModelError
from distill.files import apply_umask
from distill.info import LORA_WEIGHTS, StudentInfo
from distill.runs import student_folder


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
    numbers = _training_numbers(Path(run_dir))
    info.training = info.training or numbers or None  # what making it cost travels with the export
    info.save(out)
    (out / "README.md").write_text(model_card(info, out, numbers))
    apply_umask(out)
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
    from distill.teacher import Teacher

    pipe = Teacher.from_pretrained(info.teacher).pipe
    try:
        setattr(pipe, info.network, type(getattr(pipe, info.network)).from_pretrained(str(source / info.weights)))
    except Exception as err:  # OSError, ValueError, SafetensorError, ...
        raise ModelError(f"The student network in {source / info.weights} is missing or corrupt ({err}); "
                         "export another checkpoint.") from err
    pipe.scheduler = info.sampler.build(pipe.scheduler.config)
    pipe.save_pretrained(str(out), safe_serialization=True)


def _training_numbers(run_dir: Path) -> dict:
    path = run_dir / "report.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    keys = ("steps", "minutes", "device", "device_hours", "samples_seen", "processes", "samples_per_second",
            "peak_memory_mb")
    return {k: report[k] for k in keys if k in report}


def model_card(info: StudentInfo, out: Path, numbers: dict | None = None) -> str:
    """README.md for an export: metadata the hubs read, what it is, the sampler, how to load it, what was measured."""
    spec, cls = info.sampler, info.pipeline_class
    settings = ", ".join(f"{k}={v!r}" for k, v in spec.config.items())
    nulls = "".join(f", {name}=None" for name in _null_components(info.teacher if info.kind == "lora" else out))
    if info.kind == "lora":
        load = (f'pipe = {cls}.from_pretrained("{info.teacher}"{nulls})\n'
                f"pipe.scheduler = {spec.scheduler}.from_config(pipe.scheduler.config{', ' if settings else ''}"
                f"{settings})\n"
                f'pipe.load_lora_weights("{out}")\npipe.fuse_lora()  # optional: merge the adapters for speed\n')
    else:
        load = f'pipe = {cls}.from_pretrained("{out}"{nulls})  # its scheduler is {spec.scheduler}\n'
    steps = spec.steps[len(spec.steps) // 2] if spec.steps else 4
    extra = "".join(f", {k}={v!r}" for k, v in {**info.pipeline_kwargs,
                                                  **spec.pinned(steps)}.items())
    call = (f'image = pipe("a prompt", num_inference_steps={steps}, guidance_scale={spec.guidance_scale:g}{extra})'
            '.images[0]\n')
    lines = ["---", f"base_model: {info.teacher}", "library_name: diffusers", "tags:",
             *[f"- {t}" for t in ("distill", info.method, "lora" if info.kind == "lora" else "text-to-image",
                                  "few-step")], "---", "",
             f"# {info.method.upper()} student ({info.kind}) of `{info.teacher}`", "",
             f"Distilled with distill's `{info.method}` recipe for {info.step} steps from the teacher "
             f"(`{cls}`, {info.prediction_type}).", "",
             "## Sampler", "",
             f"- scheduler: `{spec.scheduler}` built from the teacher's scheduler config with {settings or 'no changes'}",
             f"- steps: {', '.join(map(str, spec.steps))}; guidance_scale: {spec.guidance_scale:g} (it imitates the "
             f"teacher at guidance {info.teacher_guidance_scale:g})",
             *([f"- timesteps per step count (tuned; passed to the pipeline): {spec.timesteps}"] if spec.timesteps else []),
             *([f"- sigmas per step count (passed to the pipeline, before the scheduler's shift): {spec.sigmas}"]
               if spec.sigmas else []),
             *([f"- discriminator features: {info.feature_network}"] if info.feature_network else []),
             "", "```python", f"from diffusers import {spec.scheduler}, {cls}", "", load + call + "```"]
    if numbers:
        lines += ["", "## Training", "", *[f"- {k}: {v}" for k, v in numbers.items()]]
    if info.details:
        lines += ["", "## Method settings", "", *[f"- {k}: {v}" for k, v in info.details.items()]]
    return "\n".join(lines) + "\n"


def _null_components(pipeline: str | Path) -> list[str]:
    """Components a local pipeline folder saved as null (an SD3 without T5): from_pretrained must be given None."""
    index = Path(pipeline) / "model_index.json"
    if not index.is_file():
        return []
    config = json.loads(index.read_text())
    return [k for k, v in config.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None
            and k not in ("safety_checker", "feature_extractor", "image_encoder")]
