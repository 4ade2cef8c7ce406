"""`distill demo`: the README's main job, run end to end on the embedded teacher at a tiny size.

A few seconds of LCM-LoRA training, N = 8 and two timed runs per configuration: what is checked is the
wiring (train -> export -> eval of the exported LoRA -> report), not the quality the full demo reaches.
"""

import functools
import json

from click.testing import CliRunner
from safetensors import safe_open

import cli
import evals.demo


def test_demo_trains_exports_evaluates_and_reports(tmp_path, monkeypatch):
    quick = functools.partial(evals.demo.EvalSettings, latency_runs=2, latency_warmup=1, diversity_prompts=2,
                              diversity_samples=2, batch_size=8, sweep_samples=16)
    monkeypatch.setattr(evals.demo, "EvalSettings", quick)
    result = CliRunner().invoke(cli.main, ["demo", "--steps", "3", "-n", "8", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output

    run_dir = next((tmp_path / "runs").glob("*-demo"))
    with safe_open(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert f.keys() and all("lora" in key for key in f.keys())
    report = json.loads((run_dir / "report" / "report.json").read_text())
    labels = {(row["role"], row["steps"]) for row in report["rows"]}
    assert {("student", k) for k in (1, 2, 4, 8)} <= labels
    assert {("teacher", k) for k in (1, 2, 4, 8, 50)} <= labels
    assert ("cascade", 2) in labels  # the LoRA's 2-step draft, refined by the teacher
    assert sum(e["best"] for e in report["sweep"]) == 4  # the best training-free sampler at each step count
    assert {e["kind"] for e in report["sweep"]} >= {"baseline", "control"}
    student = next(m for m in report["models"] if m["role"] == "student")
    assert student["source"] == str(run_dir / "lora")  # the exported file is what was measured
    assert (run_dir / "report" / "report.html").is_file()
    # Each stage names the command that runs it alone; the end names the report.
    assert "distill train lcm/emoji_sd_lora max_train_steps=3 max_train_minutes=null" in result.output
    assert "lcd.anchor_weight=0 probe.every_steps=0" in result.output  # a short run skips the long-run settings
    assert "--baseline LCMScheduler@1" in result.output and "--cascade" in result.output
    assert f"distill export {run_dir}" in result.output
    assert f"report: {run_dir / 'report' / 'report.html'}" in result.output
