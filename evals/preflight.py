"""What `distill eval` checks before it generates anything: the report folder, the teacher's files, each student's
files against that teacher, its sampler against --steps, the prompt file.

The teacher and its sampler sweep run before any student is loaded (minutes at the default N), so everything that
can be found out without generating an image is found out here, in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.errors import ConfigError
from distill.info import INFO_FILE, LORA_WEIGHTS, SamplerSpec, StudentInfo
from evals import models
from evals.progress import log
from evals.settings import EvalSettings

REPORT_MB = 100  # report.json/.md/.html, plots and sample grids take a few MB; leave room
FIX = "pass the model it was trained on as --teacher"


def check_eval(settings: EvalSettings) -> None:
    """A DistillError naming the first input the eval could not finish with."""
    from distill.data import load_prompts
    from distill.teacher import check_pipeline

    check_out(settings.out, settings.overwrite)
    index, _ = check_pipeline(settings.teacher)
    check_baselines(settings, index)
    for source in settings.students:
        check_student(source, settings)
    if settings.prompts:
        load_prompts(settings.prompts)


def check_baselines(settings: EvalSettings, index: dict) -> None:
    """A `grid=N` baseline pins flow sigmas: refused, before the teacher's long generation, for a VP teacher."""
    from distill.schedule import is_flow
    from evals.specs import parse_baseline

    scheduler = (index.get("scheduler") or [None, None])[1] or "?"
    for spec in settings.baselines:
        if "grid" in parse_baseline(spec).config and not is_flow(scheduler):
            raise ConfigError(f"--baseline {spec}: grid=N pins the sigmas of a flow-matching teacher, and "
                              f"{settings.teacher} samples with {scheduler}; drop grid= for this teacher.")


def check_out(out: str, overwrite: bool) -> None:
    """The report folder can be written, has room, and holds no earlier report unless --overwrite."""
    from distill.preflight import check_free_space, check_writable

    check_writable(out, "--out")
    if (Path(out) / "report.json").is_file() and not overwrite:
        raise ConfigError(f"--out {out} already holds a report (report.json): pass --overwrite to replace it, or "
                          "choose another --out.")
    check_free_space(out, REPORT_MB, "--out", "the report (tables, plots and sample grids)")


def check_student(source: str, settings: EvalSettings) -> None:
    """The student's files are whole and fit --teacher, and its sampler can take at least one of --steps."""
    from distill.runs import student_folder
    from distill.weights import check_components, check_lora, check_student_weights

    models.check_student(source)
    path = Path(source)
    if (path / "model_index.json").is_file():
        check_components(path, json.loads((path / "model_index.json").read_text()), "The student pipeline")
    elif (path / INFO_FILE).is_file() or not (path / LORA_WEIGHTS).is_file():
        folder = path if (path / INFO_FILE).is_file() else student_folder(path)
        check_student_weights(folder, StudentInfo.load(folder), settings.teacher, FIX)
    else:
        check_lora(path / LORA_WEIGHTS, settings.teacher, FIX)
    _check_steps(source, student_sampler(path, settings.student_sampler), settings)


def student_sampler(path: Path, given: str | None) -> SamplerSpec:
    """How the eval will sample the student: its student.json's sampler, --student-sampler for one made elsewhere,
    or the scheduler its pipeline folder brings (the teacher's, for a bare LoRA: no step limit)."""
    from distill.runs import student_folder
    from evals.specs import parse_sampler

    if (path / INFO_FILE).is_file():
        return StudentInfo.load(path).sampler
    if not (path / "model_index.json").is_file() and not (path / LORA_WEIGHTS).is_file():
        return StudentInfo.load(student_folder(path)).sampler
    if given:
        return parse_sampler(given)
    config = path / "scheduler" / "scheduler_config.json"
    own = json.loads(config.read_text()) if config.is_file() else {}
    return SamplerSpec(own.get("_class_name", ""), own)


def _check_steps(source: str, sampler: SamplerSpec, settings: EvalSettings) -> None:
    """Refuse a student none of whose --steps (or whose cascade's draft steps) its sampler can take; say now which
    of --steps it will skip."""
    from evals.cascade import parse_cascade

    limit = sampler.max_steps
    if limit is None:
        return
    over = [k for k in settings.steps if k > limit]
    if len(over) == len(settings.steps):
        sampler.check_steps(settings.steps, f"The student {source}")
    if over:
        log(f"{source}: its sampler walks N = {limit} timesteps, so {over} steps are skipped for it")
    for text in settings.cascades:
        spec = parse_cascade(text)
        if Path(spec.student).resolve() == Path(source).resolve():
            sampler.check_steps([spec.k], f"--cascade {text} drafts with {source}, which")
