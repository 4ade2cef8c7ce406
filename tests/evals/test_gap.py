"""The consistency-gap section of `distill eval` (`evals.gap`): rows per t for an LCM student, none for an ADD one,
in report.json (valid against the schema), report.md and report.html."""

import json
import shutil

import pytest
from click.testing import CliRunner

import cli
from distill.errors import ConfigError
from evals.gap import gap_skipped, gap_tables
from evals.settings import EvalSettings
from tests.evals.students import lora_run


def _add_copy(run, folder):
    """The LoRA run relabelled as an ADD student (its sampler's grid of 4 timesteps, as ADD writes it)."""
    shutil.copytree(run, folder)
    info_path = folder / "student" / "student.json"
    info = json.loads(info_path.read_text())
    info["sampler"]["config"]["original_inference_steps"] = 4
    info["method"] = "add"
    info_path.write_text(json.dumps(info))
    return folder


def test_an_lcm_student_gets_one_row_per_t_and_an_add_student_none(tiny_sd_v_path, tmp_path):
    lcm = lora_run(tmp_path, tiny_sd_v_path)
    add = _add_copy(lcm, tmp_path / "add_run")
    out = tmp_path / "report"
    result = CliRunner().invoke(cli.main, [
        "eval", "--teacher", str(tiny_sd_v_path), "--student", str(lcm), "--student", str(add), "--steps", "1",
        "--teacher-steps", "2", "-n", "8", "--batch-size", "8", "--latency-runs", "1", "--latency-warmup", "0",
        "--diversity-prompts", "2", "--diversity-samples", "2", "--baseline", "none", "--no-control",
        "--alignment", "none", "--consistency-gap", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from evals.schema import validate

    report = json.loads((out / "report.json").read_text())
    assert validate(report) == []
    section = report["consistency_gap"]
    assert (section["points"], section["skipped"], list(section["students"])) == (3, ["add_run"], ["lora_run"])
    rows = section["students"]["lora_run"]
    assert [r["t"] for r in rows] == [999, 759, 499, 259]  # its LCMScheduler's t at 1, 2 and 4 steps (N = 50)
    assert [r["ode_steps"] for r in rows] == [50, 38, 25, 13]
    for r in rows:  # a random LoRA is not the teacher's ODE map, nor is the teacher's own one step
        assert r["n"] == 3 and r["student_gap"] > 1e-3 and r["teacher_one_step_gap"] > 1e-3 and r["ode_scale"] > 0
    md = (out / "report.md").read_text()
    assert "## Consistency gap" in md and "| t | student gap | control gap |" in md
    assert "`lora_run`: furthest off, relative to the control, at t = " in md and "Not measured for `add_run`" in md
    assert "<h2>Consistency gap</h2>" in (out / "report.html").read_text()


def test_the_line_names_the_t_where_the_student_is_furthest_off_relative_to_the_control():
    row = lambda t, g, c: dict(t=t, student_gap=g, student_gap_std=0.01, teacher_one_step_gap=c,  # noqa: E731
                               ode_scale=1.0, n=4, ode_steps=10)
    report = {"consistency_gap": {"points": 4, "students": {"s": [row(999, 0.2, 1.0), row(259, 0.1, 0.2)]},
                                  "skipped": []}}
    (name, head, body, line), = gap_tables(report)
    assert name == "s" and body[0][:4] == ["999", "0.2000 ± 0.0100", "1.0000", "0.20×"]
    assert "at t = 259: its gap is 0.50×" in line and "closest: t = 999, 0.20×" in line
    assert gap_skipped(report) is None


def test_a_negative_number_of_points_is_refused():
    with pytest.raises(ConfigError, match="--consistency-gap -1 is negative"):
        EvalSettings(teacher="t", out="o", consistency_gap=-1).check()


def test_a_flow_students_gap_times_are_the_sigmas_its_sampler_visits(tiny_sd3_path):
    import torch

    from diffusers import FlowMatchLCMScheduler

    from evals import models
    from evals.gap import student_times

    teacher, _ = models.load_teacher(str(tiny_sd3_path), "cpu", torch.float32, 1.0, None)
    config = dict(FlowMatchLCMScheduler.from_config(teacher.model.scheduler.config).config)
    student = models.Candidate("s", "student", "lora", "x", teacher.model, FlowMatchLCMScheduler, config, 1.0, "")
    schedule = teacher.model.schedule
    expected = set()
    for s in (1, 2, 4):  # an unpinned student: the scheduler's own spacing
        own = FlowMatchLCMScheduler.from_config(config)
        own.set_timesteps(s)
        expected |= {float(t) for t in own.sigmas[:-1]}
    expected = sorted(expected, reverse=True)
    assert student_times(student, schedule) == pytest.approx(expected, abs=1e-6)
    pinned = models.Candidate("p", "student", "lora", "x", teacher.model, FlowMatchLCMScheduler, config, 1.0, "",
                              sigmas={"1": [1.0], "2": [1.0, 0.25]})  # an ADD student's own grid, before the shift
    assert student_times(pinned, schedule) == pytest.approx([1.0, float(schedule.shifted(torch.tensor(0.25)))])
