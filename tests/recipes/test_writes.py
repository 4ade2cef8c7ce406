"""Nothing is written outside the run folder: a training run in a subprocess whose home, cache and working folder
are empty temporary folders leaves files only under its output_dir."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.config import save_config
from tests.recipes import test_lcm

CLI = str(Path(__file__).resolve().parents[2] / "cli.py")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_training_run_writes_only_inside_its_output_folder(tiny_sd_path, tmp_path):
    home, cwd, out, scratch = tmp_path / "home", tmp_path / "cwd", tmp_path / "out", tmp_path / "tmp"
    for folder in (home, cwd, scratch):
        folder.mkdir()
    cfg = test_lcm._cfg(out, tiny_sd_path, "lora", max_train_steps=2, checkpointing_steps=1, report_to="tensorboard",
                        sample=dict(every_steps=1))
    config = save_config(cfg, tmp_path / "config.yaml")
    teacher_before = _files(Path(tiny_sd_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_", "TORCH_HOME"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), TMPDIR=str(scratch), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, CLI, "train", str(config)], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _files(home) == [] and _files(cwd) == []  # no cache, no stray file where the command was run
    assert _files(scratch) == []  # temporary files (datasets' Arrow copy of a local parquet) are gone
    assert _files(Path(tiny_sd_path)) == teacher_before  # the teacher is only read
    written = _files(out)
    assert written and all(p.is_relative_to(out / "runs") for p in written)
