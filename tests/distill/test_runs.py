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
