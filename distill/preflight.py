"""Checks made before any compute is spent: an output folder one can write in and that has room, a precision the
device can run, the teacher's files in place, data that can be read.

`distill train` runs `check_train(cfg)` before a run folder is made or a model is loaded, `distill eval` and
`distill sample` use the folder checks before the first image is generated, so that a mistake costs seconds, not the
minutes of a teacher evaluation. Each check raises a DistillError with one sentence naming the thing and the fix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from distill.errors import ConfigError

MIN_FREE_MB = 100  # a report, a LoRA, logs and sample grids; a full student's checkpoints need more (the UNet's size)
TEACHER_WRITERS = {"teacher", "teacher_sd3"}  # recipes whose `teacher` key is where they write a teacher, not one they read


def _existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (a folder is checked without being created)."""
    return next(p for p in (path, *path.parents) if p.exists())


def check_writable(folder: str | Path, what: str) -> None:
    """A ConfigError unless `folder` (or, before it exists, its nearest existing parent) is a folder one can write
    in; nothing is created."""
    path = Path(folder).expanduser().absolute()
    existing = _existing(path)
    if not existing.is_dir():
        raise ConfigError(f"{what} {folder} cannot be made: {existing} is a file, not a folder; choose another path.")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".distill-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"{what} {folder} is not writable ({err.strerror or err} in {existing}): choose a folder "
                          "you can write to, or change its permissions.") from err


def check_free_space(folder: str | Path, need_mb: float, what: str, why: str) -> None:
    """A ConfigError when the disk that will hold `folder` has less than `need_mb` MiB free."""
    existing = _existing(Path(folder).expanduser().absolute())
    free_mb = shutil.disk_usage(existing).free / 2**20
    if free_mb < need_mb:
        raise ConfigError(f"{what} {folder} is on a disk with {free_mb:.0f} MB free, and {why} needs about "
                          f"{need_mb:.0f} MB: free some space or choose a folder on another disk.")


def check_precision(mixed_precision: str) -> None:
    """fp16 mixed precision is for GPUs: on a CPU half-precision matmuls crawl and fp16 gradients need a scaler."""
    from distill.device import process_state

    device = process_state().device
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("mixed_precision=fp16 needs a GPU, and this run would train on the CPU: use "
                          "mixed_precision=bf16 or no.")


def folder_mb(folder: str | Path) -> float:
    """MiB of the weight files under a local folder (0 for a hub id or a folder without weights)."""
    from distill.weights import WEIGHT_SUFFIXES

    path = Path(folder).expanduser()
    if not path.is_dir():
        return 0.0
    return sum(f.stat().st_size for f in path.rglob("*") if f.suffix in WEIGHT_SUFFIXES) / 2**20


def check_train(cfg) -> None:
    """Every check a training config allows before a run folder is made or a model loaded (a `TrainConfig`)."""
    from distill.start import check_report_to

    check_report_to(cfg.report_to)
    check_writable(cfg.output_dir, "output_dir")
    check_precision(cfg.mixed_precision)
    need_mb = MIN_FREE_MB
    if cfg.recipe in TEACHER_WRITERS:
        check_writable(cfg.teacher, "teacher (where the trained teacher is written)")
    else:
        from distill.teacher import check_pipeline

        check_pipeline(cfg.teacher)
        need_mb = max(need_mb, *(folder_mb(Path(cfg.teacher) / name) for name in ("unet", "transformer")))
    check_free_space(cfg.output_dir, need_mb, "output_dir",
                     "a run (its checkpoints and student can be as large as the teacher's denoiser)")
    _check_data(getattr(cfg, "data", None))


def _check_data(data) -> None:
    """The dataset loads and has the image and caption columns asked for (images are decoded when encoded)."""
    from distill.config import DataConfig

    if isinstance(data, DataConfig):
        from distill.data import load_image_dataset

        load_image_dataset(data.source, data.image_column, data.caption_column)
