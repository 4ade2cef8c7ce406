"""The report: every file written, report.json valid against the schema, HTML self-contained, sound recommendations."""

import copy
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from distill.errors import DataError
from evals.plots import GRID_FILE, PLOTS, sample_grid_png
from evals.recommend import nice_ceil, pareto_front, recommend
from evals.report import FILES, load, write
from evals.schema import SCHEMA_VERSION, check, validate

DEVICE = "cpu"


def _row(label, role, kind, steps, nfe, fd, p50, throughput, cfg=False, guidance_input=False):
    model = label.split("@")[0]
    return {
        "label": label, "model": model, "role": role, "kind": kind, "steps": steps, "scheduler": "DDIMScheduler",
        "guidance_scale": 3.0, "cfg": cfg, "guidance_input": guidance_input, "nfe": nfe,
        "quality": {"fd": fd, "kid": fd / 10, "kid_std": 1.0, "precision": 0.7, "recall": 0.5, "diversity": 20.0,
                    "align_top1": 0.4, "align_top5": 0.7, "align_cos": 0.5},
        "speed": {"latency": {"runs": 20, "warmup": 3, "p50_ms": p50, "p95_ms": p50 * 1.1,
                              "stage_p50_ms": {"text": 2.0, "loop": p50 - 4.0, "decode": 2.0},
                              "peak_mem_mb": 900.0, "mem_kind": "process_peak_rss"},
                  "batch_size": 64, "stage_ms_per_image": {"text": 0.5, "loop": 1000 / throughput - 1.0, "decode": 0.5},
                  "throughput_img_s": throughput, "peak_mem_mb": 1000.0, "mem_kind": "process_peak_rss"},
    }


def make_report():
    from evals import speed

    rows = [_row("teacher@50", "teacher", "teacher", 50, 100, 240.0, 1000.0, 4.0, cfg=True),
            _row("teacher@2", "teacher", "teacher", 2, 4, 700.0, 44.0, 80.0, cfg=True),
            _row("lora@1", "student", "lora", 1, 1, 295.0, 14.0, 300.0),
            _row("lora@2", "student", "lora", 2, 2, 260.0, 24.0, 170.0),
            _row("lora@4", "student", "lora", 4, 4, 250.0, 44.0, 90.0)]
    for row in rows:
        row["vs_teacher"] = speed.speedups(row, rows[0]) | {"fd_ratio": row["quality"]["fd"] / 240.0}
        row["cost_usd_per_million"] = speed.cost_per_million(row["speed"]["throughput_img_s"], 2.0)
    protocol = {
        "n": 1000, "seed": 0, "seeds": "per sample", "prompts": "captions", "feature_net": "effnet-lite0",
        "reference": {"source": "emoji:32", "n": 1000, "floor_n": 1000, "resolution": [32, 32], "rows": "halves"},
        "fd_name": "FD-EffNet", "feature_resolution": 128, "kid": {"subsets": 50, "subset_size": 500},
        "precision_recall_k": 3, "diversity": {"prompts": 8, "samples_per_prompt": 4}, "alignment": "emoji-align",
        "teacher": "checkpoints/emoji-sd", "teacher_steps": 50, "steps": [1, 2, 4], "device": DEVICE,
        "device_name": "test CPU, 2 cores", "dtype": "fp32", "batch_size": 64, "latency": {"runs": 20, "warmup": 3},
        "price_per_gpu_hour": 2.0, "cost_note": "CPU time priced at 2 USD per hour as given",
        "versions": {"python": "3.11", "torch": "2.13", "diffusers": "0.42", "torchmetrics": "1.9"},
    }
    models = [{"name": "teacher", "role": "teacher", "kind": "teacher", "source": "t", "description": "teacher",
               "scheduler": "DDIMScheduler", "guidance_scale": 3.0, "cfg": True, "guidance_input": False},
              {"name": "lora", "role": "student", "kind": "lora", "source": "s", "description": "LCM-LoRA",
               "scheduler": "LCMScheduler", "guidance_scale": 1.0, "cfg": False, "guidance_input": False}]
    floor = {"fd": 120.0, "kid": 0.1, "kid_std": 1.5, "precision": 0.85, "recall": 0.88, "align_top1": 0.6}
    report = {"schema_version": SCHEMA_VERSION, "created": "2026-01-01T00:00:00+00:00", "command": None,
              "protocol": protocol, "models": models, "rows": rows, "floor": floor, "timings": {"total_s": 500.0}}
    report["recommendations"] = recommend(report)
    return report


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    report = make_report()
    grid = sample_grid_png([("teacher@50", np.zeros((3, 32, 32, 3), np.uint8)),
                            ("lora@1", np.full((3, 16, 16, 3), 200, np.uint8))], ["a", "b", "c"])
    html_path = write(report, out, grid)
    return out, report, html_path


def test_every_file_is_written_and_the_json_follows_the_schema(written):
    out, report, html_path = written
    assert html_path == out / "report.html"
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in [*PLOTS.values(), GRID_FILE]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert validate(json.loads((out / "report.json").read_text())) == []
    md = (out / "report.md").read_text()
    assert "FD-EffNet ↓" in md and "FID ↓" not in md and "real vs real (floor)" in md  # named by its network


def test_html_is_self_contained(written):
    out, _, _ = written
    text = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "@import" not in text and not re.search(r"url\(\s*['\"]?(https?:)?//", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    sources = re.findall(r'<img[^>]*src="([^"]*)"', text)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)


def test_validator_names_what_is_wrong():
    report = make_report()
    assert validate(report) == []
    broken = copy.deepcopy(report)
    del broken["rows"][1]["quality"]["fd"]
    broken["rows"][2]["nfe"] = "one"
    broken["protocol"]["fd_name"] = "FID-ish"
    broken["extra"] = 1
    errors = validate(broken)
    assert any("$.rows[1].quality" in e and "'fd'" in e for e in errors)
    assert any("$.rows[2].nfe" in e and "integer" in e for e in errors)
    assert any("$.protocol.fd_name" in e for e in errors) and any("'extra'" in e for e in errors)
    assert validate(True, {"type": "number"}) and validate(2.5, {"type": "integer"})  # bool is no number
    with pytest.raises(DataError, match="schema"):
        check(broken)


def test_pareto_front_and_budgets():
    points = [(10, 5.0), (20, 3.0), (15, 6.0), (40, 3.0), (50, 1.0)]
    assert pareto_front(points) == [0, 1, 4]
    assert [nice_ceil(x) for x in (0.7, 1.0, 13.0, 44.0, 51.0, 999.0)] == [1, 1, 20, 50, 100, 1000]


def test_recommendation_picks_the_best_quality_under_each_budget():
    report = make_report()
    budgets = {r["budget_ms"]: r["label"] for r in report["recommendations"] if r["kind"] == "latency_budget"}
    assert budgets == {20: "lora@1", 50: "lora@4", 1000: "teacher@50"}  # teacher@2 (44 ms) is worse than lora@4
    text = next(r["text"] for r in report["recommendations"] if r.get("budget_ms") == 50)
    assert "LCM-LoRA `lora` at 4 steps" in text and "+4% vs teacher@50" in text and "22.7× faster" in text
    cost = [r for r in report["recommendations"] if r["kind"] == "cost"]
    assert cost[0]["label"] == "lora@2" and cost[1]["label"] == "lora@1"  # within 10% (<= 264), within 25% (<= 300)
    assert any("CPU time" in r["text"] for r in report["recommendations"] if r["kind"] == "note")
    assert not any("dominated" in r["text"] for r in report["recommendations"])
    assert not any("Timing noise" in r["text"] for r in report["recommendations"])
    report["rows"][3]["speed"]["loop_cv"] = 0.25
    assert any("Timing noise" in r["text"] and "lora@2 (25%)" in r["text"] for r in recommend(report))
    report["rows"][4]["quality"]["fd"] = 230.0  # a lower FD alone, KID within the spreads: no claim
    assert not any("dominated" in r["text"] for r in recommend(report))
    report["rows"][4]["quality"]["kid"] = 20.0  # KID 20 ± 1 vs 24 ± 1: lora@4 now beats the teacher significantly
    note = next(r for r in recommend(report) if "dominated" in r["text"])
    assert note["label"] == "lora@4" and "22.7× faster" in note["text"] and "significantly better" in note["text"]


def test_distill_report_regenerates_from_the_json(written):
    out, report, _ = written
    (out / "report.html").unlink()
    (out / "report.md").unlink()
    result = CliRunner().invoke(cli.main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and "report.html" in result.output
    assert "lora@4" in (out / "report.md").read_text()


def test_report_refuses_a_missing_or_foreign_json(tmp_path):
    result = CliRunner().invoke(cli.main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "No report.json" in result.output
    report = make_report()
    report["schema_version"] = "2.0.0"
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(DataError, match="schema version 2.0.0"):
        load(tmp_path)
