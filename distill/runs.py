"""Run folders and checkpoints: numbered, descriptive, never overwritten.

A run lives in `<output_dir>/<NNN>-<recipe>-<config>/` with `config.yaml` (the resolved config), `logs/`,
`checkpoints/step-<N>/` and whatever the recipe writes; a run with stages has `<stage>/checkpoints/` instead.
A checkpoint holds `modules/<name>/` (each named module in its natural format), accelerate's optimizer and RNG
states, `student/` (the shippable student, where the method has one), `trainer_state.json` (step, minutes) and,
written last, the marker `checkpoint.complete`: a checkpoint is written into `step-N.partial/`, fsynced, marked and
renamed into place, and one without its marker is never loaded. A kill at any moment leaves the previous one good.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from distill.errors import ConfigError, ModelError
from distill.files import apply_umask
from distill.info import INFO_FILE

_RUN = re.compile(r"^(\d{3,})-(.+)$")
_CKPT = re.compile(r"^step-(\d+)$")
MARKER = "checkpoint.complete"  # written last: its presence means every other file of the checkpoint is on disk
# Keys a resume may change without changing what is trained: where and how often things are written, threads, stops.
RESUME_FREE_KEYS = ("resume_from_checkpoint", "allow_config_change", "max_train_minutes", "checkpointing_steps",
                    "checkpoints_total_limit", "num_threads", "report_to", "output_dir", "sample.", "probe.", "data.num_workers")


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
    """Create the next numbered folder, e.g. runs/003-lcm-emoji_sd_lora. The number is taken under a file lock, so
    two runs started at once (any names) never share it."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".run-numbers.lock"):
        numbers = [int(m.group(1)) for p in root.iterdir() if (m := _RUN.match(p.name))]
        path = root / f"{max(numbers, default=0) + 1:03d}-{name}"
        path.mkdir()
    return path


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with their marker) of one run or stage folder, oldest first."""
    return [p for _, p in sorted(_step_folders(run_dir)) if (p / MARKER).is_file()]


def incomplete_checkpoints(run_dir: str | Path) -> list[Path]:
    """step-N folders without the marker (written by an older distill, or damaged by hand): never loaded."""
    return [p for _, p in sorted(_step_folders(run_dir)) if not (p / MARKER).is_file()]


def _step_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]


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
    if path.is_dir() and (unmarked := incomplete_checkpoints(path)):
        raise ConfigError(
            f"{path} has checkpoints but none marked complete ({unmarked[-1].name} has no {MARKER}): a save was cut "
            f"off, or an older distill wrote them; if {unmarked[-1]} holds trainer_state.json it is whole, and "
            f"`touch {unmarked[-1] / MARKER}` lets the run go on from it."
        )
    raise ConfigError(
        f"resume_from_checkpoint={spec} is neither a checkpoint nor a run folder with checkpoints: "
        "pass a path under runs/ or `latest`."
    )


def save_checkpoint(accelerator, run_dir: str | Path, step: int, state: dict, total_limit: int | None,
                    write=None) -> Path:
    """Write accelerate's state (and `write(folder)`'s files) + trainer_state.json into `step-N.partial/`, fsync it,
    mark it complete, rename it into place; only then prune the oldest complete ones beyond the limit."""
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
        apply_umask(partial)
        _fsync_tree(partial)
        _write_synced(partial / MARKER, f"step {step}\n")
        if final.exists():  # a re-save of the same step: set the old one aside, never delete it before the new is in
            final.rename(final.with_name(final.name + ".old"))
        partial.rename(final)
        _fsync_dir(final.parent)
        shutil.rmtree(final.with_name(final.name + ".old"), ignore_errors=True)
        if total_limit:
            for old in list_checkpoints(run_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def warn_incomplete(run_dir: str | Path, chosen: Path | None) -> None:
    """A warning that names each unmarked checkpoint newer than the one a resume will use."""
    newest = int(_CKPT.match(chosen.name).group(1)) if chosen is not None else -1
    for path in incomplete_checkpoints(run_dir):
        if int(_CKPT.match(path.name).group(1)) > newest:
            warnings.warn(f"{path} has no {MARKER} marker (a save that did not finish): it is skipped; resuming from "
                          f"{chosen or 'the start'} instead.", stacklevel=2)


def config_changes(saved: dict, now: dict, defaults: dict | None = None) -> list[str]:
    """`key: old -> new` for every training setting that differs between a run's config and the one resuming it.

    A key the saved config lacks was added to the toolkit after the run began; the run trained as its default
    (`defaults`: new keys default to the old behaviour), so only a value other than that default is a change."""
    old, new = _flatten(saved), _flatten(now)
    for key, value in _flatten(defaults or {}).items():
        old.setdefault(key, value)
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if old.get(k) != new.get(k) and not k.startswith(RESUME_FREE_KEYS)]


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
    if (run_dir / INFO_FILE).is_file():  # a student folder itself (student/, best/, a checkpoint's student/)
        return run_dir
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
    candidates = [Path(text), run_dir / "checkpoints" / text, run_dir / text]  # run_dir / "best": the probe's best
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
