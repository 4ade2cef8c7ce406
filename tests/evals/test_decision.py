"""The decision matrix's arithmetic and the sweep's bookkeeping: significance, break-even, best per step count."""

import pytest

from distill.errors import ConfigError
from evals.baselines import baseline_name, best_per_steps, best_within_nfe
from evals.decision import break_even, compare, decide
from evals.specs import parse_baseline


def test_baseline_specs_parse_and_bad_ones_say_the_form():
    spec = parse_baseline("DDIMScheduler:timestep_spacing=trailing,steps_offset=1@2,3")
    assert spec.scheduler == "DDIMScheduler" and spec.guidances == [2.0, 3.0]
    assert spec.config == {"timestep_spacing": "trailing", "steps_offset": 1}
    assert parse_baseline("LCMScheduler").guidances == [1.0]
    assert baseline_name(spec, 2.0) == "teacher[DDIM-trailing-steps_offset=1,cfg2]"
    for bad in ("NoSuchScheduler@2", "DDIMScheduler@two", "DDIMScheduler@0.5", "DDIMScheduler:oops@2", "@2"):
        with pytest.raises(ConfigError, match="write e.g. DDIMScheduler:timestep_spacing=trailing@2,3"):
            parse_baseline(bad)


def _entry(label, steps, nfe, fd):
    return {"label": label, "steps": steps, "nfe": nfe, "fd": fd}


def test_best_per_steps_takes_the_lowest_fd_and_breaks_ties_by_cost():
    entries = [_entry("a", 1, 2, 300.0), _entry("b", 1, 1, 300.0), _entry("c", 1, 2, 350.0), _entry("d", 2, 4, 250.0)]
    best = best_per_steps(entries)
    assert best[1]["label"] == "b" and best[2]["label"] == "d"


def _row(label, role, steps, nfe, fd, kid, kid_std=1.0, cost=100.0, **extra):
    return {"label": label, "model": label.split("@")[0], "role": role, "steps": steps, "nfe": nfe,
            "quality": {"fd": fd, "kid": kid, "kid_std": kid_std}, "cost_usd_per_million": cost, **extra}


def test_comparisons_are_only_verdicts_beyond_the_kid_spread():
    assert compare({"fd": 200, "kid": 10, "kid_std": 1}, {"fd": 250, "kid": 20, "kid_std": 2})["better"] is True
    close = compare({"fd": 200, "kid": 10, "kid_std": 3}, {"fd": 250, "kid": 14, "kid_std": 3})
    assert close["significant"] is False and close["better"] is None  # 4 < 3 + 3: within the spreads
    assert compare({"fd": 300, "kid": 30, "kid_std": 1}, {"fd": 250, "kid": 20, "kid_std": 1})["better"] is False


def test_break_even_is_training_cost_over_the_saving_per_image():
    assert break_even(10.0, {"cost_usd_per_million": 500.0}, {"cost_usd_per_million": 100.0}) == pytest.approx(25_000)
    assert break_even(10.0, {"cost_usd_per_million": 100.0}, {"cost_usd_per_million": 200.0}) is None


def test_decide_judges_students_against_the_best_baseline_at_their_steps_and_within_their_nfe():
    teacher = _row("teacher@50", "teacher", 50, 100, 220.0, 100.0, cost=5000.0)
    b2 = _row("teacher[DDIM,cfg2]@2", "teacher", 2, 4, 280.0, 180.0, cost=400.0, baseline=True)
    b4 = _row("teacher[LCM,no-cfg]@4", "teacher", 4, 4, 240.0, 130.0, cost=300.0, baseline=True)
    student = _row("lora@4", "student", 4, 4, 238.0, 128.0, cost=300.0, screen={"fd": 250.0, "kid": 140.0,
                   "kid_std": 2.0}, training={"device_hours": 0.1}, feature_network="efficientnet-lite0")
    sweep = [{"kind": "control", "control_of": "lora", "steps": 4, "label": "control[lora]@4", "n": 200,
              "fd": 300.0, "kid": 190.0, "kid_std": 3.0}]
    rows = [teacher, b2, b4, student]
    decide(rows, sweep, price_per_hour=2.0, judge="effnet-lite0")
    assert student["vs_baseline"]["label"] == b4["label"] and student["vs_baseline"]["better"] is None  # |128 - 130| = 2, not > 1 + 1
    assert student["vs_baseline_nfe"]["label"] == b4["label"]  # b2 costs as much but scores worse
    assert student["vs_control"]["better"] is True and student["vs_control"]["n"] == 200
    assert student["training_cost_usd"] == pytest.approx(0.2)
    assert student["break_even_images"]["vs_teacher"] == pytest.approx(0.2 / (4700 / 1e6))
    assert student["break_even_images"]["vs_baseline"] is None  # no cheaper than the best sampler at 4 steps
    assert student["independent_judge"] is False  # its discriminator saw the judge (named another way)
    other = _row("add@4", "student", 4, 4, 238.0, 128.0, feature_network="effnet-lite1")
    decide([teacher, b4, other], [], price_per_hour=2.0, judge="effnet-lite0")
    assert other["independent_judge"] is True
    assert "vs_baseline" not in b2 and best_within_nfe(rows, 3) is None


def test_a_runs_early_best_student_costs_its_share_of_the_run_and_is_named_after_it(tmp_path):
    import json

    from evals.models import _name, _run_training

    run = tmp_path / "004-lora"
    (run / "best").mkdir(parents=True)
    (run / "student").mkdir()
    (run / "config.yaml").write_text("recipe: lcm\n")
    (run / "report.json").write_text(json.dumps({"steps": 1520, "minutes": 68.0, "device_hours": 1.2,
                                                 "samples_seen": 48640, "device": "cpu"}))
    (run / "best" / "student.json").write_text(json.dumps({"kind": "lora", "step": 760}))
    (run / "student" / "student.json").write_text(json.dumps({"kind": "lora", "step": 1520}))
    best, final = _run_training(run / "best"), _run_training(run / "student")
    assert best["steps"] == 760 and best["device_hours"] == 0.6 and best["samples_seen"] == 24320
    assert best["pro_rata_of_steps"] == 1520 and final["device_hours"] == 1.2 and "pro_rata_of_steps" not in final
    assert _name(run / "best") == "004-lora/best" and _name(run / "student") == "004-lora/student"
