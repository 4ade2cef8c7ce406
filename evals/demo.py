"""`distill demo`: the whole story on the embedded teacher, offline: train -> export -> eval -> report.

Distils checkpoints/emoji-sd into an LCM-LoRA, exports it for plain diffusers, evaluates the teacher (its best
training-free sampler per step count among three), the exported LoRA, its control and one draft-then-refine
cascade on the same prompts and seeds, and writes the report. Each stage prints the command that runs it
on its own.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

import recipes
from evals.report import echo_summary
from evals.run import run_eval
from evals.settings import EvalSettings

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "lcm/emoji_sd_lora"
DEMO_TEACHER = ROOT / "checkpoints" / "emoji-sd"
# A smaller sweep than distill eval's default keeps the demo within its quarter of an hour on 2 CPU cores; these
# three were the strongest training-free samplers of the embedded teacher (DDIM and DPM-Solver++ at CFG 2, and the
# LCM scheduler without CFG). The cascade: the LoRA's 2-step draft refined by the teacher (2 DDIM steps, CFG 2).
# The config's long-run settings cost minutes a short run does not need: the anchors (solved once, ~4 min) keep
# runs of 760+ steps from drifting, and at 380 steps FD@4 was 237.4 with them, 239.0 without; the probe watches
# long runs. The demo leaves both out, and trains 200 steps (the config's S is 380), to keep its quarter of an hour:
# without the anchor the probe's 4-step KID was the same at 190 and 380 steps (68.5, 69.2; evals/results/lcm-long).
DEMO_SHORT_RUN = ("lcd.anchor_weight=0", "probe.every_steps=0")
DEMO_GAP_POINTS = 32  # half the eval's default: the teacher's ODE solves from 4 t cost ~1 min on a loaded machine
DEMO_BASELINES = ("DDIMScheduler:timestep_spacing=trailing@2", "DPMSolverMultistepScheduler@2", "LCMScheduler@1")


def run_demo(steps: int, num_samples: int, out: str | Path, minutes: float | None = None) -> Path:
    """Train `steps` steps (stopping early only if `minutes` run out), export, evaluate at `num_samples` images per
    row under `out`; returns the run folder."""
    from distill.export import export_run
    from distill.preflight import check_train

    started = time.monotonic()
    overrides = [f"max_train_steps={steps}", f"max_train_minutes={'null' if minutes is None else minutes}",
                 f"output_dir={Path(out) / 'runs'}", "run_name=demo",
                 "sample.every_steps=0", "resume_from_checkpoint=null", *DEMO_SHORT_RUN]
    _stage(1, f"distill train {DEMO_CONFIG} {' '.join(overrides)}")
    module, cfg = recipes.load(recipes.config_path(DEMO_CONFIG), overrides)
    check_train(cfg)  # the teacher's text encoder, the output folder, the disk: before 4 minutes of training
    run_dir = Path(module.main(cfg))
    _stage(2, f"distill export {run_dir} --out {run_dir / 'lora'}")
    lora = export_run(run_dir, run_dir / "lora")
    report_dir = run_dir / "report"
    cascade = f"{lora}@2+teacher@2:0.3:2"
    settings = EvalSettings(teacher=str(DEMO_TEACHER), out=str(report_dir), students=[str(lora)],
                            num_samples=num_samples, baselines=list(DEMO_BASELINES), cascades=[cascade],
                            consistency_gap=DEMO_GAP_POINTS)
    baselines = " ".join(f"--baseline {b}" for b in DEMO_BASELINES)
    _stage(3, f"distill eval --teacher {DEMO_TEACHER.relative_to(ROOT)} --student {lora} "
              f"--steps {','.join(map(str, settings.steps))} -n {num_samples} {baselines} --cascade {cascade} "
              f"--consistency-gap {DEMO_GAP_POINTS} --out {report_dir}")
    echo_summary(run_eval(settings), report_dir)
    minutes_taken = (time.monotonic() - started) / 60
    click.echo(f"demo done in {minutes_taken:.1f} min: LoRA {lora / 'pytorch_lora_weights.safetensors'}"
               f", samples {run_dir / 'samples' / 'final.png'}")
    return run_dir


def _stage(number: int, command: str) -> None:
    click.secho(f"\n[demo {number}/3] {command}", fg="cyan", err=True)
