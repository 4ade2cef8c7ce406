"""What a distillation method declares; `distill.engine.fit` runs any of them (FastGen's split of roles).

A method (one per recipe, written top to bottom in `recipes/<name>.py`) declares:

- `modules`: its named networks and states, e.g. {"student", "target", "discriminator", "fake_score", "ema"}.
  Each is checkpointed in its natural format (`distill.checkpoint`) and is an attribute: `self.student`.
  Those with trainable parameters are wrapped by accelerate (DDP/FSDP) before the first step.
- `optimizers`: named optimizers over those modules' parameters, e.g. {"student", "discriminator"}.
- `optimizers_to_step(iteration)`: which of them step on this iteration (two-time-scale updates: a
  discriminator stepping k times per generator step); the default is all of them, every iteration.
- `batch(generator)` and `step(batch, iteration, generator) -> {name: loss}`: one iteration's losses. Every loss
  that requires grad is summed and back-propagated; the rest are only logged. The generator is the iteration's
  own (seeded by seed, iteration and process), so a resumed run draws what an uninterrupted one would.
- `after_step(iteration, stepped)`: what follows the optimizer steps (EMA and target updates).
- `stop_reason(step, values)`: a sentence when training has failed and must stop (the engine itself stops on a
  loss that is NaN or infinite), naming what went wrong and what to change.
- `save_student(folder, step)`: the shippable student (weights + `student.json`), at checkpoints and the end.
- `save_samples(path)` and `finish(folder, step)`: grids during training and after it.
- `probe(step)`: a small quality measurement (lower "score" is better) the engine runs on a cadence, keeping the
  best student in `best/` and saying when quality stopped improving (`distill.watch`).

The engine owns everything else: run folder, resume, budget, accumulation, mixed precision, learning rates,
clipping, checkpoints, logging, progress and report.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class Method:
    name = "method"  # prefix of its logged scalars

    def __init__(self):
        self.modules: dict[str, Any] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def __getattr__(self, name: str):
        modules = self.__dict__.get("modules", {})
        if name in modules:
            return modules[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or module {name!r}")

    def optimizers_to_step(self, iteration: int) -> list[str]:
        return list(self.optimizers)

    def batch(self, generator: torch.Generator) -> Any:
        raise NotImplementedError

    def step(self, batch: Any, iteration: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, iteration: int, stepped: list[str]) -> None:
        """Called once per iteration after its optimizers stepped (not after accumulation micro-steps)."""

    def stop_reason(self, step: int, values: dict[str, float]) -> str | None:
        """Why the run must stop now (after `step` iterations, with this iteration's logged values), or None."""
        return None

    def save_student(self, folder: Path, step: int) -> None:
        """Write the shippable student into `folder` (nothing by default: e.g. a teacher-training method)."""

    def save_samples(self, path: Path) -> None:
        """Write a sample grid of the model in training to `path` (nothing by default)."""

    def probe(self, step: int) -> dict[str, float] | None:
        """A quality probe of the model in training, on the main process: {"score": lower is better, ...}; None: no
        probe. The engine calls it every `probe.every_steps`, logs it and keeps the best student in `best/`."""
        return None

    def finish(self, folder: Path, step: int) -> None:
        """After the last checkpoint, on the main process: final grids, extra files (nothing by default)."""

    def check_resume(self, checkpoint: Path) -> None:
        """Refuse (ConfigError) a checkpoint this method cannot go on from; called before anything is loaded."""

    def unwrapped(self, name: str):
        """The module itself, without the DDP/FSDP wrapper the engine may have put around it."""
        from accelerate.utils import extract_model_from_parallel

        module = self.modules[name]
        return extract_model_from_parallel(module) if isinstance(module, torch.nn.Module) else module

    def trainable(self) -> list[str]:
        """Modules with trainable parameters: the ones accelerate wraps and gradients reach."""
        return [name for name, module in self.modules.items() if isinstance(module, torch.nn.Module)
                and any(p.requires_grad for p in module.parameters())]
