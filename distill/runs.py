"""Run folders and checkpoints: numbered, descriptive, never overwritten.

A run lives in `<output_dir>/<NNN>-<recipe>-<config>/` with `config.yaml` (the resolved config), `logs/`,
`checkpoints/step-<N>/` and whatever the recipe writes; a run with stages has `<stage>/checkpoints/` instead.
A checkpoint holds `modules/<name>/` (each named module in its natural format), accelerate's optimizer and RNG
states, `student/` (the shippable student, where the method has one) and `trainer_state.json` (step, minutes).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from distill.errors import ConfigError, ModelError
from distill.info import INFO_FILE

_RUN = re.compile(r"^(\d{3,})-(.+)$")
_CKPT = re.compile(r"^step-(\d+)$")


def run_name(recipe: str, config_name: str) -> str:
    return f"{recipe}-{config_name}" if config_name != recipe else recipe


def list_runs(output_dir: str | Path, name: str | None = None) -> list[Path]:
    """Run folders under output_dir, oldest first; only those called `name` when given."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    runs = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _RUN.match(p.name))
            and (name is None or m.group(2) == name)]
    return [p for _, p in sorted(runs)]


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """Create the next numbered folder, e.g. runs/003-lcm-emoji_sd_lora."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := _RUN.match(p.name))]
    path = root / f"{max(numbers, default=0) + 1:03d}-{name}"
    path.mkdir()
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def all_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run and of its stages (run/checkpoints, run/<stage>/checkpoints), oldest first."""
    run_dir = Path(run_dir)
    found = [c for folder in [run_dir, *sorted(p for p in run_dir.iterdir() if p.is_dir())]
             for c in list_checkpoints(folder)]
    return sorted(found, key=lambda c: c.stat().st_mtime)


def read_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


def resolve_resume(spec: str | None, output_dir: str | Path, name: str) -> tuple[Path | None, Path | None]:
    """`latest`, a run folder or a checkpoint folder -> (run_dir, checkpoint_dir); (None, None) for a fresh run."""
    if not spec:
        return None, None
    if spec == "latest":
        for run in reversed(list_runs(output_dir, name)):
            if ckpts := all_checkpoints(run):
                return run, ckpts[-1]
        return None, None  # nothing to resume: start fresh, as `latest` on a first run should
    path = Path(spec)
    if (path / "trainer_state.json").is_file():
        return path.parent.parent, path
    if path.is_dir() and (ckpts := all_checkpoints(path)):
        return path, ckpts[-1]
    raise ConfigError(
        f"resume_from_checkpoint={spec} is neither a checkpoint nor a run folder with checkpoints: "
        "pass a path under runs/ or `latest`."
    )


def save_checkpoint(accelerator, run_dir: str | Path, step: int, state: dict, total_limit: int | None,
                    write=None) -> Path:
    """Write accelerate's state (and `write(folder)`'s files) + trainer_state.json into a partial folder, rename it
    into place, then prune the oldest beyond the limit."""
    final = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    if accelerator.is_main_process:
        if write is not None:
            write(partial)
        (partial / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        if total_limit:
            for old in list_checkpoints(run_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def write_config(cfg, run_dir: str | Path) -> Path:
    """The resolved config, as the run used it, beside its outputs."""
    from distill.config import save_config

    return save_config(cfg, Path(run_dir) / "config.yaml")


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
    found = [c / "student" for c in list_checkpoints(run_dir) if (c / "student" / INFO_FILE).is_file()]
    if not found:
        raise ModelError(
            f"{run_dir} holds no student (no student/ folder and no checkpoint); train it first or pass "
            "the run folder of a finished or checkpointed distillation run."
        )
    return found[-1]


def _checkpoint_folder(run_dir: Path, checkpoint) -> Path:
    text = str(checkpoint)
    candidates = [Path(text), run_dir / "checkpoints" / text]
    if text.isdigit():
        candidates.append(run_dir / "checkpoints" / f"step-{int(text):07d}")
    for path in candidates:
        for folder in (path / "student", path):  # a checkpoint, or its student/ folder
            if (folder / INFO_FILE).is_file():
                return folder
    names = ", ".join(c.name for c in list_checkpoints(run_dir)) or "none"
    raise ModelError(
        f"Checkpoint {text} is not a student checkpoint of {run_dir} (available: {names}); "
        "pass one of those names, a step number, or a checkpoint folder."
    )
