"""recipes/lcm.py's long-run settings on the tiny pipelines: the quality probe with its held-out split, trajectory
anchoring and the slow shipped EMA; each survives a resume bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from distill.errors import ConfigError
from distill.info import LORA_WEIGHTS
from recipes import lcm
from recipes.lcm import main
from tests.recipes.test_lcm import _cfg, _report

LONG = dict(data=dict(source="emoji:32", resolution=16, max_samples=40, holdout_rows=4),
            probe=dict(every_steps=2, num_samples=4, steps=2, patience=1),
            sample=dict(prompts=["dog face"], steps=[1, 2], every_steps=0, teacher_steps=None))


def _long(tmp_path, teacher, kind, **over):
    student = dict(lora_rank=4, time_cond_proj_dim=32, ship_ema_decay=0.99)
    lcd = dict(w_min=1.0, w_max=3.0, anchor_weight=1.0, anchor_trajectories=6, anchor_solve_steps=50)
    return _cfg(tmp_path, teacher, kind, **{**LONG, "student": student, "lcd": lcd, **over})


def test_probe_holdout_anchor_and_ship_ema_on_a_full_student(tiny_sd_path, tmp_path):
    run = main(_long(tmp_path, tiny_sd_path, "full"))
    rows = [json.loads(line) for line in (run / "probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]  # 0: the untrained control
    assert all(r["score"] == r["score"] and r["holdout_loss"] > 0 and r["train_loss"] > 0 for r in rows)
    report = _report(run)
    assert report["probe"]["best_step"] in (0, 2, 4) and "anchor" in report["losses"]
    best = json.loads((run / "best" / "student.json").read_text())
    assert best["step"] == report["probe"]["best_step"]
    shipped = load_file(str(run / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
    target = load_file(str(run / "checkpoints" / "step-0000004" / "modules" / "target" / "unet" /
                           "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(shipped[k], target[k]) for k in shipped)  # the slow average ships, not theta^-


def test_a_resumed_long_run_equals_the_straight_one(tiny_sd_path, tmp_path, monkeypatch):
    first = main(_long(tmp_path, tiny_sd_path, "lora", max_train_steps=2))
    assert (first / "anchors.safetensors").is_file()

    def solve_again(*args, **kwargs):
        raise AssertionError("a resume re-solved the trajectories its run folder holds")

    monkeypatch.setattr(lcm, "solve_trajectories", solve_again)
    resumed = main(_long(tmp_path, tiny_sd_path, "lora", max_train_steps=4, resume_from_checkpoint="latest",
                         allow_config_change=True))
    monkeypatch.undo()
    straight = main(_long(tmp_path / "other", tiny_sd_path, "lora"))
    assert resumed == first
    for name in (f"student/{LORA_WEIGHTS}", f"modules/student/{LORA_WEIGHTS}", "modules/ship/model.safetensors"):
        a, b = (load_file(str(r / "checkpoints" / "step-0000004" / name)) for r in (resumed, straight))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    probes = [[{k: v for k, v in json.loads(line).items() if k != "minutes"}  # wall-clock differs, nothing else
               for line in (r / "probe.jsonl").read_text().splitlines()] for r in (resumed, straight)]
    assert probes[0] == probes[1] and len(probes[0]) == 3  # the probe repeats exactly too


def test_probe_and_anchor_settings_are_checked_before_any_work(tiny_sd_path, tmp_path):
    with pytest.raises(ConfigError, match="data.holdout_rows"):
        lcm.check_probe(_cfg(tmp_path, tiny_sd_path, "lora", probe=dict(every_steps=5)))
    with pytest.raises(ConfigError, match="probe.feature_net=effnet-lite0 is the eval's judge"):
        lcm.check_probe(_cfg(tmp_path, tiny_sd_path, "lora", probe=dict(every_steps=5, feature_net="effnet-lite0"),
                             data=dict(holdout_rows=2)))
    from distill.teacher import Teacher

    teacher = Teacher.from_pretrained(tiny_sd_path)
    with pytest.raises(ConfigError, match="anchor_solve_steps=30 does not put .* use e.g. 100"):
        lcm.check(_cfg(tmp_path, tiny_sd_path, "lora", lcd=dict(anchor_weight=1.0, anchor_solve_steps=30,
                                                                 num_ddim_timesteps=20)), teacher)
    with pytest.raises(ConfigError, match=r"ship_ema_decay=1.5 must be in \[0, 1\)"):
        lcm.check(_cfg(tmp_path, tiny_sd_path, "lora", student=dict(ship_ema_decay=1.5)), teacher)
