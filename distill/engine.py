"""Training plumbing every distillation recipe shares, so that a recipe file only holds its algorithm.

Run set-up (numbered folder, resolved config, accelerate with tensorboard, resume), the optimizer
(AdamW, or bitsandbytes' 8-bit AdamW), the learning-rate schedule, gradient checkpointing, an EMA of
weights, data encoded once (latents + text embeddings) or per batch, per-step random generators that
make a resumed run draw what an uninterrupted one would, and sample grids.
Multi-process runs (`accelerate launch --num_processes N`) share one run folder; only the main process writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from distill import runs
from distill.budget import Budget, warmup_cosine
from distill.errors import ConfigError
from distill.teacher import Cond, Teacher


# ------------------------------------------------------------------------------------------- run set-up
def start_run(cfg, project: str):
    """(accelerator, run_dir, checkpoint or None): a new numbered run folder, or the one being resumed.

    The main process picks the folder; the others are told its path. Tensorboard logs go to `<run_dir>/logs/`.
    `resume` writes the config once the checkpoint (if any) has loaded.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import broadcast_object_list, set_seed

    set_seed(cfg.seed)  # initial weights drawn from the global generator (LoRA's A, new layers) follow the seed
    state = PartialState()
    paths = [None, None]
    if state.is_main_process:
        run_dir, checkpoint = runs.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir, cfg.run_name)
        run_dir = run_dir or runs.new_run_dir(cfg.output_dir, cfg.run_name)
        paths = [str(run_dir), None if checkpoint is None else str(checkpoint)]
    run_dir, checkpoint = broadcast_object_list(paths)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard", project_dir=run_dir,
    )
    accelerator.init_trackers("logs")
    return accelerator, Path(run_dir), None if checkpoint is None else Path(checkpoint)


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype frozen weights (teacher, VAE, text encoders) are held in under mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def resume(accelerator, cfg, run_dir: Path, checkpoint: Path | None) -> tuple[int, Budget]:
    """Load `checkpoint` (after `accelerator.prepare`), write the run's `config.yaml`, and return
    (step, budget) to go on from (cfg.max_train_steps / max_train_minutes, minutes already spent included)."""
    step, minutes = 0, 0.0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = runs.read_state(checkpoint)
        step, minutes = state["step"], state.get("minutes", 0.0)
        accelerator.print(f"resumed from {checkpoint} (step {step})")
    if accelerator.is_main_process:
        runs.write_config(cfg, run_dir)  # only now: a resume that failed leaves the run's config as it was
    return step, Budget(cfg.max_train_steps, cfg.max_train_minutes, elapsed_before=minutes)


def finished(accelerator, budget: Budget, step: int) -> bool:
    """`budget.done(step)`, agreed by every process: their clocks differ a little, and one process leaving
    the loop alone would leave the others waiting in a gradient all-reduce."""
    done = budget.done(step)
    if accelerator.num_processes == 1:
        return done
    flag = torch.tensor([float(done)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def checkpoint(accelerator, run_dir: Path, step: int, budget: Budget, total_limit: int | None) -> Path:
    return runs.save_checkpoint(accelerator, run_dir, step, {"minutes": budget.minutes()}, total_limit)


def step_generator(seed: int, step: int, process_index: int = 0) -> torch.Generator:
    """A CPU generator for one training step: draws depend on (seed, step, process) only, so a resumed
    run repeats an uninterrupted one and processes draw different batches."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + process_index)


# ------------------------------------------------------------------------------------------ optimisation
def make_optimizer(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                   use_8bit: bool = False, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' AdamW8bit (optimizer states in 8 bits) when `use_8bit`."""
    params = [p for p in params if p.requires_grad]
    if not use_8bit:
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
    if torch.device(device).type != "cuda":
        raise ConfigError(
            f"8-bit AdamW (optim.use_8bit_adam) runs on CUDA GPUs only and this run is on {device}; "
            "set optim.use_8bit_adam=false."
        )
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ConfigError(
            "8-bit AdamW (optim.use_8bit_adam) needs bitsandbytes, which is not installed: "
            "`pip install 'distill[bnb]'`, or set optim.use_8bit_adam=false."
        ) from err
    return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)


def learning_rate(base: float, schedule: str, warmup_steps: int, budget: Budget, step: int) -> float:
    """Linear warm-up, then constant (`constant`) or cosine to zero over the budget (`cosine`)."""
    floor = 1.0 if schedule == "constant" else 0.0
    return base * warmup_cosine(budget.progress(step), step, warmup_steps, floor=floor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def gradient_checkpointing(unet, enabled: bool) -> None:
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    if enabled:
        unet.enable_gradient_checkpointing()
    elif getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()


@torch.no_grad()
def ema_update_(target, online, decay: float) -> None:
    """target <- decay * target + (1 - decay) * online, parameter by parameter (in place).

    target, online: two modules with the same parameters, or two lists of tensors (e.g. LoRA adapters).
    """
    t_params, o_params = [list(m.parameters()) if isinstance(m, torch.nn.Module) else list(m)
                          for m in (target, online)]
    if len(t_params) != len(o_params):
        raise ValueError("EMA target and online model have different parameters.")
    torch._foreach_lerp_(t_params, [p.detach().to(q.dtype) for p, q in zip(o_params, t_params)], 1.0 - decay)


# ---------------------------------------------------------------------------------------------- data
@torch.no_grad()
def encode_batch(teacher: Teacher, pixel_values: Tensor, captions: list[str], resolution: int) -> tuple[Tensor, Cond]:
    """(latents [B, C, h, w], Cond) for a batch of images in [-1, 1] and their captions (posterior means)."""
    latents = teacher.encode_images(pixel_values.to(teacher.device))
    return latents.float(), teacher.encode_prompt(captions, resolution)


@torch.no_grad()
def encode_dataset(teacher: Teacher, items, resolution: int, batch_size: int = 64) -> tuple[Tensor, Cond]:
    """Every row of a fixed dataset encoded once: latents [N, C, h, w] (float32) and a Cond of N rows.

    `items` yields {"pixel_values", "caption"} (distill.data.ImageCaptionDataset). Kept on the teacher's device.
    """
    latents, conds = [], []
    for start in range(0, len(items), batch_size):
        rows = [items[i] for i in range(start, min(start + batch_size, len(items)))]
        z, cond = encode_batch(teacher, torch.stack([r["pixel_values"] for r in rows]), [r["caption"] for r in rows],
                               resolution)
        latents.append(z)
        conds.append(cond)
    cond = conds[0]
    for more in conds[1:]:
        cond = cond.cat(more)
    return torch.cat(latents), cond


def forever(loader) -> Iterator:
    """Batches from `loader`, epoch after epoch (a DataLoader re-shuffles each epoch)."""
    while True:
        yield from loader


# -------------------------------------------------------------------------------------------- outputs
def save_grid(rows: list[list], path: str | Path) -> Path:
    """Write PIL images as a PNG grid, one list per row (rows of equal length); small images are
    upscaled (nearest) to at least 128 px so that a 32 px emoji can be looked at."""
    from distill.images import grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = [image for row in rows for image in row]
    grid(flat, rows=len(rows), scale=max(1, 128 // flat[0].size[0])).save(path)
    return path
