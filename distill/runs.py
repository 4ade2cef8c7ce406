"""Run folders and checkpoints: numbered, descriptive, never overwritten.

A run lives in `<output_dir>/<NNN>-<recipe>-<config>/` with `config.yaml` (the resolved config),
`checkpoints/step-<N>/` (accelerate state + `trainer_state.json`) and whatever the recipe writes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from distill.errors import ConfigError

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


def save_checkpoint(accelerator, run_dir: str | Path, step: int, state: dict, total_limit: int | None) -> Path:
    """Write accelerate's state + trainer_state.json atomically, then prune the oldest beyond the limit."""
    final = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    if accelerator.is_main_process:
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
