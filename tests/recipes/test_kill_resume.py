"""Exact resume after `kill -9` at an arbitrary moment, for real: `distill train` in a subprocess is killed once
its first complete checkpoint exists (at a random moment after it: mid-step, mid-save or between steps), resumed
with `distill train --resume <run>`, and must end with the same bytes as an uninterrupted run of the same config.
"""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distill.config import load_config, save_config
from distill.runs import MARKER, list_runs
from tests.recipes import test_add, test_lcm, test_teacher
from recipes import teacher as teacher_recipe

CLI = [sys.executable, str(Path(__file__).resolve().parents[2] / "cli.py")]
STEPS = 12


def _yaml(cfg, tmp_path) -> Path:
    return save_config(cfg, tmp_path / "config.yaml")


def _straight(config: Path, out: Path) -> Path:
    done = subprocess.run([*CLI, "train", str(config), f"output_dir={out}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return list_runs(out)[0]


def _complete_checkpoint(out: Path) -> bool:
    """A marked checkpoint exists (looked for without walking folders the run is renaming at that moment)."""
    try:
        return any(out.glob(f"*/checkpoints/step-???????/{MARKER}")) or any(
            out.glob(f"*/*/checkpoints/step-???????/{MARKER}"))  # a run with stages (the teacher's vae/, unet/)
    except OSError:
        return False


def _killed_then_resumed(config: Path, out: Path, seed: int) -> Path:
    proc = subprocess.Popen([*CLI, "train", str(config), f"output_dir={out}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not _complete_checkpoint(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 0.5))  # an arbitrary moment after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {proc.stderr.read()[-2000:]}"
    run = list_runs(out)[0]
    done = subprocess.run([*CLI, "train", "--resume", str(run)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def _same_bytes(a: Path, b: Path, pattern: str) -> None:
    files = sorted(p.relative_to(a) for p in a.glob(pattern))
    assert files, f"no {pattern} under {a}"
    for rel in files:
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x), rel


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_lcm_killed_at_any_moment_resumes_to_the_same_weights(tiny_sd_path, tmp_path, kind):
    cfg = test_lcm._cfg(tmp_path, tiny_sd_path, kind, max_train_steps=STEPS, checkpointing_steps=2,
                        checkpoints_total_limit=None, num_threads=1, report_to="none", sample=dict(every_steps=0))
    config = _yaml(cfg, tmp_path)
    straight = _straight(config, tmp_path / "a")
    resumed = _killed_then_resumed(config, tmp_path / "b", seed=len(kind))
    _same_bytes(straight / "student", resumed / "student", "**/*.safetensors")
    _same_bytes(straight / "checkpoints" / f"step-{STEPS:07d}", resumed / "checkpoints" / f"step-{STEPS:07d}",
                "modules/**/*.safetensors")  # the target / EMA network too


@pytest.mark.slow
def test_add_killed_at_any_moment_resumes_to_the_same_student_and_heads(tiny_sd_path, tmp_path):
    cfg = test_add._cfg(tmp_path, tiny_sd_path, max_train_steps=STEPS, checkpointing_steps=2,
                        checkpoints_total_limit=None, num_threads=1)
    config = _yaml(cfg, tmp_path)
    straight = _straight(config, tmp_path / "a")
    resumed = _killed_then_resumed(config, tmp_path / "b", seed=3)
    _same_bytes(straight / "checkpoints" / f"step-{STEPS:07d}", resumed / "checkpoints" / f"step-{STEPS:07d}",
                "modules/**/*.safetensors")


@pytest.mark.slow
def test_teacher_recipe_killed_at_any_moment_resumes_to_the_same_unet(tmp_path):
    overrides = [*test_teacher.OVERRIDES, f"teacher={tmp_path / 'teacher'}", "num_threads=1", "max_train_steps=8",
                 "vae.max_train_steps=6", "checkpoints_total_limit=null"]
    config = _yaml(load_config(test_teacher.CONFIG, teacher_recipe.TeacherConfig, overrides), tmp_path)
    straight = _straight(config, tmp_path / "a")
    resumed = _killed_then_resumed(config, tmp_path / "b", seed=5)
    last = Path("unet") / "checkpoints" / "step-0000008"
    _same_bytes(straight / last, resumed / last, "modules/unet/*.safetensors")
