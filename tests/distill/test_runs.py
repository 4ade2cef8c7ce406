import json

import pytest
from accelerate import Accelerator

from distill import runs
from distill.budget import Budget
from distill.optim import warmup_cosine
from distill.errors import ConfigError


def test_run_folders_are_numbered_and_never_reused(tmp_path):
    a = runs.new_run_dir(tmp_path, "lcm-emoji_sd")
    b = runs.new_run_dir(tmp_path, "lcm-emoji_sd")
    c = runs.new_run_dir(tmp_path, "teacher")
    assert [p.name for p in (a, b, c)] == ["001-lcm-emoji_sd", "002-lcm-emoji_sd", "003-teacher"]
    assert runs.list_runs(tmp_path, "lcm-emoji_sd") == [a, b]


def test_checkpoints_prune_and_resume_latest(tmp_path):
    import torch

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    run = runs.new_run_dir(tmp_path, "x")
    for step in (10, 20, 30):
        with torch.no_grad():
            model.weight.fill_(step)
        runs.save_checkpoint(accelerator, run, step, {"minutes": step / 10}, total_limit=2)
    ckpts = runs.list_checkpoints(run)
    assert [runs.read_state(c)["step"] for c in ckpts] == [20, 30]
    assert not list((run / "checkpoints").glob("*.partial"))
    found_run, found = runs.resolve_resume("latest", tmp_path, "x")
    assert found_run == run and found == ckpts[-1]
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state(str(found))
    assert model.weight.eq(30).all()
    assert runs.resolve_resume(str(run), tmp_path, "x") == (run, ckpts[-1])
    assert runs.resolve_resume("latest", tmp_path, "other") == (None, None)


def test_resume_from_nonsense_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="resume_from_checkpoint"):
        runs.resolve_resume(str(tmp_path / "nope"), tmp_path, "x")


def test_budget_ends_on_whichever_limit_first():
    steps_only = Budget(max_steps=10, max_minutes=None)
    assert not steps_only.done(9) and steps_only.done(10)
    assert steps_only.progress(5) == pytest.approx(0.5)
    timed = Budget(max_steps=10**9, max_minutes=1.0, elapsed_before=1.0)  # a resumed run out of time
    assert timed.done(0)


def test_warmup_cosine_shape():
    assert warmup_cosine(0.0, 0, 10) == pytest.approx(0.1)
    assert warmup_cosine(0.0, 50, 10) == pytest.approx(1.0)
    assert warmup_cosine(0.5, 50, 10) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 50, 10, floor=0.1) == pytest.approx(0.1)


def test_write_config(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class C:
        a: int = 1

    path = runs.write_config(C(), tmp_path)
    assert path.read_text().strip() == "a: 1" and json.dumps(1)


def _reserve(args):
    root, name = args
    return runs.new_run_dir(root, name).name


def test_runs_started_at_the_same_moment_never_share_a_number(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(4) as pool:
        names = list(pool.map(_reserve, [(tmp_path, f"run{i}") for i in range(12)]))
    numbers = [name.split("-")[0] for name in names]
    assert len(set(numbers)) == 12 and sorted(numbers) == [f"{i:03d}" for i in range(1, 13)]


def test_a_checkpoint_without_its_marker_is_never_listed_and_is_named_in_a_warning(tmp_path):
    import torch

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    run = runs.new_run_dir(tmp_path, "x")
    good = runs.save_checkpoint(accelerator, run, 10, {}, total_limit=None)
    assert (good / runs.MARKER).is_file()
    broken = runs.save_checkpoint(accelerator, run, 20, {}, total_limit=None)
    (broken / runs.MARKER).unlink()  # as a save that died before its marker
    assert runs.list_checkpoints(run) == [good] and runs.incomplete_checkpoints(run) == [broken]
    assert runs.resolve_resume(str(run), tmp_path, "x") == (run, good)
    with pytest.warns(UserWarning, match=r"step-0000020 has no checkpoint.complete marker.*resuming from .*step-0000010"):
        runs.warn_incomplete(run, good)
    (good / runs.MARKER).unlink()  # nothing complete left: the refusal says which one and how to adopt it
    with pytest.raises(ConfigError, match=r"none marked complete \(step-0000020 .*touch .*step-0000020/checkpoint"):
        runs.resolve_resume(str(run), tmp_path, "x")


def test_pruning_keeps_the_newest_good_checkpoint_and_a_resave_replaces_it_safely(tmp_path):
    import torch

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    run = runs.new_run_dir(tmp_path, "x")
    for step in (1, 2, 2):  # the same step twice: the first copy is set aside until the second is in place
        with torch.no_grad():
            model.weight.fill_(step)
        runs.save_checkpoint(accelerator, run, step, {}, total_limit=1)
    assert [c.name for c in runs.list_checkpoints(run)] == ["step-0000002"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]


KILL_MID_SAVE = """
import os, signal, sys, torch
from accelerate import Accelerator
from distill import runs
accelerator = Accelerator(cpu=True)
model = accelerator.prepare(torch.nn.Linear(2, 2))
run = runs.new_run_dir(sys.argv[1], "x")
with torch.no_grad():
    model.weight.fill_(1.0)
runs.save_checkpoint(accelerator, run, 1, {}, total_limit=1)
with torch.no_grad():
    model.weight.fill_(2.0)
def die(folder):  # SIGKILL in the middle of the second save, after its weights are written
    os.kill(os.getpid(), signal.SIGKILL)
runs.save_checkpoint(accelerator, run, 2, {}, total_limit=1, write=die)
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    import subprocess
    import sys

    import torch

    done = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    run = runs.list_runs(tmp_path)[0]
    assert [c.name for c in runs.list_checkpoints(run)] == ["step-0000001"]  # the half-written one is not a checkpoint
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    accelerator.load_state(str(runs.resolve_resume(str(run), tmp_path, "x")[1]))
    assert model.weight.eq(1.0).all()


def test_config_changes_name_training_settings_and_ignore_where_and_when_things_are_written():
    saved = {"learning_rate": 1e-4, "checkpointing_steps": 100, "optim": {"beta1": 0.9}, "sample": {"steps": [1]}}
    now = {"learning_rate": 1e-4, "checkpointing_steps": 50, "optim": {"beta1": 0.0}, "sample": {"steps": [1, 2]}}
    assert runs.config_changes(saved, now) == ["optim.beta1: 0.9 -> 0.0"]


def test_checkpoint_files_follow_the_users_umask(tmp_path):
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    run = runs.new_run_dir(tmp_path, "x")
    old = os.umask(0o027)
    try:
        def write(folder):  # a writer that creates its file 0600, as safetensors' atomic save does
            save_file({"w": torch.zeros(1)}, str(folder / "w.safetensors"))
            os.chmod(folder / "w.safetensors", 0o600)

        checkpoint = runs.save_checkpoint(accelerator, run, 1, {}, total_limit=None, write=write)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in checkpoint.rglob("*") if p.is_file()}
    assert modes["w.safetensors"] == 0o640 and set(modes.values()) == {0o640}


def test_a_key_added_after_a_run_began_is_no_change_at_its_default():
    saved = {"data": {"source": "emoji:32"}, "learning_rate": 1e-4}  # written before data.holdout_rows existed
    defaults = {"data": {"source": "emoji:32", "holdout_rows": 0}, "learning_rate": 1e-4}
    assert runs.config_changes(saved, {**saved, "data": {"source": "emoji:32", "holdout_rows": 0}}, defaults) == []
    assert runs.config_changes(saved, {**saved, "data": {"source": "emoji:32", "holdout_rows": 5}}, defaults) == [
        "data.holdout_rows: 0 -> 5"]
