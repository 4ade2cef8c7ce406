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

For long runs (issue: quality that rises with the budget, then holds):
- `lcd.anchor_weight`: every interval is also regressed onto the teacher's ODE solution from points on its own
  trajectories, solved once before training on a finer grid (`distill.trajectories`; CTM's regression term), so
  intervals n > 0 stay tied to the teacher instead of only to the student's own target.
- `student.ship_ema_decay`: a slow average of the weights ships (and is sampled and probed), while theta^- stays
  LCM's fast target.
- `probe.every_steps` with `data.holdout_rows`: KID of a few hundred samples (on EfficientNet-Lite1, not the
  judge), and the consistency loss on held-out vs training rows; the engine keeps the best student in `best/`.

The engine (`distill.engine`) runs the loop; this file is the method: its networks, its optimizer, and one
iteration, numbered after the paper's algorithm. The run folder ends with `student/` (LoRA weights in diffusers
format, or the EMA UNet, with the LCMScheduler spec it samples with), `samples/`, `logs/`, `checkpoints/` and
`report.json`; `distill export` turns `student/` into a diffusers artefact.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from distill import engine, optim
from distill.backbones import check_backbone
from distill.config import DataConfig, OptimConfig, ProbeConfig, SampleConfig, TrainConfig
from distill.consistency import DDIMSolver, check_pinned_timesteps, consistency_output, lcm_sampler, pinned_sigmas
from distill.ema import AdapterEMA, ema_update_
from distill.device import process_state
from distill.errors import ConfigError
from distill.images import save_grid
from distill.info import INFO_FILE, StudentInfo
from distill.latents import latent_data, real_images
from distill.losses import l2, pseudo_huber
from distill.losslog import group_means
from distill.method import Method
from distill.probe import PooledFeatures, kid
from distill.sampling import lcm_sample, sample_grid, student_rows
from distill.trajectories import Trajectories, solve_trajectories
from distill.student import LCM_LORA_TARGETS, FullStudent, LoraStudent
from distill.teacher import Teacher


# ------------------------------------------------------------------------------------------------ config
@dataclass
class StudentConfig:
    kind: Literal["full", "lora"] = "lora"
    time_cond_proj_dim: int | None = 256  # full: width of the guidance-scale embedding (diffusers' LCD default); null:
    #   no guidance input, the guidance is baked in (a transformer teacher: SD3, FLUX)
    ema_decay: float | None = 0.95  # mu of theta^-: full: EMA target network (LCM); lora: EMA of the adapters, null = itself (LCM-LoRA)
    lora_rank: int = 64  # lora: r (LCM-LoRA)
    lora_alpha: float | None = None  # lora: scale alpha / r; null: alpha = r
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LCM_LORA_TARGETS))
    gradient_checkpointing: bool = False  # less memory, slower backward
    ship_ema_decay: float | None = None  # a second, slow EMA (e.g. 0.999) that ships and is probed; null: theta^- ships


@dataclass
class LcdConfig:
    num_ddim_timesteps: int = 50  # N solver timesteps of the teacher's T; skip k = T / N
    w_min: float = 2.0  # omega range, omega = diffusers guidance_scale - 1
    w_max: float = 14.0
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001  # pseudo-Huber c, element-wise
    timestep_scaling: float = 10.0  # s in c_skip / c_out (LCMScheduler's timestep_scaling)
    sigma_data: float = 0.5
    anchor_weight: float = 0.0  # lambda_a of the trajectory anchor d(f_theta(z_t on the teacher's ODE), its end); 0: off
    anchor_trajectories: int = 1024  # M teacher ODE trajectories solved once before training (training captions)
    anchor_solve_steps: int = 50  # DDIM steps of those solves: the anchor's ceiling is the teacher at this many steps


@dataclass
class LcmSampleConfig(SampleConfig):
    timesteps: dict[int, list[int]] | None = None  # {steps: timesteps} the shipped sampler visits at that step count
    #   (points of the N grid, in the network's timesteps: 1000 sigma on a flow teacher; probe, grids and exports use
    #   them); null / unnamed counts: the consistency sampler's even spacing

    def __post_init__(self):  # the shape at load time; `check` puts the points on the grid once the teacher loads
        if self.timesteps:
            try:
                check_pinned_timesteps(self.timesteps, None, "sample.timesteps")
            except ValueError as err:
                raise ConfigError(str(err)) from None


@dataclass
class LcmConfig(TrainConfig):
    num_threads: int | None = None  # torch CPU threads; null leaves torch's default
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    lcd: LcdConfig = field(default_factory=LcdConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: LcmSampleConfig = field(default_factory=LcmSampleConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


CONFIG = LcmConfig  # `distill train` loads this recipe's YAML into it


def check_probe(cfg: LcmConfig) -> None:
    """The probe's settings, before a run folder exists."""
    if not cfg.probe.every_steps:
        return
    check_backbone(cfg.probe.feature_net, "probe.feature_net")
    if not cfg.data.holdout_rows:
        raise ConfigError("probe.every_steps needs held-out rows for its captions and held-out loss: set "
                          "data.holdout_rows (e.g. 256), or probe.every_steps=0.")


def nested(schedule, n: int, m: int) -> bool:
    """Whether the n-point solver grid lies on the m-point grid (VP: m a multiple of n; flow: m - 1 of n - 1)."""
    coarse, fine = schedule.grid(n).double(), schedule.grid(m).double()
    return bool(torch.isclose(coarse[:, None], fine[None], atol=1e-6).any(1).all())


def check(cfg: LcmConfig, teacher: Teacher) -> None:
    if teacher.kind not in ("sd", "sdxl", "sd3", "flux"):
        raise ConfigError(f"The lcm recipe needs a text-conditioned SD, SDXL, SD3 or FLUX teacher; {cfg.teacher} is "
                          f"a {teacher.kind} pipeline.")
    if cfg.student.kind == "full" and cfg.student.time_cond_proj_dim and teacher.family.network_attr != "unet":
        raise ConfigError(f"student.time_cond_proj_dim={cfg.student.time_cond_proj_dim} asks for a guidance input, "
                          f"which only a UNet has; the {teacher.kind} teacher's is a transformer: set "
                          "student.time_cond_proj_dim=null (the guidance is then baked in, as a LoRA's).")
    if cfg.student.kind == "full" and cfg.student.ema_decay is None:
        raise ConfigError("A full student needs student.ema_decay (LCM's target network uses 0.95).")
    for key in ("ema_decay", "ship_ema_decay"):
        value = getattr(cfg.student, key)
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"student.{key}={value} must be in [0, 1), or null.")
    if not 0 <= cfg.lcd.w_min <= cfg.lcd.w_max:
        raise ConfigError(f"lcd.w_min={cfg.lcd.w_min} and lcd.w_max={cfg.lcd.w_max} must satisfy 0 <= w_min <= w_max.")
    n = cfg.lcd.num_ddim_timesteps
    if not 1 <= n <= teacher.num_train_timesteps:
        raise ConfigError(f"lcd.num_ddim_timesteps={n} must be in [1, {teacher.num_train_timesteps}].")
    if cfg.lcd.anchor_weight < 0 or cfg.lcd.anchor_trajectories < 1:
        raise ConfigError(f"lcd.anchor_weight={cfg.lcd.anchor_weight} must be >= 0 and lcd.anchor_trajectories="
                          f"{cfg.lcd.anchor_trajectories} at least 1.")
    if cfg.lcd.anchor_weight and not nested(teacher.schedule, n, max(1, cfg.lcd.anchor_solve_steps)):
        fits = next(m for m in range(5 * n, 50 * n) if nested(teacher.schedule, n, m))
        raise ConfigError(f"lcd.anchor_solve_steps={cfg.lcd.anchor_solve_steps} does not put the solver's "
                          f"lcd.num_ddim_timesteps={n} timesteps on the anchor's grid; use e.g. {fits}.")
    if any(not 1 <= s <= n for s in [*cfg.sample.steps, *([cfg.probe.steps] if cfg.probe.every_steps else [])]):
        raise ConfigError(f"sample.steps {cfg.sample.steps} and probe.steps {cfg.probe.steps} must each be in "
                          f"[1, lcd.num_ddim_timesteps={n}].")
    pinned_times(cfg, teacher)


def named_grid(solver: DDIMSolver) -> list[int]:
    """The solver's grid (ascending) in the network's timesteps, as logs and sample.timesteps name its points."""
    return solver.schedule.model_time(solver.timesteps).round().long().tolist()  # a flow teacher's: 1000 sigma


def pinned_times(cfg: LcmConfig, teacher: Teacher) -> dict[int, list[int]]:
    """sample.timesteps, checked against the student's grid in the network's timesteps (a flow teacher's: 1000 sigma,
    rounded, as FlowMatch schedulers number them)."""
    if not cfg.sample.timesteps:
        return {}
    grid = named_grid(DDIMSolver(teacher.schedule, cfg.lcd.num_ddim_timesteps))
    try:
        return check_pinned_timesteps(cfg.sample.timesteps, grid, "sample.timesteps")
    except ValueError as err:
        raise ConfigError(str(err)) from None


# ------------------------------------------------------------------------------------------------ method
class LatentConsistencyDistillation(Method):
    """LCD's networks (theta, theta^-), its optimizer, and one iteration of its algorithm."""

    name = "lcm"

    def __init__(self, cfg: LcmConfig, device, run_dir: Path | None = None):
        super().__init__()
        self.cfg, self.run_dir = cfg, run_dir
        # Teacher: frozen weights in the mixed-precision dtype; every trainable weight stays float32.
        self.teacher = Teacher.from_pretrained(cfg.teacher, torch_dtype=engine.weight_dtype(cfg.mixed_precision),
                                               device=device)
        check(cfg, self.teacher)
        self.pinned = pinned_times(cfg, self.teacher)  # sample.timesteps, on the grid: what ships, probes and grids
        self.solver = DDIMSolver(self.teacher.schedule, cfg.lcd.num_ddim_timesteps)
        width = len(str(self.teacher.num_train_timesteps - 1))
        self.interval_names = {n: f"interval/t{t:0{width}d}" for n, t in enumerate(named_grid(self.solver))}
        self.scalings = dict(sigma_data=cfg.lcd.sigma_data, timestep_scaling=cfg.lcd.timestep_scaling,
                             schedule=self.teacher.schedule)
        self.distance = functools.partial(pseudo_huber, c=cfg.lcd.huber_c) if cfg.lcd.loss == "huber" else l2
        self._build_student(cfg.student)
        self.optimizers["student"] = optim.from_config(self.online.trainable_parameters(), cfg.learning_rate,
                                                       cfg.optim, device)
        self.data = latent_data(cfg.data, self.teacher, cfg.train_batch_size, cfg.seed)
        self.real_features = None  # the probe's reference, computed at its first call
        self.anchors = self._solve_anchors() if cfg.lcd.anchor_weight else None

    def _build_student(self, s: StudentConfig) -> None:
        if s.kind == "full":  # theta: the teacher's UNet + a guidance input; theta^- <- theta
            self.online = FullStudent(self.teacher, s.time_cond_proj_dim)
            self.modules.update(student=self.online, target=self.online.frozen_copy())
        else:  # LCM-LoRA: adapters on the teacher's own UNet, their own target (under no_grad) or their EMA
            self.online = LoraStudent(self.teacher, s.lora_rank, s.lora_alpha, s.lora_target_modules, s.lora_dropout)
            self.modules.update(student=self.online)
            if s.ema_decay is not None:
                self.modules["ema"] = AdapterEMA(self.online.trainable_parameters(), s.ema_decay)
        if s.ship_ema_decay is not None:  # consistency-model practice: a fast target to train, a slow average to ship
            self.modules["ship"] = (self.online.frozen_copy() if s.kind == "full" else
                                    AdapterEMA(self.online.trainable_parameters(), s.ship_ema_decay))
        self.online.train()
        if s.gradient_checkpointing:
            self.online.network.enable_gradient_checkpointing()

    def target_mode(self):
        """theta^- in place: the EMA target network (full), the adapters' EMA swapped in, or the student itself."""
        return self.ema.applied() if "ema" in self.modules else contextlib.nullcontext()

    @contextlib.contextmanager
    def shipped(self):
        """The network that ships (and is sampled and probed): the slow EMA when there is one, else theta^-."""
        if "ship" not in self.modules:
            with self.target_mode():
                yield self.theta_minus
        elif isinstance(self.modules["ship"], AdapterEMA):
            with self.modules["ship"].applied():
                yield self.online
        else:
            yield self.modules["ship"]

    @property
    def theta_minus(self):
        return self.modules.get("target", self.online)

    def batch(self, generator):
        """LCD's data: (z = E(x), c) ~ D_z."""
        return self.data.next_batch(generator)

    def _solve_anchors(self):
        """The teacher's guided ODE trajectories from M noises for M training captions, z kept on the solver grid."""
        cfg, generator = self.cfg.lcd, torch.Generator().manual_seed(self.cfg.seed + 1)
        m = cfg.anchor_trajectories
        batches = [self.data.next_batch(generator) for _ in range(-(-m // self.cfg.train_batch_size))]
        cond = batches[0][1]
        for _, more in batches[1:]:
            cond = cond.cat(more)
        cond = cond.select(torch.arange(m))
        noise = torch.randn((m, *self.teacher.latent_shape(self.cfg.data.resolution)), generator=generator)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(m, generator=generator)
        # Kept in the run folder: a resume loads them instead of solving again (the key says what made them).
        path = self.run_dir / "anchors.safetensors" if self.run_dir else None
        key = json.dumps([m, cfg.anchor_solve_steps, cfg.w_min, cfg.w_max, cfg.num_ddim_timesteps, self.cfg.seed,
                          self.cfg.data.resolution, self.cfg.data.holdout_rows])
        found = Trajectories.load(path, key, cond) if path else None
        if found is not None:
            return found
        with self.online.teacher_mode():
            anchors = solve_trajectories(self.teacher, cond, noise, 1.0 + w, self.solver.timesteps,
                                         cfg.anchor_solve_steps, show=True)
        if path and process_state().is_main_process:
            anchors.save(path, key)
        return anchors

    def step(self, batch, iteration: int, generator: torch.Generator) -> dict:
        d, n = self.distance_to_target(*batch, generator, self.student)
        out = {"loss": d.mean()}
        if self.anchors is not None:  # every interval tied to the teacher's ODE, not only n = 0
            out["anchor"] = self.cfg.lcd.anchor_weight * self.anchor_distance(generator).mean()
        # Logged, not trained on: the loss of each interval, named by its start t_{n+k} (which part of t still moves).
        return {**out, **group_means(d.detach(), n, self.interval_names)}

    def anchor_distance(self, generator: torch.Generator) -> torch.Tensor:
        """d(f_theta(z_t, omega, c, t), x0_ODE) [B] at points z_t on the teacher's cached trajectories (CTM's
        regression term): the student's one-step map against the teacher's ODE solution from the same point."""
        z_t, t, x0_ode, c, guidance = self.anchors.draw(self.cfg.train_batch_size, generator)
        device = self.teacher.device
        z_t, t, x0_ode = z_t.to(device), t.to(device), x0_ode.to(device)
        omega = (guidance - 1.0).to(device) if self.online.guidance_dim else None
        with self.autocast():
            out = self.student(z_t, t, c.to(device=device), omega)
        x0 = self.teacher.to_x0_eps(out.float(), z_t, t)[0]
        return self.distance(consistency_output(z_t, x0, t, **self.scalings), x0_ode)

    def distance_to_target(self, z, c, generator: torch.Generator, student) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-4 of the algorithm: per-sample d(f_theta(z_{t_{n+k}}), f_{theta^-}(z_hat_{t_n})) [B], and n [B]."""
        cfg, teacher, solver = self.cfg, self.teacher, self.solver
        device = z.device
        # 1. Sample an interval n ~ U{0..N-1} (t_{n+k} -> t_n) and omega ~ U[w_min, w_max].
        n = solver.sample_index(len(z), generator)
        t_n_k, t_n = solver.start(n).to(device), solver.end(n).to(device)
        w = cfg.lcd.w_min + (cfg.lcd.w_max - cfg.lcd.w_min) * torch.rand(len(z), generator=generator)
        omega = w.to(device) if self.online.guidance_dim else None
        # 2. Forward process: z_{t_{n+k}} = alpha z + sigma eps.
        eps = torch.randn(z.shape, generator=generator).to(device)
        z_t_n_k = teacher.add_noise(z, eps, t_n_k)
        with torch.no_grad(), self.autocast():
            # 3. Guided teacher step: z_hat_{t_n} = DDIM(z_{t_{n+k}}; (1 + omega) cond - omega uncond),
            #    conditional and unconditional passes as one batch.
            with self.online.teacher_mode():
                out = teacher.guided(z_t_n_k, t_n_k, c, 1.0 + w)
            x0, eps_hat = teacher.to_x0_eps(out.float(), z_t_n_k, t_n_k)
            z_hat_t_n = solver.step(x0, eps_hat, n)
            #    Target f_{theta^-}(z_hat_{t_n}, omega, c, t_n), boundary-scaled at t_n.
            with self.target_mode():
                out = self.theta_minus(z_hat_t_n, t_n, c, omega)
            x0 = teacher.to_x0_eps(out.float(), z_hat_t_n, t_n)[0]
            f_target = consistency_output(z_hat_t_n, x0, t_n, **self.scalings)
        # 4. L = d(f_theta(z_{t_{n+k}}, omega, c, t_{n+k}), f_{theta^-}(z_hat_{t_n}, omega, c, t_n)), per sample;
        #    `step` averages it over the batch. (5. theta <- theta - eta grad L is the engine's optimizer step.)
        with self.autocast():
            out = student(z_t_n_k, t_n_k, c, omega)
        x0 = teacher.to_x0_eps(out.float(), z_t_n_k, t_n_k)[0]
        f_online = consistency_output(z_t_n_k, x0, t_n_k, **self.scalings)
        return self.distance(f_online, f_target), n

    def autocast(self):
        """bf16/fp16 autocast for the forward passes when the run asks for mixed precision."""
        dtype = engine.weight_dtype(self.cfg.mixed_precision)
        return torch.autocast(self.teacher.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def after_step(self, iteration: int, stepped: list[str]) -> None:
        # 6. theta^- <- mu theta^- + (1 - mu) theta (LCM-LoRA without an EMA: the target is the student itself).
        if "target" in self.modules:
            ema_update_(self.target.network, self.online.network, self.cfg.student.ema_decay)
        elif "ema" in self.modules:
            self.ema.update()
        if "ship" in self.modules:  # the slow average, warmed up as diffusers' EMAModel: min(mu, (1 + i) / (10 + i))
            mu = min(self.cfg.student.ship_ema_decay, (1 + iteration) / (10 + iteration))
            if isinstance(self.ship, AdapterEMA):
                self.ship.decay = mu
                self.ship.update()
            else:
                ema_update_(self.ship.network, self.online.network, mu)

    # ------------------------------------------------------------------------------------ probe
    @torch.no_grad()
    def probe(self, step: int) -> dict[str, float] | None:
        """KID of `probe.num_samples` samples at `probe.steps` (held-out captions) against real images on a frozen
        network that is not the judge, and the loss on held-out vs as many fixed training rows (a gap: over-fitting)."""
        if not self.cfg.probe.every_steps:
            return None
        student = self.unwrapped("student")
        losses = {}
        for name, (z, c, _) in (("holdout_loss", self.data.holdout), ("train_loss", self.data.train_subset)):
            d, _ = self.distance_to_target(z, c, torch.Generator().manual_seed(self.cfg.seed), student)
            losses[name] = float(d.mean())
        real = self._real_features()
        return {"score": kid(real, self.probe_net(self._probe_images())), **losses}

    def _probe_images(self) -> torch.Tensor:
        cfg = self.cfg
        _, cond, _ = self.data.holdout
        rows = torch.arange(cfg.probe.num_samples) % len(cond)
        generator, images = torch.Generator().manual_seed(cfg.seed), []
        with self.shipped() as student:
            was_training = student.training
            student.eval()
            for chunk in rows.split(64):
                images.append(lcm_sample(student, self.teacher, cond.select(chunk), cfg.probe.steps, generator,
                                         guidance_scale=self.student_info(0).guidance_scale,
                                         original_steps=cfg.lcd.num_ddim_timesteps, times=self._times(),
                                         timestep_scaling=cfg.lcd.timestep_scaling, resolution=cfg.data.resolution))
            student.train(was_training)
        return torch.cat(images).clamp(-1, 1)

    def _real_features(self) -> torch.Tensor:
        if self.real_features is None:
            self.probe_net = PooledFeatures(self.cfg.probe.feature_net, self.cfg.probe.feature_resolution)
            self.probe_net.to(self.teacher.device)
            self.real_features = self.probe_net(real_images(self.cfg.data, 1024))
        return self.real_features

    # ------------------------------------------------------------------------------------ outputs
    def student_info(self, step: int) -> StudentInfo:
        cfg, teacher = self.cfg, self.teacher
        omega = (cfg.lcd.w_min + cfg.lcd.w_max) / 2
        local = Path(cfg.teacher).expanduser()
        guidance = cfg.sample.guidance_scale or (1 + omega if cfg.student.kind == "full" else 1.0)
        return StudentInfo(
            kind=cfg.student.kind, teacher=str(local.resolve()) if local.exists() else cfg.teacher,
            teacher_kind=teacher.kind, pipeline_class=type(teacher.pipe).__name__,
            prediction_type=teacher.prediction_type, teacher_guidance_scale=1 + omega, method="lcm", step=step,
            sampler=self._sampler(guidance), network=teacher.family.network_attr,
            pipeline_kwargs=teacher.family.call_kwargs(),
            details=dict(num_ddim_timesteps=cfg.lcd.num_ddim_timesteps, timestep_scaling=cfg.lcd.timestep_scaling,
                         w_min=cfg.lcd.w_min, w_max=cfg.lcd.w_max),
        )

    def _sampler(self, guidance: float):
        """The sampler that ships: the consistency sampler of the N grid, pinned to sample.timesteps where given."""
        cfg, teacher = self.cfg, self.teacher
        spec = lcm_sampler(cfg.lcd.num_ddim_timesteps, cfg.lcd.timestep_scaling, teacher.prediction_type, guidance,
                           schedule=teacher.schedule)
        if self.pinned:  # a pinned step count is one the student is made for, also outside the default 1/2/4/8
            spec.steps = sorted({*spec.steps, *self.pinned})
            if spec.sigmas is not None:  # a flow pipeline is called with sigmas
                spec.sigmas.update(pinned_sigmas(teacher.schedule, cfg.lcd.num_ddim_timesteps, [], self._times()))
            else:
                spec.timesteps = {str(k): v for k, v in self.pinned.items()}
        return spec

    def _times(self) -> dict:
        """{steps: schedule times [steps]} of sample.timesteps (a flow teacher's sigmas: the grid's own points, not the
        rounded timesteps / 1000), for the toolkit's own sampler (probe, grids)."""
        named = named_grid(self.solver)
        return {k: self.solver.timesteps[[named.index(t) for t in v]] for k, v in self.pinned.items()}

    def save_student(self, folder: Path, step: int) -> None:
        """What ships: the EMA target UNet (full), or the adapters (their EMA when there is one), + student.json."""
        with self.shipped() as student:
            student.save_weights(folder)
        self.student_info(step).save(folder)

    def save_samples(self, path: Path) -> None:
        """A grid from the target in memory (toolkit sampler): prompts x sample.steps."""
        cfg = self.cfg
        with self.shipped() as student:
            was_training = student.training
            student.eval()  # LoRA dropout off
            rows = student_rows(student, self.teacher, cfg.sample.prompts, cfg.sample.steps, cfg.seed,
                                guidance_scale=self.student_info(0).guidance_scale,
                                original_steps=cfg.lcd.num_ddim_timesteps, times=self._times(),
                                timestep_scaling=cfg.lcd.timestep_scaling, resolution=cfg.data.resolution)
            student.train(was_training)
        save_grid(rows, path)

    def finish(self, folder: Path, step: int) -> None:
        """The final grid goes through plain diffusers, from the saved student: what a user will load."""
        cfg = self.cfg
        sample_grid(folder, cfg.sample.prompts, cfg.sample.steps, cfg.seed, folder / "samples" / "final.png",
                    teacher_steps=cfg.sample.teacher_steps, guidance_scale=cfg.sample.guidance_scale,
                    device=self.teacher.device)

    def check_resume(self, checkpoint: Path) -> None:
        """A checkpoint of another student, solver grid or target kind cannot be continued: say which."""
        fix = "set resume_from_checkpoint=null or another run_name"
        if not (checkpoint / "student" / INFO_FILE).is_file():
            raise ConfigError(f"Checkpoint {checkpoint} holds no LCM student; {fix}.")
        saved, info = StudentInfo.load(checkpoint / "student"), self.student_info(0)
        if (saved.kind, saved.teacher) != (info.kind, info.teacher):
            raise ConfigError(f"Checkpoint {checkpoint} holds a {saved.kind} student of {saved.teacher}, but this run "
                              f"trains a {info.kind} student of {info.teacher}; {fix}.")
        changed = [k for k in ("num_ddim_timesteps", "timestep_scaling") if saved.details.get(k) != info.details[k]]
        if changed:
            was = ", ".join(f"{k}={saved.details.get(k)}" for k in changed)
            raise ConfigError(f"Checkpoint {checkpoint} was trained with {was}, this run uses other values; {fix}.")
        with_ema, had_ema = "ema" in self.modules, (checkpoint / "modules" / "ema").is_dir()
        if (checkpoint / "modules" / "ship").is_dir() != ("ship" in self.modules):
            raise ConfigError(f"Checkpoint {checkpoint} and this run differ in student.ship_ema_decay (one has the slow "
                              f"shipped average, the other not); {fix}.")
        if info.kind == "lora" and had_ema != with_ema:
            raise ConfigError(f"Checkpoint {checkpoint} was trained {'with' if had_ema else 'without'} an EMA of the "
                              f"adapters (student.ema_decay), this run {'with' if with_ema else 'without'}; {fix}.")


def main(cfg: LcmConfig) -> Path:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    check_probe(cfg)
    with engine.start_run(cfg) as run:  # a start that fails before training leaves no empty run folder
        method = LatentConsistencyDistillation(cfg, run.device, run.dir)
        engine.fit(run, method, engine.Loop.from_config(cfg))
    return run.dir


if __name__ == "__main__":
    import sys

    from distill.config import load_config

    main(load_config(sys.argv[1], LcmConfig, sys.argv[2:]))
