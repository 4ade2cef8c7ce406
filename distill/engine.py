"""The training engine: one loop that runs every method (`distill.method.Method`), written once.

    run = engine.start_run(cfg)                     # numbered run folder (or the one resumed), seeded
    method = MyMethod(cfg, run.device)              # the recipe: teacher, student, losses, step
    engine.fit(run, method, engine.Loop.from_config(cfg))

`fit` owns accelerate (devices, mixed precision, DDP/FSDP/DeepSpeed through `accelerate launch`), resume from the
newest checkpoint, the step/time budget, gradient accumulation, the learning-rate schedule of every named
optimizer, clipping, which optimizers step on which iteration, checkpoints of every named module in its natural
format (plus optimizer, RNG and trainer state), sample grids, tensorboard (or any accelerate tracker), progress
with the binding budget and an ETA, and `report.json` (throughput, peak memory, losses). A run with stages (the
teacher's VAE, then its UNet) calls `fit` once per stage, each in its own sub-folder.
Multi-process runs share one run folder; only the main process writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from distill import runs
from distill.budget import Budget
from distill.checkpoint import load_module, save_module
from distill.errors import TrainingStopped
from distill.files import apply_umask
from distill.device import device_name, use_cpu
from distill.memory import peak_mb
from distill.optim import lr_multiplier
from distill.preemption import Preemption
from distill.progress import Progress
from distill.losslog import LossLog
from distill import start
from distill.watch import QualityWatch

# The run set-up lives in distill.start; recipes and tests reach it as engine.start_run / engine.Run.
Run, start_run, check_report_to = start.Run, start.start_run, start.check_report_to


@dataclasses.dataclass
class Loop:
    """How one stage trains: its budget, schedule, clipping and cadences."""

    max_steps: int
    max_minutes: float | None = None
    batch_size: int = 1  # per process and micro-step, for samples/s
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    lr_floor: float = 0.0
    max_grad_norm: float | None = None
    checkpointing_steps: int = 0  # 0: only the final checkpoint
    checkpoints_total_limit: int | None = 2
    sample_every: int = 0  # 0: no grids during training
    probe_every: int = 0  # 0: no quality probe (method.probe) during training
    probe_patience: int = 3  # probes without a new best before the run says quality stopped improving
    probe_stop: bool = False  # and stops then
    seed: int = 0
    report_to: str = "tensorboard"
    on_nonfinite: str = "stop"  # "stop": a NaN/inf loss or gradient ends the run; "skip": no update, counted

    @classmethod
    def from_config(cls, cfg, **overrides) -> Loop:
        """The loop of a `TrainConfig` (with its `optim` and `sample` blocks, where it has them)."""
        optim, sample, probe = (getattr(cfg, name, None) for name in ("optim", "sample", "probe"))
        values = dict(
            max_steps=cfg.max_train_steps, max_minutes=cfg.max_train_minutes, batch_size=cfg.train_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
            checkpointing_steps=cfg.checkpointing_steps, checkpoints_total_limit=cfg.checkpoints_total_limit,
            seed=cfg.seed, report_to=cfg.report_to, sample_every=sample.every_steps if sample else 0,
            on_nonfinite=getattr(cfg, "on_nonfinite", "stop"),
        )
        if probe is not None:
            values.update(probe_every=probe.every_steps, probe_patience=probe.patience,
                          probe_stop=probe.stop_on_plateau)
        if optim is not None:
            values.update(lr_schedule=optim.lr_schedule, lr_warmup_steps=optim.lr_warmup_steps,
                          lr_floor=optim.lr_floor, max_grad_norm=optim.max_grad_norm)
        return cls(**{**values, **overrides})


# ------------------------------------------------------------------------------------------- helpers
def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights (teacher, VAE, text encoders) are held in under mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def step_generator(seed: int, micro_batch: int) -> torch.Generator:
    """A CPU generator for one micro-batch of the whole job, numbered across processes and accumulation steps
    (`micro_batch_index`): draws depend on (seed, that number) only, so a resumed run repeats an uninterrupted one,
    processes draw different batches, and P processes draw exactly what one process with P-fold accumulation does."""
    return torch.Generator().manual_seed(seed * 1_000_003 + micro_batch)


def micro_batch_index(step: int, micro: int, accum: int, process: int, processes: int) -> int:
    """Micro-batch `micro` of iteration `step` on `process`: (step * accum + micro) * processes + process."""
    return (step * accum + micro) * processes + process


# ------------------------------------------------------------------------------------------------ the loop
def fit(run: Run, method, loop: Loop, stage: str | None = None) -> dict:
    """Train `method` in `run` (or its `stage` sub-folder) until the budget ends; return its report."""
    folder = run.dir / stage if stage else run.dir
    accelerator = _accelerator(run, loop)
    trainable = _prepare(accelerator, method)
    step, budget = _resume(accelerator, method, run, folder, loop)
    progress = Progress(stage or method.name, budget, accelerator, samples_per_step=_samples_per_step(accelerator, loop))
    watch = QualityWatch(folder, loop.probe_every, loop.probe_patience, loop.probe_stop, step)
    _say_where(accelerator, run, folder)
    if step >= loop.max_steps:
        accelerator.print(f"nothing to train: {folder} already reached max_train_steps={loop.max_steps} (to train "
                          "on, resume with a larger max_train_steps=... and allow_config_change=true)")
    losses, seconds, first_step, skipped = LossLog(), 0.0, step, 0
    with Preemption() as preempted:
        _probe(accelerator, method, watch, step, budget.minutes())  # step 0: the untrained control's score
        while not _finished(accelerator, budget, step):
            started = time.monotonic()
            stepped, values = _iteration(accelerator, method, trainable, loop, budget, step)
            seconds += time.monotonic() - started
            run.trained = True
            skip = _nonfinite(accelerator, method, folder, loop, values, step + 1)
            skipped += skip
            method.after_step(step, [] if skip else stepped)
            step += 1
            scores = {k: v for k, v in values.items() if not k.startswith(_NOT_SUMMARISED)}
            if not skip:  # a skipped step's NaN would poison the summary
                losses.add(scores)
            _log(accelerator, method, stage, values, step)
            _stop_if_failed(accelerator, method, folder, values, step)
            progress.update(step, **{k: v for k, v in scores.items() if "/" not in k})  # groups: logs only
            if _agree(accelerator, preempted.signal is not None):
                _stop_preempted(accelerator, method, run, folder, loop, budget, step, preempted.signal)
            _cadence(accelerator, method, run, folder, loop, budget, step)
            if _probe(accelerator, method, watch, step, budget.minutes()):
                budget.stopped_by = "the quality probe's plateau (probe.stop_on_plateau)"
                break
        progress.close()
        _checkpoint(accelerator, method, folder, loop, budget, step)
    report = {**_report(accelerator, loop, budget, step, first_step, seconds, losses), "skipped_nonfinite": skipped}
    if watch.summary():
        report["probe"] = watch.summary()
    if accelerator.is_main_process:
        method.save_student(folder / "student", step)
        apply_umask(folder / "student")
        (folder / "report.json").write_text(json.dumps(report, indent=2))
        method.finish(folder, step)
        accelerator.print(_closing_line(run, folder, step, budget))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


def _iteration(accelerator, method, trainable, loop: Loop, budget: Budget, step: int):
    """One optimizer iteration: `gradient_accumulation_steps` micro-steps, then the selected optimizers step. A
    NaN/inf loss or gradient is reported as values["nonfinite"] and no optimizer steps on it."""
    names = method.optimizers_to_step(step)
    accum, values, bad = loop.gradient_accumulation_steps, {}, None
    for micro in range(accum):
        index = micro_batch_index(step, micro, accum, accelerator.process_index, accelerator.num_processes)
        generator = step_generator(loop.seed, index)
        batch = method.batch(generator)
        with accelerator.accumulate(*trainable):
            _set_learning_rates(method, names, loop, step)
            out = method.step(batch, step, generator)
            bad = bad or _nonfinite_loss(out)
            total = sum(v for v in out.values() if torch.is_tensor(v) and v.requires_grad)
            if torch.is_tensor(total):  # even a NaN one: every process must join the gradient all-reduce
                accelerator.backward(total)
            for name in names:
                norm, bad = _clip_and_step(accelerator, method.optimizers[name], loop.max_grad_norm, name, bad)
                if norm is not None:
                    out[f"grad_norm_{name}"] = norm
            for optimizer in method.optimizers.values():  # no gradient leaks into another phase's step
                optimizer.zero_grad(set_to_none=True)
        for k, v in out.items():  # logged: the mean over the micro-steps that reported it
            value = float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)
            total, count = values.get(k, (0.0, 0))
            values[k] = (total + value, count + 1)
    values = {k: total / count for k, (total, count) in values.items()}
    if bad is not None:
        values["nonfinite"] = bad
    return names, values


def _nonfinite_loss(out: dict) -> str | None:
    for k, v in out.items():
        value = float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)
        if not math.isfinite(value):
            return f"the {k} loss is {value}"
    return None


def _clip_and_step(accelerator, optimizer, max_grad_norm: float | None, name: str, bad: str | None):
    """Clip (when asked) and step unless this iteration already failed or the gradient is NaN/inf (under fp16 the
    grad scaler handles an inf itself: it skips the step and lowers its scale). Returns (the norm before clipping,
    which is logged, or None mid-accumulation; the failure, if any)."""
    norm = None
    if accelerator.sync_gradients:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = accelerator.clip_grad_norm_(params, max_grad_norm or float("inf"))
        norm = norm.detach() if torch.is_tensor(norm) else norm
        if bad is None and norm is not None and not math.isfinite(float(norm)) and accelerator.scaler is None:
            bad = f"the gradient of the {name} optimizer's parameters is {float(norm)}"
        if _agree(accelerator, bad is not None) and bad is None:
            bad = "a loss or gradient on another process is NaN/inf"
    if bad is None:
        optimizer.step()
    return norm, bad


_NOT_SUMMARISED = ("grad_norm_", "nonfinite")  # logged every step, not averaged into the loss summary


def _nonfinite(accelerator, method, folder: Path, loop: Loop, values: dict, step: int) -> int:
    """1 if this step met a NaN/inf loss or gradient and was skipped (on_nonfinite=skip); with "stop", the run ends
    naming the step, the term and the last good checkpoint."""
    what = values.pop("nonfinite", None)
    if what is None:
        return 0
    if loop.on_nonfinite == "skip":
        values["nonfinite_skipped"] = 1.0
        accelerator.print(f"step {step}: {what}; the step was skipped (on_nonfinite=skip)")
        return 1
    _stop(accelerator, folder, step, f"{what} (on_nonfinite=skip would skip such steps)")


def _stop_if_failed(accelerator, method, folder: Path, values: dict, step: int) -> None:
    """Stop on the method's own `stop_reason`, in one sentence that names the step and the last good checkpoint."""
    reason = method.stop_reason(step, values)
    if reason is not None:
        _stop(accelerator, folder, step, reason)


def _stop(accelerator, folder: Path, step: int, reason: str) -> None:
    """Nothing is written over the last good checkpoint: the state now is the failed one."""
    found = runs.list_checkpoints(folder)
    last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written before it"
    accelerator.end_training()
    raise TrainingStopped(f"Training stopped at step {step}: {reason}; {last}.")


def _set_learning_rates(method, names: list[str], loop: Loop, step: int) -> None:
    """The schedule runs over max_train_steps (diffusers' convention): a wall-clock stop cuts it, never reshapes it."""
    scale = lr_multiplier(loop.lr_schedule, loop.lr_warmup_steps, min(1.0, step / loop.max_steps), step, loop.lr_floor)
    for name in names:
        for group in method.optimizers[name].param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * scale


def _finished(accelerator, budget: Budget, step: int) -> bool:
    """`budget.done(step)`, agreed by every process: their clocks differ a little, and one process leaving
    the loop alone would leave the others waiting in a gradient all-reduce."""
    return _agree(accelerator, budget.done(step))


def _agree(accelerator, flag: bool) -> bool:
    """True on every process when it is true on any."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _stop_preempted(accelerator, method, run: Run, folder: Path, loop: Loop, budget: Budget, step: int,
                    name: str | None) -> None:
    """Checkpoint now and exit 0 with the command that goes on (a preempted job is not a failed one)."""
    path = _checkpoint(accelerator, method, folder, loop, budget, step)
    accelerator.print(f"stopped by {name or 'a signal on another process'} at step {step}: checkpoint {path}; go on "
                      f"with: distill train --resume {run.dir}")
    accelerator.end_training()
    raise SystemExit(0)


def _cadence(accelerator, method, run: Run, folder: Path, loop: Loop, budget: Budget, step: int) -> None:
    if loop.checkpointing_steps and step % loop.checkpointing_steps == 0 and not budget.done(step):
        _checkpoint(accelerator, method, folder, loop, budget, step)  # the last one follows the loop
    if loop.sample_every and step % loop.sample_every == 0 and accelerator.is_main_process:
        method.save_samples(folder / "samples" / f"step-{step:07d}.png")


def _probe(accelerator, method, watch: QualityWatch, step: int, minutes: float) -> bool:
    """The quality probe when due (on the main process, the others wait); True when the run should stop."""
    if not watch.due(step):
        return False
    stop = watch.probe(accelerator, method, step, minutes) if accelerator.is_main_process else False
    accelerator.wait_for_everyone()
    return _agree(accelerator, stop)


def _log(accelerator, method, stage: str | None, values: dict, step: int) -> None:
    prefix = stage or method.name
    scalars = {f"{prefix}/{k}": v for k, v in values.items()}
    for name, optimizer in method.optimizers.items():
        scalars[f"{prefix}/lr_{name}"] = optimizer.param_groups[0]["lr"]
    accelerator.log(scalars, step=step)


# ------------------------------------------------------------------------------- accelerate and modules
def _accelerator(run: Run, loop: Loop):
    """One Accelerator per stage, so each stage's checkpoints hold only its own optimizers."""
    from accelerate import Accelerator

    trackers = None if loop.report_to == "none" else loop.report_to
    accelerator = Accelerator(cpu=use_cpu(), mixed_precision=loop.mixed_precision, log_with=trackers,
                              project_dir=str(run.dir),
                              gradient_accumulation_steps=loop.gradient_accumulation_steps)
    if trackers:
        accelerator.init_trackers("logs")
    return accelerator


def _prepare(accelerator, method) -> list:
    """Wrap trainable modules and every optimizer for accelerate; checkpoints hold every named module."""
    trainable = []
    for name in method.trainable():
        method.modules[name] = accelerator.prepare_model(method.modules[name])
        trainable.append(method.modules[name])
    for name, optimizer in method.optimizers.items():
        method.optimizers[name] = accelerator.prepare_optimizer(optimizer)

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            for name, module in method.modules.items():
                save_module(_unwrap(accelerator, module), Path(output_dir) / "modules" / name)
        weights.clear()  # accelerate would otherwise write the wrapped models again, flat

    def load(models, input_dir):
        for name, module in method.modules.items():
            load_module(_unwrap(accelerator, module), Path(input_dir) / "modules" / name, name)
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
    return trainable


def _unwrap(accelerator, module):
    return accelerator.unwrap_model(module) if isinstance(module, torch.nn.Module) else module


def _resume(accelerator, method, run: Run, folder: Path, loop: Loop) -> tuple[int, Budget]:
    """Load the stage's newest checkpoint when the run is resumed; write the run's config (only now: a resume that
    failed leaves the run's config as it was). Returns (step, budget) to go on from."""
    step, minutes = 0, 0.0
    checkpoint = _checkpoint_to_resume(run, folder)
    if checkpoint is not None:
        method.check_resume(checkpoint)
        accelerator.load_state(str(checkpoint))
        state = runs.read_state(checkpoint)
        step, minutes = state["step"], state.get("minutes", 0.0)
        accelerator.print(f"resumed from {checkpoint} (step {step})")
    if accelerator.is_main_process:
        _record_config(run, step)
    return step, Budget(loop.max_steps, loop.max_minutes, elapsed_before=minutes, start_step=step)


def _record_config(run: Run, step: int) -> None:
    """config.yaml says what the run was started with and is never rewritten; a resume that changed settings (allowed
    explicitly) writes its config and the list of changes beside it."""
    if not (run.dir / "config.yaml").is_file():
        runs.write_config(run.cfg, run.dir)
    elif run.changes:
        from distill.config import save_config

        path = save_config(run.cfg, run.dir / f"config.resumed-at-step-{step}.yaml")
        path.write_text("".join(f"# changed: {c}\n" for c in run.changes) + path.read_text())


def _checkpoint_to_resume(run: Run, folder: Path) -> Path | None:
    """The checkpoint the user named if it belongs to this stage, else the stage's newest one in a resumed run."""
    if run.resume is None:
        return None
    if run.resume.parent.parent == folder:
        return run.resume
    found = runs.list_checkpoints(folder)
    return found[-1] if found else None


def _checkpoint(accelerator, method, folder: Path, loop: Loop, budget: Budget, step: int) -> Path:
    def student(partial: Path) -> None:
        method.save_student(partial / "student", step)

    return runs.save_checkpoint(accelerator, folder, step, {"minutes": budget.minutes()},
                                loop.checkpoints_total_limit, write=student)


# ------------------------------------------------------------------------------------------- reporting
def _samples_per_step(accelerator, loop: Loop) -> int:
    return loop.batch_size * loop.gradient_accumulation_steps * accelerator.num_processes


def _report(accelerator, loop: Loop, budget: Budget, step: int, first_step: int, seconds: float,
            losses: LossLog) -> dict:
    steps_done = step - first_step
    memory_mb, memory_kind = peak_mb(accelerator.device)
    rate = steps_done / seconds if seconds else None
    return {
        "steps": step, "minutes": round(budget.minutes(), 2), "steps_this_session": steps_done,
        "device": device_name(accelerator.device), "processes": accelerator.num_processes,
        "device_hours": round(budget.minutes() / 60 * accelerator.num_processes, 4),
        "samples_seen": step * _samples_per_step(accelerator, loop),
        "steps_per_second": round(rate, 3) if rate else None,
        "samples_per_second": round(rate * _samples_per_step(accelerator, loop), 1) if rate else None,
        "peak_memory_mb": round(memory_mb), "peak_memory_kind": memory_kind,
        "mixed_precision": loop.mixed_precision,
        **losses.summary(),
    }


def _say_where(accelerator, run: Run, folder: Path) -> None:
    logs = f"tensorboard --logdir {run.dir / 'logs'}" if run.cfg.report_to != "none" else "no tracker (report_to=none)"
    accelerator.print(f"training in {folder}  |  logs: {logs}  |  sample grids: {folder / 'samples'}")


def _closing_line(run: Run, folder: Path, step: int, budget: Budget) -> str:
    cut = ""
    if step < budget.max_steps:
        why = budget.stopped_by or f"max_train_minutes={budget.max_minutes}"
        cut = (f" ({why} stopped it at step {step} of {budget.max_steps}: the learning-rate schedule was cut there, "
               "not compressed)")
    best = f"  |  best probed student: {folder / 'best'}" if (folder / "best").is_dir() else ""
    return (f"done: {step} steps, {budget.minutes():.1f} min{cut}  |  student: {folder / 'student'}{best}  |  "
            f"report: {folder / 'report.json'}  |  checkpoints: {folder / 'checkpoints'}  |  logs: {run.dir / 'logs'}")
