"""Latent consistency distillation (LCD) and LCM-LoRA: a 1-4 step student from a guided diffusion teacher.

    distill train recipes/configs/lcm/emoji_sd.yaml
    python -m recipes.lcm recipes/configs/lcm/emoji_sd_lora.yaml student.lora_rank=16
    accelerate launch --num_processes 2 -m recipes.lcm recipes/configs/lcm/sd15_lora.yaml

Luo et al. 2023, "Latent Consistency Models" (arXiv:2310.04378), its latent consistency distillation
algorithm (the loop's steps 1-6 follow its lines), and "LCM-LoRA" (arXiv:2311.05556), checked against
diffusers' `examples/consistency_distillation` scripts.
The student f_theta(z_t, omega, c, t) = c_skip(t) z_t + c_out(t) x0_theta is trained so that its
output at t_{n+k} matches the target network's output at t_n, one guided DDIM step of the teacher
(k = T/N timesteps) further along the same probability-flow ODE trajectory.

Guidance: LCM's omega is diffusers' guidance_scale - 1 (cond + omega (cond - uncond) = uncond + (omega + 1)
(cond - uncond)). `lcd.w_min`/`lcd.w_max` are omegas; the teacher runs at guidance_scale = 1 + omega, and a
full student is told omega through the embedding diffusers' LCM pipelines feed (`guidance_scale - 1`).

student.kind = full: a copy of the teacher's UNet with a guidance input, and an EMA target network.
student.kind = lora: LoRA adapters on the teacher's UNet, their own target (under no_grad) as LCM-LoRA, or
with `student.ema_decay` an EMA of the adapters (swapped in for the target pass, and the weights saved); the
teacher pass runs with the adapters disabled, so only one UNet is in memory.

The run folder ends with `student/` (LoRA weights in diffusers format, or the EMA UNet), `samples/`,
`logs/` (tensorboard), `checkpoints/` and `report.json`; `distill export` turns `student/` into a
diffusers artefact.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from distill import data as data_lib
from distill import engine
from distill.config import TrainConfig
from distill.consistency import DDIMSolver, consistency_output
from distill.errors import ConfigError
from distill.losses import l2, pseudo_huber
from distill.memory import peak_mb
from distill.progress import Progress
from distill.sampling import sample_grid, student_rows
from distill.student import (
    LCM_LORA_TARGETS, AdapterEMA, StudentInfo, adapters_disabled, add_lora, build_full_student, guidance_embedding,
    load_lora, predict, save_lora,
)
from distill.teacher import Teacher


@dataclass
class DataConfig:
    source: str = "emoji:32"  # any distill.data source: emoji[:32|64], a local folder/parquet/jsonl/csv, a hub id
    image_column: str = "image"
    caption_column: str = "caption"
    resolution: int = 32  # images are resized and centre-cropped to this square before encoding
    max_samples: int | None = None  # only the first N rows (smoke runs); null: all
    cache: bool = True  # encode every image and caption once up front (small, fixed data); false: per batch
    num_workers: int = 0  # DataLoader workers when not cached


@dataclass
class StudentConfig:
    kind: Literal["full", "lora"] = "lora"
    time_cond_proj_dim: int = 256  # full: width of the guidance-scale embedding (diffusers' LCD default)
    ema_decay: float | None = 0.95  # mu of theta^-: full: EMA target network (LCM); lora: EMA of the adapters, null = itself (LCM-LoRA)
    lora_rank: int = 64  # lora: r (LCM-LoRA)
    lora_alpha: float | None = None  # lora: scale alpha / r; null: alpha = r
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LCM_LORA_TARGETS))
    gradient_checkpointing: bool = False  # less memory, slower backward


@dataclass
class LcdConfig:
    num_ddim_timesteps: int = 50  # N solver timesteps of the teacher's T; skip k = T / N
    w_min: float = 2.0  # omega range, omega = diffusers guidance_scale - 1
    w_max: float = 14.0
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001  # pseudo-Huber c, element-wise
    timestep_scaling: float = 10.0  # s in c_skip / c_out (LCMScheduler's timestep_scaling)
    sigma_data: float = 0.5


@dataclass
class OptimConfig:
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1.0e-8
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit (CUDA only)
    max_grad_norm: float = 1.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = 500


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["grinning face", "dog face", "banana", "flag: France"])
    steps: list[int] = field(default_factory=lambda: [1, 2, 4])  # one grid column per step count
    every_steps: int = 500  # a grid into samples/ every so many steps; 0: only the final one
    teacher_steps: int | None = 50  # final grid: the teacher at this many steps beside the student; null: none
    guidance_scale: float | None = None  # pipeline guidance for the student; null: 1 + mid omega (full), 1 (lora)


@dataclass
class LcmConfig(TrainConfig):
    num_threads: int | None = None  # torch CPU threads; null leaves torch's default
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    lcd: LcdConfig = field(default_factory=LcdConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


CONFIG = LcmConfig  # `distill train` loads this recipe's YAML into it


def check(cfg: LcmConfig, teacher: Teacher) -> None:
    if teacher.kind not in ("sd", "sdxl"):
        raise ConfigError(
            f"The lcm recipe needs a text-conditioned SD or SDXL teacher; {cfg.teacher} is a {teacher.kind} pipeline."
        )
    if cfg.student.kind == "full" and cfg.student.ema_decay is None:
        raise ConfigError("A full student needs student.ema_decay (LCM's target network uses 0.95).")
    if cfg.student.ema_decay is not None and not 0 <= cfg.student.ema_decay < 1:
        raise ConfigError(f"student.ema_decay={cfg.student.ema_decay} must be in [0, 1).")
    if not 0 <= cfg.lcd.w_min <= cfg.lcd.w_max:
        raise ConfigError(f"lcd.w_min={cfg.lcd.w_min} and lcd.w_max={cfg.lcd.w_max} must satisfy 0 <= w_min <= w_max.")
    n = cfg.lcd.num_ddim_timesteps
    if not 1 <= n <= teacher.num_train_timesteps:
        raise ConfigError(f"lcd.num_ddim_timesteps={n} must be in [1, {teacher.num_train_timesteps}].")
    if any(not 1 <= s <= n for s in cfg.sample.steps):
        raise ConfigError(f"sample.steps {cfg.sample.steps} must each be in [1, lcd.num_ddim_timesteps={n}].")


def student_info(cfg: LcmConfig, teacher: Teacher, step: int) -> StudentInfo:
    omega = (cfg.lcd.w_min + cfg.lcd.w_max) / 2
    full = cfg.student.kind == "full"
    local = Path(cfg.teacher).expanduser()
    return StudentInfo(
        kind=cfg.student.kind, teacher=str(local.resolve()) if local.exists() else cfg.teacher,
        teacher_kind=teacher.kind, prediction_type=teacher.prediction_type,
        num_ddim_timesteps=cfg.lcd.num_ddim_timesteps, timestep_scaling=cfg.lcd.timestep_scaling,
        w_min=cfg.lcd.w_min, w_max=cfg.lcd.w_max, teacher_guidance_scale=1 + omega, step=step,
        guidance_scale=cfg.sample.guidance_scale or (1 + omega if full else 1.0),
    )


def save_student(folder: Path, student, target, info: StudentInfo, with_online: bool, ema=None) -> None:
    """LoRA: diffusers LoRA file (the adapters' EMA if there is one; the online adapters in `online/` in
    checkpoints). Full: the EMA target as `unet/` (the one to ship), the online net as `unet_online/` in
    checkpoints (to resume). Plus student.json."""
    if info.kind == "lora":
        with ema.applied() if ema else contextlib.nullcontext():
            save_lora(student, folder, info.teacher_kind)
        if ema and with_online:
            save_lora(student, folder / "online", info.teacher_kind)
    else:
        target.save_pretrained(folder / "unet", safe_serialization=True)
        if with_online:
            student.save_pretrained(folder / "unet_online", safe_serialization=True)
    info.save(folder)


def checkpoint_hooks(accelerator, target, info: StudentInfo, ema=None) -> None:
    """Checkpoints hold the student in diffusers format (exportable), not accelerate's flat state dict."""
    from diffusers import UNet2DConditionModel

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            save_student(Path(output_dir), accelerator.unwrap_model(models[0]), target, info, True, ema)
        weights.clear()

    def load(models, input_dir):
        student, saved = accelerator.unwrap_model(models.pop()), StudentInfo.load(input_dir)
        if (saved.kind, saved.teacher) != (info.kind, info.teacher):
            raise ConfigError(
                f"Checkpoint {input_dir} holds a {saved.kind} student of {saved.teacher}, but this run trains a "
                f"{info.kind} student of {info.teacher}; set resume_from_checkpoint=null or another run_name."
            )
        _check_resumable(Path(input_dir), saved, info, ema is not None)
        try:
            if info.kind == "lora":
                load_lora(student, input_dir, info.teacher_kind)
                if ema is not None:  # the shipped file holds the average; the online adapters sit beside it
                    ema.reset()
                    load_lora(student, Path(input_dir) / "online", info.teacher_kind)
                return
            for module, name in ((student, "unet_online"), (target, "unet")):
                module.load_state_dict(UNet2DConditionModel.from_pretrained(Path(input_dir) / name).state_dict())
        except RuntimeError as err:  # size mismatches
            raise ConfigError(
                f"Checkpoint {input_dir} does not fit this run's student (was student.lora_rank or "
                "time_cond_proj_dim changed?); set resume_from_checkpoint=null or another run_name."
            ) from err

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _check_resumable(folder: Path, saved: StudentInfo, info: StudentInfo, with_ema: bool) -> None:
    """ConfigError unless the checkpoint was trained on the same solver grid and, for LoRA, the same target."""
    fix = "set resume_from_checkpoint=null or another run_name"
    changed = [k for k in ("num_ddim_timesteps", "timestep_scaling") if getattr(saved, k) != getattr(info, k)]
    if changed:
        was = ", ".join(f"{k}={getattr(saved, k)}" for k in changed)
        raise ConfigError(f"Checkpoint {folder} was trained with {was}, this run uses other values; {fix}.")
    if info.kind == "lora" and (folder / "online").is_dir() != with_ema:
        raise ConfigError(f"Checkpoint {folder} was trained {'without' if with_ema else 'with'} an EMA of the "
                          f"adapters (student.ema_decay), this run {'with' if with_ema else 'without'}; {fix}.")


def batches(cfg: LcmConfig, teacher: Teacher, accelerator):
    """LCD's data step: D_z = {(z = E(x), c)}. Returns next_batch(generator) -> (z [B, C, h, w], Cond)."""
    table = data_lib.load_image_dataset(cfg.data.source, cfg.data.image_column, cfg.data.caption_column)
    if cfg.data.max_samples:
        table = table.select(range(min(cfg.data.max_samples, len(table))))
    items = data_lib.ImageCaptionDataset(table, cfg.data.resolution, cfg.data.image_column, cfg.data.caption_column,
                                         source=cfg.data.source)
    if cfg.data.cache:  # the emoji set: latents and text embeddings once, then random rows each step
        accelerator.print(f"encoding {len(items)} images and captions once ...")
        latents, conds = engine.encode_dataset(teacher, items, cfg.data.resolution)

        def cached(generator):
            idx = torch.randint(len(latents), (cfg.train_batch_size,), generator=generator)
            return latents[idx], conds.select(idx)  # a CPU index works on tensors on any device

        return cached
    loader = data_lib.make_dataloader(items, cfg.train_batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers)
    stream = engine.forever(accelerator.prepare(loader))

    def streamed(generator):
        row = next(stream)
        return engine.encode_batch(teacher, row["pixel_values"], list(row["caption"]), cfg.data.resolution)

    return streamed


def main(cfg: LcmConfig) -> Path:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    accelerator, run_dir, resume_from = engine.start_run(cfg, "lcm")
    accelerator.print(f"run folder: {run_dir}")
    device = accelerator.device

    # ------------------------------------------------------------------------------------ teacher
    # Frozen weights in the mixed-precision dtype; every trainable weight stays float32.
    teacher = Teacher.from_pretrained(cfg.teacher, torch_dtype=engine.weight_dtype(accelerator), device=device)
    check(cfg, teacher)
    solver = DDIMSolver(teacher.alphas_cumprod, cfg.lcd.num_ddim_timesteps)
    scalings = dict(sigma_data=cfg.lcd.sigma_data, timestep_scaling=cfg.lcd.timestep_scaling)
    distance = functools.partial(pseudo_huber, c=cfg.lcd.huber_c) if cfg.lcd.loss == "huber" else l2

    # ------------------------------------------------------------------------------------ student
    full = cfg.student.kind == "full"
    if full:  # theta: the teacher's UNet + a guidance input; theta^- <- theta
        student = build_full_student(teacher.unet, cfg.student.time_cond_proj_dim)
        target = copy.deepcopy(student).requires_grad_(False)
        params = list(student.parameters())
    else:  # LCM-LoRA: adapters on the teacher's own UNet, which is also its own target (used under no_grad)
        params = add_lora(teacher.unet, cfg.student.lora_rank, cfg.student.lora_alpha,
                          cfg.student.lora_target_modules, cfg.student.lora_dropout)
        student = target = teacher.unet
    ema = AdapterEMA(params, cfg.student.ema_decay) if not full and cfg.student.ema_decay is not None else None
    target_mode = ema.applied if ema else contextlib.nullcontext  # theta^- = the adapters' EMA, swapped in
    student.train()
    engine.gradient_checkpointing(student, cfg.student.gradient_checkpointing)
    optimizer = engine.make_optimizer(
        params, cfg.learning_rate, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps,
        cfg.optim.use_8bit_adam, device,
    )
    student, optimizer = accelerator.prepare(student, optimizer)
    online = accelerator.unwrap_model(student)
    teacher_mode = functools.partial(adapters_disabled, online) if not full else contextlib.nullcontext
    info = student_info(cfg, teacher, 0)
    checkpoint_hooks(accelerator, target, info, ema)
    next_batch = batches(cfg, teacher, accelerator)  # before the clock starts: max_train_minutes is training time
    step, budget = engine.resume(accelerator, cfg, run_dir, resume_from)

    # --------------------------------------------------------------------------------------- loop
    progress = Progress("lcm", cfg.max_train_steps, accelerator)
    accum, first_step, train_seconds, losses = cfg.gradient_accumulation_steps, step, 0.0, []
    micro, done = 0, engine.finished(accelerator, budget, step)
    while not done:
        started = time.monotonic()
        generator = engine.step_generator(cfg.seed, step * accum + micro, accelerator.process_index)
        micro = (micro + 1) % accum
        # 1. Sample (z, c) ~ D_z, an interval n ~ U{0..N-1} (t_{n+k} -> t_n) and omega ~ U[w_min, w_max].
        z, c = next_batch(generator)
        n = solver.sample_index(len(z), generator)
        t_n_k, t_n = solver.start(n).to(device), solver.end(n).to(device)
        w = cfg.lcd.w_min + (cfg.lcd.w_max - cfg.lcd.w_min) * torch.rand(len(z), generator=generator)
        w_embedding = guidance_embedding(w, online.config.time_cond_proj_dim).to(device) if full else None
        # 2. Forward process: z_{t_{n+k}} = alpha z + sigma eps.
        eps = torch.randn(z.shape, generator=generator).to(device)
        z_t_n_k = teacher.add_noise(z, eps, t_n_k)
        with accelerator.accumulate(student):
            engine.set_lr(optimizer, engine.learning_rate(cfg.learning_rate, cfg.optim.lr_schedule,
                                                          cfg.optim.lr_warmup_steps, budget, step))
            with torch.no_grad(), accelerator.autocast():
                # 3. Guided teacher step: z_hat_{t_n} = DDIM(z_{t_{n+k}}; (1 + omega) cond - omega uncond),
                #    conditional and unconditional passes as one batch.
                with teacher_mode():
                    out = teacher.guided(z_t_n_k, t_n_k, c, 1.0 + w)
                x0, eps_hat = teacher.to_x0_eps(out.float(), z_t_n_k, t_n_k)
                z_hat_t_n = solver.step(x0, eps_hat, n)
                #    Target f_{theta^-}(z_hat_{t_n}, omega, c, t_n), boundary-scaled at t_n.
                with target_mode():
                    out = predict(target, z_hat_t_n, t_n, c, w_embedding)
                x0 = teacher.to_x0_eps(out.float(), z_hat_t_n, t_n)[0]
                f_target = consistency_output(z_hat_t_n, x0, t_n, **scalings)
            # 4. L = d(f_theta(z_{t_{n+k}}, omega, c, t_{n+k}), f_{theta^-}(z_hat_{t_n}, omega, c, t_n)).
            out = predict(student, z_t_n_k, t_n_k, c, w_embedding)
            x0 = teacher.to_x0_eps(out.float(), z_t_n_k, t_n_k)[0]
            f_online = consistency_output(z_t_n_k, x0, t_n_k, **scalings)
            loss = distance(f_online, f_target).mean()
            # 5. theta <- theta - eta grad L.
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        train_seconds += time.monotonic() - started
        if not accelerator.sync_gradients:
            continue
        # 6. theta^- <- mu theta^- + (1 - mu) theta (LCM-LoRA without an EMA: the target is the student itself).
        if full:
            engine.ema_update_(target, online, cfg.student.ema_decay)
        elif ema:
            ema.update()
        step += 1
        done = engine.finished(accelerator, budget, step)
        losses.append(loss.item())
        lr = optimizer.param_groups[0]["lr"]
        progress.update(step, loss=losses[-1], lr=lr, minutes=budget.minutes())
        accelerator.log({"lcm/loss": losses[-1], "lcm/lr": lr}, step=step)
        if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0 and not done:  # the last one follows
            info.step = step
            engine.checkpoint(accelerator, run_dir, step, budget, cfg.checkpoints_total_limit)
        if cfg.sample.every_steps and step % cfg.sample.every_steps == 0 and accelerator.is_main_process:
            with target_mode():
                save_samples(cfg, teacher, target, info, run_dir / "samples" / f"step-{step:07d}.png")
    progress.close()

    # --------------------------------------------------------------------------------------- save
    info.step = step
    engine.checkpoint(accelerator, run_dir, step, budget, cfg.checkpoints_total_limit)
    if accelerator.is_main_process:
        save_student(run_dir / "student", online, target, info, False, ema)
        steps_done = step - first_step
        memory_mb, memory_kind = peak_mb(device)
        report = {
            "steps": step, "minutes": round(budget.minutes(), 2), "steps_this_session": steps_done,
            "steps_per_second": round(steps_done / train_seconds, 3) if train_seconds else None,
            "samples_per_second": round(steps_done * cfg.train_batch_size * accum * accelerator.num_processes
                                        / train_seconds, 1) if train_seconds else None,
            "peak_memory_mb": round(memory_mb), "peak_memory_kind": memory_kind,
            "loss_first_50": _mean(losses[:50]), "loss_last_50": _mean(losses[-50:]),
            "loss_by_tenth": [_mean(losses[i * len(losses) // 10:(i + 1) * len(losses) // 10]) for i in range(10)],
        }
        (run_dir / "report.json").write_text(json.dumps(report, indent=2))
        # The final grid goes through plain diffusers, from the saved student: what a user will load.
        sample_grid(run_dir, cfg.sample.prompts, cfg.sample.steps, cfg.seed, run_dir / "samples" / "final.png",
                    teacher_steps=cfg.sample.teacher_steps, guidance_scale=cfg.sample.guidance_scale, device=device)
        accelerator.print(f"student written to {run_dir / 'student'} ({json.dumps(report)})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def save_samples(cfg: LcmConfig, teacher: Teacher, unet, info: StudentInfo, path: Path) -> None:
    """A grid from the student in memory (toolkit sampler): prompts x sample.steps."""
    was_training = unet.training
    unet.eval()  # LoRA dropout off
    rows = student_rows(unet, teacher, cfg.sample.prompts, cfg.sample.steps, cfg.seed,
                        guidance_scale=info.guidance_scale, original_steps=cfg.lcd.num_ddim_timesteps,
                        timestep_scaling=cfg.lcd.timestep_scaling, resolution=cfg.data.resolution)
    unet.train(was_training)
    engine.save_grid(rows, path)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


if __name__ == "__main__":
    import sys

    from distill.config import load_config

    main(load_config(sys.argv[1], LcmConfig, sys.argv[2:]))
