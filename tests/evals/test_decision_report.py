"""The report's new data rendered: the decision matrix, the training-free sweep table, verdicts that claim only
significant differences, the small-N warning, an honest floor caption, the judge flag, plot families, and labelled
sample grids. The report is make_report()'s, given a sweep, a baseline per step count, controls, a cascade and
training costs, and judged by evals.decision itself."""

import re

import numpy as np
import pytest
from PIL import Image

from distill.images import grid, label_margins, save_grid
from evals import speed
from evals.decision import decide
from evals.plots import GRID_FILE, families, sample_grid_png
from evals.recommend import recommend
from evals.report import write
from evals.schema import validate
from evals.sweep import student_entries
from evals.tables import (DECISION_NOTE, FLOOR_NOTE, decision_table, quality_table, summary_table, sweep_entries,
                          sweep_table, sweep_title)
from tests.evals.test_report import _row, make_report

SCREEN_N = 64
TRAINING = {"steps": 2000, "minutes": 25.0, "device": "H100", "device_hours": 0.42, "samples_seen": 64000,
            "processes": 1}


def _entry(label, kind, steps, nfe, fd, kid, best=False, control_of=None, scheduler="DDIMScheduler", g=2.0):
    return {"label": label, "model": label.rsplit("@", 1)[0], "kind": kind, "steps": steps, "nfe": nfe,
            "scheduler": scheduler, "guidance_scale": g, "cfg": g > 1, "control_of": control_of, "best": best,
            "seconds": 1.0, "fd": fd, "kid": kid, "kid_std": 2.0, "n": SCREEN_N, "align_top1": 0.3, "align_top5": 0.6}


def decision_report(judge: str = "dinov2-small", n: int = 1000) -> dict:
    """make_report() with the training-free sweep, controls, a cascade and training costs, judged by decide()."""
    report = make_report()
    rows = report["rows"]
    ddim = rows[1]  # teacher@2 becomes the sweep's best at 2 steps
    ddim.update(label="teacher[DDIM-trailing,cfg3]@2", model="teacher[DDIM-trailing,cfg3]", baseline=True)
    dpm = _row("teacher[DPM++2M,cfg2]@4", "teacher", "teacher", 4, 8, 250.6, 80.0, 45.0, cfg=True)
    dpm.update(scheduler="DPMSolverMultistepScheduler", guidance_scale=2.0, baseline=True)
    dpm["quality"]["kid"] = 25.3  # lora@4 has 25.0 ± 1: within the spreads
    cascade = _row("lora@2+teacher@2:0.3@2", "cascade", "cascade", 2, 6, 245.0, 60.0, 60.0)
    cascade["model"] = "lora@2+teacher@2:0.3"
    rows[4:4] = [dpm]
    rows.append(cascade)
    for row in rows:
        row["vs_teacher"] = speed.speedups(row, rows[0]) | {"fd_ratio": row["quality"]["fd"] / 240.0}
        row["cost_usd_per_million"] = speed.cost_per_million(row["speed"]["throughput_img_s"], 2.0)
        q = row["quality"]
        row["screen"] = {"n": SCREEN_N, "fd": q["fd"] * 1.2, "kid": q["kid"], "kid_std": 2.0}
        if row["role"] == "student":
            row.update(training=dict(TRAINING), feature_network=judge)
        row["quality"]["collapse"] = 0.05
    sweep = [_entry("teacher[DDIM-trailing,cfg3]@2", "baseline", 2, 4, 840.0, 70.0, True, g=3.0),
             _entry("teacher[DPM++2M,cfg2]@2", "baseline", 2, 4, 900.0, 75.0,
                    scheduler="DPMSolverMultistepScheduler"),
             _entry("teacher[DPM++2M,cfg2]@4", "baseline", 4, 8, 300.7, 25.3, True,
                    scheduler="DPMSolverMultistepScheduler"),
             _entry("teacher[DDIM-trailing,cfg3]@4", "baseline", 4, 8, 500.0, 40.0, g=3.0)]
    sweep += [_entry(f"control[lora]@{k}", "control", k, k, fd, kid, control_of="lora", scheduler="LCMScheduler",
                     g=1.0) for k, fd, kid in ((1, 360.0, 30.0), (2, 700.0, 60.0), (4, 650.0, 55.0))]
    sweep += student_entries(rows)
    decide(rows, sweep, 2.0, "effnet-lite0")
    report["sweep"] = sweep
    report["models"][1]["weights_mb"] = 12.0
    report["models"][1]["metadata"] = {"adapter_mb": 3.2}
    report["protocol"]["n"] = n
    report["recommendations"] = recommend(report)
    return report


def _by_label(head, body, label, column):
    return next(row for row in body if row[0] == label)[head.index(column)]


def test_the_report_with_the_new_data_follows_the_schema():
    assert validate(decision_report()) == []
    assert validate(decision_report(judge="effnet-lite0", n=64)) == []


def test_decision_matrix_gives_each_student_its_verdicts_costs_and_sizes():
    head, body = decision_table(decision_report())
    assert [row[0] for row in body] == ["lora@1", "lora@2", "lora@4", "lora@2+teacher@2:0.3@2"]
    same = "vs training-free, same steps"
    assert (_by_label(head, body, "lora@4", same)
            == "teacher[DPM++2M,cfg2]@4: FD-EffNet ×1.00, not significant at this N")
    assert _by_label(head, body, "lora@2", same).endswith(": FD-EffNet ×0.37, better")
    assert _by_label(head, body, "lora@4", "vs training-free, ≤ NFE").startswith("teacher[DDIM-trailing,cfg3]@2")
    assert _by_label(head, body, "lora@1", same) == "—"  # no training-free row at 1 step
    control = "vs control (what training bought)"
    assert _by_label(head, body, "lora@2", control) == "control[lora]@2 (N = 64): FD-EffNet ×0.45, better"
    assert _by_label(head, body, "lora@1", control).endswith("not significant at this N")
    assert _by_label(head, body, "lora@2+teacher@2:0.3@2", same).endswith("better")
    assert _by_label(head, body, "lora@2", "training") == "0.42 device-h on H100"
    assert _by_label(head, body, "lora@2", "training $") == "$0.84"
    assert re.fullmatch(r"[0-9.]+k?", _by_label(head, body, "lora@2", "break-even vs teacher (images)"))
    assert _by_label(head, body, "lora@4", "break-even vs training-free (images)") != "—"
    assert _by_label(head, body, "lora@1", "break-even vs training-free (images)") == "—"  # none at 1 step
    assert _by_label(head, body, "lora@2", "adapter / fused MiB") == "3.2 / 12"
    assert _by_label(head, body, "lora@2", "collapsed ↓") == "0.05"
    assert _by_label(head, body, "lora@2", "judge") == "independent"


def test_sweep_table_marks_the_best_and_sets_students_beside_their_controls():
    report = decision_report()
    assert sweep_title(report) == f"Training-free samplers (screening N = {SCREEN_N})"
    head, body = sweep_table(report)
    starred = [row[1] for row in body if row[1].endswith(" ★")]
    assert starred == ["teacher[DDIM-trailing,cfg3]@2 ★", "teacher[DPM++2M,cfg2]@4 ★"]
    assert all("★ best training-free" in row for row in body if row[1].endswith("★"))
    labels = [row[1] for row in body]
    assert labels.index("control[lora]@4") == labels.index("lora@4") + 1  # the control right after its student
    assert labels.index("teacher[DPM++2M,cfg2]@4 ★") < labels.index("teacher[DDIM-trailing,cfg3]@4")  # best first
    row = body[labels.index("teacher[DPM++2M,cfg2]@4 ★")]
    assert row[head.index("guidance")] == "CFG 2" and row[head.index("NFE")] == "8"
    assert row[head.index("KID×1000 ↓")] == "25.30 ± 2.00" and row[head.index("top-5 ↑")] == "0.600"
    assert any(r[2].startswith("control of lora") for r in body) and any(r[2].startswith("cascade") for r in body)
    assert len(sweep_entries(report)) == len(report["sweep"])


def test_small_n_warning_comes_first_only_at_small_n():
    small = decision_report(n=64)["recommendations"]
    assert small[0]["kind"] == "warning" and small[0]["text"].startswith("Small N: 64 images per row")
    assert "mostly noise" in small[0]["text"] and f"screening N = {SCREEN_N}" in small[0]["text"]
    assert not any("Small N" in r["text"] for r in decision_report(n=1000)["recommendations"])


def test_a_difference_within_the_spreads_is_never_called_better():
    recs = decision_report()["recommendations"]
    line = next(r["text"] for r in recs if r["kind"] == "decision" and r["label"] == "lora@4")
    same_steps = next(part for part in line.split("; ") if "training-free sampler at 4 steps" in part)
    assert "not significant at this N" in same_steps and "better" not in same_steps
    assert "better" in next(part for part in line.split("; ") if "≤ 4 NFE" in part)  # that one is significant
    control = next(r["text"] for r in recs if r["kind"] == "decision" and r["label"] == "lora@1")
    assert "training bought nothing measurable at this N" in control and "better" not in control
    budget = next(r["text"] for r in recs if r.get("budget_ms") == 50)
    assert budget.startswith("≤ 50 ms") and "LCM-LoRA `lora` at 4 steps" in budget
    assert "within noise of lora@2" in budget and "teacher@50's 240.0, within noise" in budget


def test_baseline_training_and_cascade_lines():
    report = decision_report()
    recs, text = report["recommendations"], "\n".join(r["text"] for r in report["recommendations"])
    assert "Training-free, 4 steps: DPM++2M with CFG 2, FD-EffNet 250.6" in text
    assert "Training-free, 2 steps: DDIM-trailing with CFG 3, FD-EffNet 700.0" in text
    assert "best of 2 sampler × guidance settings screened at N = 64" in text
    assert any(r["kind"] == "decision" and r["text"].startswith("The cascade `lora@2+teacher@2:0.3`") for r in recs)
    training = next(r["text"] for r in recs if r["kind"] == "training" and r["label"] == "lora@2")
    assert "training cost $0.84 (0.42 device-hours on H100 at 2 USD/h, 2000 steps)" in training
    assert "repaid after" in training and "vs teacher@50" in training
    kinds = [r["kind"] for r in recs]
    assert kinds.index("latency_budget") < kinds.index("baseline") < kinds.index("decision") < kinds.index("training")


def test_judge_network_flagged_where_the_student_trained_against_it():
    report = decision_report(judge="effnet-lite0")
    head, body = decision_table(report)
    assert _by_label(head, body, "lora@2", "judge") == "not independent: trained against this network"
    assert _by_label(head, body, "lora@2+teacher@2:0.3@2", "judge") == "—"  # no discriminator of its own
    qhead, qbody = quality_table(report)
    assert qhead[-1] == "judge" and _by_label(qhead, qbody, "lora@4", "judge").startswith("not independent")
    assert _by_label(qhead, qbody, "teacher@50", "judge") == "—"
    warning = next(r for r in report["recommendations"] if r["text"].startswith("Not an independent judge"))
    assert warning["kind"] == "warning" and "lora@1, lora@2, lora@4" in warning["text"]
    assert "judge" not in quality_table(decision_report())[0]


def test_pages_and_terminal_show_the_new_tables_and_an_honest_floor(tmp_path):
    report = decision_report(n=64)
    write(report, tmp_path)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    for text in (md, page):
        assert "Decision matrix" in text and f"Training-free samplers (screening N = {SCREEN_N})" in text
        assert "★" in text and "not significant at this N" in text
        assert "best any generator" not in text and "not a bound" in text
    assert FLOOR_NOTE in md and DECISION_NOTE in md and '<li class="warning">Small N' in page
    assert md.index("## Decision matrix") < md.index("## Quality")
    floor_caveat = next(r["text"] for r in report["recommendations"] if "two disjoint sets" in r["text"])
    assert "not a bound" in floor_caveat
    terminal = summary_table(report)
    assert "Decision" in terminal and "not significant at this N (×1.00)" in terminal
    assert "better" in terminal.split("lora@2 ")[-1].splitlines()[0]


def test_plot_families_group_baselines_and_cascades():
    names = families(decision_report())
    assert [r["label"] for r in names["teacher, best training-free sampler"]] == [
        "teacher[DDIM-trailing,cfg3]@2", "teacher[DPM++2M,cfg2]@4"]
    assert [r["label"] for r in names["cascade lora@2+teacher@2:0.3"]] == ["lora@2+teacher@2:0.3@2"]
    assert [r["label"] for r in names["lora (lora)"]] == ["lora@1", "lora@2", "lora@4"]
    assert "teacher, DDIM (no distillation)" in families(make_report())  # no sweep: the single DDIM baseline


# ------------------------------------------------------------------------------------ labelled grids
def _tiles(n=6, side=16):
    return [Image.new("RGB", (side, side), (40 * i % 255, 120, 200)) for i in range(n)]


def test_grid_labels_add_margins_with_text_and_leave_the_images_alone():
    plain = grid(_tiles(), rows=2, scale=4)
    assert plain.size == (3 * (64 + 2) + 2, 2 * (64 + 2) + 2)  # unchanged without labels
    labels = (["a smiling face", "red heart"], ["student@1", "student@2", "teacher@50"])
    left, top = label_margins(labels)
    labelled = grid(_tiles(), rows=2, scale=4, labels=labels)
    assert left > 0 and top > 0 and labelled.size == (plain.size[0] + left, plain.size[1] + top)
    gray = np.asarray(labelled.convert("L"))
    assert gray[top:, :left].min() < 128  # prompt text
    assert gray[:top, left:].min() < 128  # model@steps text
    assert np.array_equal(np.asarray(labelled)[top:, left:], np.asarray(plain))  # the images exactly where they were
    assert label_margins((None, labels[1]))[0] == 0 and label_margins((labels[0], None))[1] == 0
    assert label_margins(None) == (0, 0)


def test_long_labels_are_cut(tmp_path):
    long = "a very long prompt " * 10
    assert label_margins(([long], ["x"])) == label_margins(([long * 2], ["x"]))  # both cut to the same length
    assert label_margins(([long], ["x"]))[0] < 400
    path = save_grid([_tiles(2)], tmp_path / "g.png", labels=([long], ["student@1", "a column name too long to fit"]))
    assert Image.open(path).size[1] > 128 + 4


@pytest.mark.parametrize("real", [False, True])
def test_eval_sample_grid_labels_rows_and_prompts(real):
    """The eval's grid names every row (model@steps) and column (prompt): its image is wider and taller than the
    bare canvas of cells."""
    images = np.zeros((3, 32, 32, 3), np.uint8)
    png = sample_grid_png([("teacher@50", images), ("lora@1", images)], ["a", "b", "c"],
                          images if real else None)
    import io

    size = Image.open(io.BytesIO(png)).size
    rows = 3 if real else 2
    assert size[0] > 3 * (64 + 3) + 3 + 100 and size[1] > rows * (64 + 3) + 3 + 50
    assert GRID_FILE.endswith(".png")
