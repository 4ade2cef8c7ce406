"""Adversarial diffusion distillation (ADD) and latent ADD (LADD): a 1-4 step generator from a guided teacher.

    distill train add/emoji_sd                    # ADD, full student, heads on frozen EfficientNet-Lite1
    distill train add/emoji_sd_ladd               # LADD: heads on the frozen teacher's own denoiser features
    python -m recipes.add recipes/configs/add/emoji_sd_lora.yaml add.lambda_distill=5

Sauer et al. 2023, "Adversarial Diffusion Distillation" (arXiv:2311.17042), and Sauer et al. 2024, "Fast
High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation" (arXiv:2403.12015). Neither paper
released training code; this file follows their text, with the choices it had to make said where they are made.

The student x_hat_theta(x_s, s, c) is initialised from the teacher and trained at ADD's student timesteps s in
{999, 749, 499, 249} on forward-noised data x_s = alpha_s x0 + sigma_s eps to predict x0 in one step, with

    L_G = L_adv^G(x_hat_theta) + lambda * c(t) * || x_hat_theta - sg(x_hat_psi(x_hat_theta,t, t)) ||^2

the adversarial term from trainable heads D_phi, and the distillation term from the frozen teacher psi with CFG at
a re-noised copy of the student's own sample (c(t) = alpha_t). The heads minimise the hinge loss on real vs
generated samples plus an R1 penalty on real ones.

add.variant = add: the heads read a frozen image network F (EfficientNet-Lite1 on the emoji teacher, never the
    eval's judge Lite0; DINOv2 ViT-S/14 on real teachers) on decoded, augmented images, conditioned on the text.
add.variant = ladd: the heads read the frozen teacher's own denoiser features at a noisy latent z_t, t drawn
    logit-normal (biased to high noise), conditioned on the text and t; nothing is decoded.

Real samples are the training latents decoded by the teacher's own VAE (ADD) or re-noised (LADD): the heads compare
what the generator can reach, not the VAE's reconstruction error it cannot fix. The student ships with the sampler
that matches its training: x0 prediction, then re-noising to the next student timestep (LCMScheduler on a grid of
len(student_timesteps), guidance 1), so 1, 2 and 4 steps visit 999 / 999, 499 / 999, 749, 499, 249.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from distill import engine, optim
from distill.augment import POLICIES, diff_augment
from distill.backbones import build_backbone, check_backbone
from distill.config import DataConfig, OptimConfig, SampleConfig, TrainConfig
from distill.consistency import inference_timesteps, lcm_sampler
from distill.discriminator import Heads
from distill.errors import ConfigError
from distill.images import save_grid
from distill.info import INFO_FILE, StudentInfo
from distill.latents import latent_batches
from distill.losses import add_distillation, hinge_fake, hinge_generator, hinge_real, r1_penalty
from distill.method import Method
from distill.sampling import sample_grid, student_rows
from distill.student import LCM_LORA_TARGETS, FullStudent, LoraStudent
from distill.teacher import Teacher


# ------------------------------------------------------------------------------------------------ config
@dataclass
class StudentConfig:
    kind: Literal["full", "lora"] = "full"
    lora_rank: int = 32  # lora: r
    lora_alpha: float | None = None  # lora: scale alpha / r; null: alpha = r
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LCM_LORA_TARGETS))
    gradient_checkpointing: bool = False


@dataclass
class DiscriminatorConfig:
    feature_network: str = "effnet-lite1"  # add: effnet-lite1 | dinov2[:<hub id>]; never effnet-lite0 (the judge)
    resolution: int = 64  # add: images are resized to this before F (DINOv2: 224)
    teacher_blocks: list[str] = field(default_factory=list)  # ladd: denoiser blocks read; [] = the family's default
    head_width: int = 64  # channels inside each head
    cmap_dim: int = 64  # width of the projection (text / noise-level embedding)
    learning_rate: float = 2.0e-4
    beta1: float = 0.0  # GAN practice (StyleGAN-T): no momentum for the discriminator
    beta2: float = 0.99
    r1_gamma: float = 1.0e-5  # gamma of the R1 penalty (gamma / 2 * ||grad||^2) on real samples; 0: off
    augment: list[str] = field(default_factory=lambda: ["color", "translation", "cutout"])  # add: DiffAugment


@dataclass
class AdversarialConfig:
    variant: Literal["add", "ladd"] = "add"
    student_timesteps: list[int] = field(default_factory=lambda: [999, 749, 499, 249])  # ADD's T_student, in the
    #   network's timestep units (a flow teacher's 1000 sigma: [1000, 750, 500, 250])
    student_timestep_weights: list[float] | None = None  # how often each student timestep is drawn; None: uniform
    lambda_distill: float = 2.5  # lambda of the distillation term; 0: adversarial only (LADD's default)
    distill_weighting: Literal["alpha", "uniform"] = "alpha"  # c(t) = alpha_t (ADD) or 1
    teacher_guidance_scale: float = 3.0  # CFG of the teacher's x0 in the distillation term
    teacher_t_min: int = 20  # teacher timesteps t ~ U[t_min, t_max] for the distillation term
    teacher_t_max: int = 980
    ladd_t_mean: float = 1.0  # ladd: discriminator noise t / T = sigmoid(N(mean, std)); mean > 0 favours high noise
    ladd_t_std: float = 1.0
    wrong_prompt_weight: float = 0.0  # share of the fake term given to real samples paired with another's prompt
    generator_every: int = 1  # the student steps on iterations i % generator_every == 0
    discriminator_every: int = 1  # the heads step on iterations i % discriminator_every == 0
    d_win_accuracy: float = 0.99  # the heads "win outright" when real and fake accuracy both reach this...
    d_win_patience: int = 200  # ...for this many discriminator iterations in a row: the run stops and says so


@dataclass
class AddRecipeConfig(TrainConfig):
    num_threads: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    add: AdversarialConfig = field(default_factory=AdversarialConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


CONFIG = AddRecipeConfig


def student_grid(timesteps: list[int], schedule) -> int:
    """N such that the timesteps are the trailing grid of N (999, 749, 499, 249 for N = 4), else a ConfigError. On a
    flow schedule any distinct timesteps in (0, T] do: the student's sampler is given its sigmas."""
    n, top = len(timesteps), schedule.num_train_timesteps
    if schedule.lcm_scheduler != "LCMScheduler" and n == len(set(timesteps)) and all(0 < t <= top for t in timesteps):
        return n
    if n and sorted(timesteps, reverse=True) == inference_timesteps(n, n, top).tolist():
        return n
    raise ConfigError(f"add.student_timesteps={timesteps} must be an evenly spaced trailing grid the sampler can "
                      f"visit, e.g. [999, 749, 499, 249] (4) or [999, 499] (2).")


def student_timestep_probs(a: AdversarialConfig) -> torch.Tensor | None:
    """Probabilities of the student timesteps, ordered as the descending grid (999 first); None when uniform."""
    if a.student_timestep_weights is None:
        return None
    pairs = sorted(zip(a.student_timesteps, a.student_timestep_weights), reverse=True)
    w = torch.tensor([float(x) for _, x in pairs])
    return w / w.sum()


def check(cfg: AddRecipeConfig, teacher: Teacher) -> None:
    a, d = cfg.add, cfg.discriminator
    if teacher.kind not in ("sd", "sdxl", "sd3", "flux"):
        raise ConfigError(f"The add recipe needs a text-conditioned SD, SDXL, SD3 or FLUX teacher; {cfg.teacher} is a "
                          f"{teacher.kind} pipeline.")
    student_grid(a.student_timesteps, teacher.schedule)
    w = a.student_timestep_weights
    if w is not None and (len(w) != len(a.student_timesteps) or min(w) < 0 or sum(w) <= 0):
        raise ConfigError(f"add.student_timestep_weights={w} needs one non-negative weight per student timestep "
                          f"({len(a.student_timesteps)}), not all zero, e.g. [2, 1, 1, 1].")
    if not 0 <= a.teacher_t_min <= a.teacher_t_max < teacher.num_train_timesteps:
        raise ConfigError(f"add.teacher_t_min={a.teacher_t_min} and add.teacher_t_max={a.teacher_t_max} must satisfy "
                          f"0 <= t_min <= t_max < {teacher.num_train_timesteps}.")
    if a.generator_every < 1 or a.discriminator_every < 1:
        raise ConfigError("add.generator_every and add.discriminator_every must be at least 1.")
    unknown = [p for p in d.augment if p not in POLICIES]
    if unknown:
        raise ConfigError(f"discriminator.augment has {unknown[0]!r}; choose from {', '.join(POLICIES)}.")
    if any(s > len(a.student_timesteps) for s in cfg.sample.steps):
        raise ConfigError(f"sample.steps {cfg.sample.steps} may not exceed the {len(a.student_timesteps)} student "
                          "timesteps.")


# ------------------------------------------------------------------------------------------------ method
class AdversarialDistillation(Method):
    """ADD/LADD's networks (student theta, heads phi), their optimizers, and one iteration of the algorithm."""

    name = "add"

    def __init__(self, cfg: AddRecipeConfig, device):
        super().__init__()
        self.cfg = cfg
        self.teacher = Teacher.from_pretrained(cfg.teacher, torch_dtype=engine.weight_dtype(cfg.mixed_precision),
                                               device=device)
        check(cfg, self.teacher)
        self.ladd = cfg.add.variant == "ladd"
        # The student's times on the teacher's schedule (the config gives the network's units: sigma x 1000 on flow)
        self.student_t = self.teacher.schedule.from_model_time(torch.tensor(sorted(cfg.add.student_timesteps,
                                                                                   reverse=True)))
        self.student_p = student_timestep_probs(cfg.add)
        self._build_student(cfg.student)
        self._build_discriminator(cfg.discriminator, device)
        self.optimizers["student"] = optim.from_config(self.online.trainable_parameters(), cfg.learning_rate,
                                                       cfg.optim, device)
        d = cfg.discriminator
        self.optimizers["discriminator"] = optim.make_optimizer(
            self.discriminator.parameters(), d.learning_rate, cfg.optim.weight_decay, (d.beta1, d.beta2),
            cfg.optim.eps, cfg.optim.use_8bit_adam, device)
        self.next_batch = latent_batches(cfg.data, self.teacher, cfg.train_batch_size, cfg.seed)
        self.wins = 0  # discriminator iterations in a row with both accuracies >= d_win_accuracy

    def _build_student(self, s: StudentConfig) -> None:
        if s.kind == "full":  # theta <- psi: a float32 copy of the teacher's UNet (no guidance input: CFG is baked in)
            self.online = FullStudent(self.teacher, time_cond_proj_dim=None)
        else:
            self.online = LoraStudent(self.teacher, s.lora_rank, s.lora_alpha, s.lora_target_modules, s.lora_dropout)
        self.online.train()
        if s.gradient_checkpointing:
            self.online.network.enable_gradient_checkpointing()
        self.modules["student"] = self.online

    def _build_discriminator(self, d: DiscriminatorConfig, device) -> None:
        """Frozen F (not a module of the method: no optimizer, not checkpointed) + trainable heads D_phi."""
        cond_dim = self.teacher.encode_prompt([""]).pooled().shape[-1]
        if self.ladd:
            self.blocks = d.teacher_blocks or list(self.teacher.family.default_feature_blocks)
            z = torch.zeros(1, *self.teacher.latent_shape(self.cfg.data.resolution), device=self.teacher.device)
            with torch.no_grad():
                maps = self.teacher.features(z.to(self.teacher.dtype), torch.tensor([500]), self.teacher.uncond(1),
                                             self.blocks)
            channels, self.feature_network = [m.shape[1] for m in maps], f"teacher:{self.cfg.teacher}"
        else:
            self.backbone = build_backbone(d.feature_network, d.resolution).to(device)
            channels, self.feature_network = self.backbone.channels, self.backbone.name
        heads = Heads(channels, cond_dim, d.head_width, d.cmap_dim, time_conditioned=self.ladd)
        self.modules["discriminator"] = heads.to(device)

    def optimizers_to_step(self, iteration: int) -> list[str]:
        a = self.cfg.add
        return [name for name, every in (("student", a.generator_every), ("discriminator", a.discriminator_every))
                if iteration % every == 0]

    def batch(self, generator):
        """(x0 = E(x), c) ~ D: training latents and their text conditioning."""
        return self.next_batch(generator)

    def step(self, batch, iteration: int, generator: torch.Generator) -> dict:
        teacher = self.teacher
        x0, c = batch
        device, b = x0.device, len(x0)
        stepping = self.optimizers_to_step(iteration)
        # 1. Student timestep s ~ U(T_student) (or the configured weights) and x_s = alpha_s x0 + sigma_s eps.
        if self.student_p is None:
            i = torch.randint(len(self.student_t), (b,), generator=generator)
        else:
            i = torch.multinomial(self.student_p, b, replacement=True, generator=generator)
        s = self.student_t[i].to(device)
        x_s = teacher.add_noise(x0, torch.randn(x0.shape, generator=generator).to(device), s)
        # 2. The student's one-step sample x_hat_theta = x0 prediction at (x_s, s).
        with torch.set_grad_enabled("student" in stepping), self.autocast():
            out = self.student(x_s, s, c)
        x_theta = teacher.to_x0_eps(out.float(), x_s, s)[0]
        # 3. What the heads read of the generated samples (F(decode(.)) or the teacher's features at a noisy latent),
        #    computed once: with gradient for the generator's loss, detached for the discriminator's.
        with torch.set_grad_enabled("student" in stepping):
            fake_maps, t_fake = self.features(x_theta, c, generator)
        losses = {}
        if "student" in stepping:
            losses.update(self.generator_losses(x_theta, fake_maps, t_fake, c, generator))
        if "discriminator" in stepping:
            fake_maps = [m.detach() for m in fake_maps]
            losses.update(self.discriminator_losses(x0, fake_maps, t_fake, c, generator))
        return losses

    def generator_losses(self, x_theta, fake_maps, t_fake, c, generator) -> dict:
        cfg, teacher = self.cfg.add, self.teacher
        # 4. L_adv^G = -D_phi(x_hat_theta): gradients reach the student through the frozen heads and features.
        with self.frozen_heads():
            logits = self.discriminator(fake_maps, c.pooled(), t_fake)
        out = {"g_adv": hinge_generator(logits).mean()}
        if cfg.lambda_distill:
            # 5. Re-noise the student's sample at a teacher timestep t, let the teacher with CFG predict x0, and pull
            #    the student's sample toward it: lambda c(t) ||x_hat_theta - sg(x_hat_psi)||^2.
            b, device = len(x_theta), x_theta.device
            t = torch.randint(cfg.teacher_t_min, cfg.teacher_t_max + 1, (b,), generator=generator)
            t = teacher.schedule.from_model_time(t).to(device)
            eps = torch.randn(x_theta.shape, generator=generator).to(device)
            x_theta_t = teacher.add_noise(x_theta.detach(), eps, t)
            with torch.no_grad(), self.autocast(), self.online.teacher_mode():
                guided = teacher.guided(x_theta_t.to(teacher.dtype), t, c, cfg.teacher_guidance_scale)
            x_psi = teacher.to_x0_eps(guided.float(), x_theta_t, t)[0]
            c_t = teacher.alpha_sigma(t, x_theta)[0].flatten() if cfg.distill_weighting == "alpha" else torch.ones(b)
            out["g_distill"] = cfg.lambda_distill * add_distillation(x_theta, x_psi, c_t.to(device)).mean()
        return out

    def discriminator_losses(self, x0, fake_maps, t_fake, c, generator) -> dict:
        cfg = self.cfg
        gamma = cfg.discriminator.r1_gamma
        # 6. L_D = E[max(0, 1 - D(x))] + E[max(0, 1 + D(x_hat_theta))] + gamma / 2 R1(x), R1 at the heads' inputs
        #    (the frozen network in front of them has nothing to regularise, and no double backward through it).
        with torch.no_grad():
            real_maps, t_real = self.features(x0, c, generator)
        real_maps = [m.float().requires_grad_(bool(gamma)) for m in real_maps]
        real = self.discriminator(real_maps, c.pooled(), t_real)
        fake = self.discriminator(fake_maps, c.pooled(), t_fake)
        w = cfg.add.wrong_prompt_weight  # a share of the fake term, so real and fake weigh the same in total
        out = {"d_real": hinge_real(real).mean(), "d_fake": (1 - w) * hinge_fake(fake).mean(),
               "d_acc_real": (real.detach().mean(1) > 0).float().mean(),
               "d_acc_fake": (fake.detach().mean(1) < 0).float().mean()}
        if gamma:
            grads = torch.autograd.grad(real.sum(), real_maps, create_graph=True)
            out["r1"] = gamma / 2 * r1_penalty(list(grads)).mean()
        if w:  # real samples with another sample's prompt are fakes too (SANA-Sprint): the heads must read the text
            shuffled = c.select(torch.roll(torch.arange(len(x0)), 1))
            wrong = self.discriminator([m.detach() for m in real_maps], shuffled.pooled(), t_real)
            out["d_wrong_prompt"] = w * hinge_fake(wrong).mean()
        self.track_wins(out)
        return out

    # -------------------------------------------------------------------------- what the heads read
    def features(self, latents, c, generator):
        """(feature maps, t or None) of latents: F(augment(decode(z))) for ADD, the teacher's blocks at z_t for LADD."""
        if not self.ladd:
            images = self.teacher.decode_latents(latents.to(self.teacher.dtype)).float()
            return self.backbone(diff_augment(images, self.cfg.discriminator.augment, generator)), None
        a = self.cfg.add
        u = a.ladd_t_mean + a.ladd_t_std * torch.randn(len(latents), generator=generator)
        t = (torch.sigmoid(u) * (self.teacher.num_train_timesteps - 1)).round()
        t = self.teacher.schedule.from_model_time(t).to(latents.device)
        z_t = self.teacher.add_noise(latents, torch.randn(latents.shape, generator=generator).to(latents.device), t)
        with self.autocast(), self.online.teacher_mode():
            maps = self.teacher.features(z_t.to(self.teacher.dtype), t, c, self.blocks)
        return maps, self.teacher.schedule.model_time(t).float()  # the heads embed the network's timestep units

    def frozen_heads(self):
        """The heads without parameter gradients: the generator's loss must not train them (one backward per step)."""
        return _no_param_grad(self.discriminator)

    def track_wins(self, out: dict) -> None:
        won = min(float(out["d_acc_real"]), float(out["d_acc_fake"])) >= self.cfg.add.d_win_accuracy
        self.wins = self.wins + 1 if won else 0

    def stop_reason(self, step: int, values: dict) -> str | None:
        patience = self.cfg.add.d_win_patience
        if patience and self.wins >= patience:
            return (f"the discriminator has won outright (real and fake accuracy >= {self.cfg.add.d_win_accuracy}) "
                    f"for {self.wins} iterations, so the student gets no useful gradient: lower "
                    "discriminator.learning_rate, raise discriminator.r1_gamma or add.discriminator_every")
        return None

    def autocast(self):
        dtype = engine.weight_dtype(self.cfg.mixed_precision)
        return torch.autocast(self.teacher.device.type, dtype=dtype, enabled=dtype != torch.float32)

    # ------------------------------------------------------------------------------------ outputs
    def student_info(self, step: int) -> StudentInfo:
        cfg, teacher, a = self.cfg, self.teacher, self.cfg.add
        local = Path(cfg.teacher).expanduser()
        n = len(a.student_timesteps)
        return StudentInfo(
            kind=cfg.student.kind, teacher=str(local.resolve()) if local.exists() else cfg.teacher,
            teacher_kind=teacher.kind, pipeline_class=type(teacher.pipe).__name__,
            prediction_type=teacher.prediction_type, teacher_guidance_scale=a.teacher_guidance_scale,
            method=a.variant, step=step, feature_network=self.feature_network, network=teacher.family.network_attr,
            pipeline_kwargs=teacher.family.call_kwargs(),
            sampler=lcm_sampler(n, 10.0, teacher.prediction_type, cfg.sample.guidance_scale or 1.0,
                                steps=[k for k in (1, 2, 4, 8) if k <= n], schedule=teacher.schedule,
                                times={k: self.student_times(k) for k in (1, 2, 4, 8) if k <= n}),
            details=dict(student_timesteps=sorted(a.student_timesteps, reverse=True),
                         student_timestep_weights=a.student_timestep_weights, lambda_distill=a.lambda_distill,
                         discriminator=self.feature_network, r1_gamma=cfg.discriminator.r1_gamma),
        )

    def student_times(self, steps: int) -> torch.Tensor:
        """The student times a `steps`-step sample visits: evenly spaced indices into the descending grid (LCMScheduler's
        rule: 999 / 999, 499 / 999, 749, 499, 249 on the VP grid of 4)."""
        n = len(self.student_t)
        return self.student_t[torch.floor(torch.arange(steps, dtype=torch.float64) * n / steps).long()]

    def save_student(self, folder: Path, step: int) -> None:
        self.online.save_weights(folder)
        self.student_info(step).save(folder)

    def save_samples(self, path: Path) -> None:
        cfg, student = self.cfg, self.online
        was_training = student.training
        student.eval()
        rows = student_rows(student, self.teacher, cfg.sample.prompts, cfg.sample.steps, cfg.seed,
                            guidance_scale=1.0, original_steps=len(self.student_t), resolution=cfg.data.resolution,
                            times={k: self.student_times(k) for k in cfg.sample.steps})
        student.train(was_training)
        save_grid(rows, path, labels=(cfg.sample.prompts, [f"student@{s}" for s in cfg.sample.steps]))

    def finish(self, folder: Path, step: int) -> None:
        cfg = self.cfg
        sample_grid(folder, cfg.sample.prompts, cfg.sample.steps, cfg.seed, folder / "samples" / "final.png",
                    teacher_steps=cfg.sample.teacher_steps, guidance_scale=cfg.sample.guidance_scale,
                    device=self.teacher.device)

    def check_resume(self, checkpoint: Path) -> None:
        fix = "set resume_from_checkpoint=null or another run_name"
        if not (checkpoint / "student" / INFO_FILE).is_file():
            raise ConfigError(f"Checkpoint {checkpoint} holds no student; {fix}.")
        saved, info = StudentInfo.load(checkpoint / "student"), self.student_info(0)
        mine = (info.kind, info.teacher, info.method, info.feature_network)
        theirs = (saved.kind, saved.teacher, saved.method, saved.feature_network)
        if mine != theirs:
            raise ConfigError(f"Checkpoint {checkpoint} holds a {saved.method} {saved.kind} student of {saved.teacher} "
                              f"(discriminator on {saved.feature_network}), this run trains a {info.method} "
                              f"{info.kind} student of {info.teacher} (on {info.feature_network}); {fix}.")


class _no_param_grad:
    """Context: a module's parameters do not require grad (gradients still flow through it to its inputs)."""

    def __init__(self, module: torch.nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def main(cfg: AddRecipeConfig) -> Path:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.add.variant == "add":
        check_backbone(cfg.discriminator.feature_network)  # before a run folder exists
    with engine.start_run(cfg) as run:  # a start that fails before training leaves no empty run folder
        method = AdversarialDistillation(cfg, run.device)
        engine.fit(run, method, engine.Loop.from_config(cfg))
    return run.dir


if __name__ == "__main__":
    import sys

    from distill.config import load_config

    main(load_config(sys.argv[1], AddRecipeConfig, sys.argv[2:]))
