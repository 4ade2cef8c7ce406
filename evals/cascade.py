"""Hybrid cascades (SDEdit / img2img): a fast student drafts, the teacher refines.

    runs/002-lcm-emoji_sd_lora@4+teacher@2:0.5      student 4 steps, re-noise to strength 0.5, teacher 2 steps
    runs/002-lcm-emoji_sd_lora@4+teacher@2:0.5:7.5  ... with the teacher's CFG scale 7.5

Strength is StableDiffusionImg2ImgPipeline's: with N inference steps and strength s the pipeline sets the
scheduler to N steps, re-noises the image latents with `scheduler.add_noise` to the first of the last
int(N s) timesteps and runs those. Here the user gives the steps actually run, m, so N = round(m / s) and the
refine runs the last m of the N timesteps (the pipeline's `get_timesteps` whenever int(N s) = m; otherwise
the strength actually used is m / N, recorded as `effective_strength`). s = 0 means no refinement.

The refiner is the teacher as `models.load_teacher` builds its few-step baseline (DDIM, trailing spacing, no
clipping). The re-noising noise is drawn from each sample's own generator after the student's draws, so
sample i is the same alone or in any batch. `CascadeCandidate` is a `models.Candidate` (its `model` is the
teacher's, which decodes), with `encode` / `denoise` of the same shape as `models.encode` / `models.denoise`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field

import torch

from distill.cond import Cond
from distill.errors import ConfigError, ModelError
from evals import models

SPEC_FORM = "STUDENT@k+teacher@m:s (or STUDENT@k+teacher@m:s:g, g the teacher's CFG scale)"
_SPEC = re.compile(r"^(?P<student>.+)@(?P<k>[^@+]*)\+teacher@(?P<m>[^:]*):(?P<s>[^:]*)(?::(?P<g>[^:]*))?$")


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class CascadeSpec:
    """Student source (a path), its steps k, the teacher's refine steps m, strength s in [0, 1], CFG scale g."""

    student: str
    k: int
    m: int
    strength: float
    guidance: float | None = None

    @property
    def refines(self) -> bool:
        return self.strength > 0

    @property
    def schedule_steps(self) -> int:
        """N = round(m / s): the teacher's schedule, of which the refine runs the last m steps (0: no refine)."""
        return round(self.m / self.strength) if self.refines else 0

    def tail(self) -> str:
        """Everything after the student's source: "@k+teacher@m:s[:g]"."""
        g = "" if self.guidance is None else f":{self.guidance:g}"
        return f"@{self.k}+teacher@{self.m}:{self.strength:g}{g}"

    def __str__(self) -> str:
        return self.student + self.tail()


def parse_cascade(spec: str) -> CascadeSpec:
    """`STUDENT@k+teacher@m:s[:g]` -> CascadeSpec; a ConfigError naming the expected form otherwise."""
    found = _SPEC.match(str(spec).strip())
    if found is None:
        raise ConfigError(f"Cascade {spec!r} is not of the form {SPEC_FORM}; write it that way, "
                          "e.g. runs/lcm@4+teacher@2:0.5.")
    k = _count(found["k"], "student steps k", spec)
    m = _count(found["m"], "teacher steps m", spec)
    s = _number(found["s"], "strength s", spec)
    if not 0 <= s <= 1:
        raise ConfigError(f"Cascade {spec!r} has strength s = {found['s']}, outside [0, 1]; in {SPEC_FORM} "
                          "s is the fraction of the teacher's schedule re-run (0: no refinement).")
    g = None if found["g"] is None else _number(found["g"], "guidance g", spec)
    if g is not None and g < 1:
        raise ConfigError(f"Cascade {spec!r} has guidance g = {found['g']} below 1; in {SPEC_FORM} "
                          "g is a CFG scale >= 1 (1: no CFG).")
    return CascadeSpec(found["student"], k, m, s, g)


def _count(text: str, what: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"Cascade {spec!r} has {what} = {text!r}, not a whole number >= 1; write {SPEC_FORM}.")
    return int(text)


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"Cascade {spec!r} has {what} = {text!r}, not a finite number; write {SPEC_FORM}.")
    return value


# ------------------------------------------------------------------------------------------- candidate
@dataclass
class CascadeCond:
    """The student's and the teacher's conditioning of one batch (one object when they share a text encoder)."""

    student: Cond
    teacher: Cond

    def __len__(self) -> int:
        return len(self.teacher)


@dataclass(eq=False, kw_only=True)
class CascadeCandidate(models.Candidate):
    """A student at k steps whose draft the teacher re-noises to strength s and finishes in m steps.

    Use it as any candidate at `steps = cascade.steps` (= k). `model` is the teacher's (it decodes);
    `student` and `teacher` are the two candidates it runs (the teacher: DDIM trailing, at guidance g).
    """

    spec: CascadeSpec
    student: models.Candidate
    teacher: models.Candidate
    _shared: bool | None = field(default=None, init=False, repr=False)

    @classmethod
    def build(cls, spec: CascadeSpec, student: models.Candidate, teacher: models.Candidate) -> CascadeCandidate:
        """From a loaded student and the teacher's few-step baseline (`models.load_teacher(...)[1]`)."""
        if spec.guidance is not None:
            teacher = dataclasses.replace(teacher, guidance_scale=float(spec.guidance))
        _check(spec, student, teacher)
        n = spec.schedule_steps
        how = (f"re-noised to strength {spec.strength:g}, finished by the teacher in the last {spec.m} of "
               f"{n} {teacher.scheduler_name} steps" if spec.refines else "no refinement (strength 0)")
        metadata = {"student": student.source, "student_steps": spec.k, "refine_steps": spec.m,
                    "strength": spec.strength, "teacher_schedule_steps": n,
                    "effective_strength": spec.m / n if n else 0.0, "student_guidance_scale": student.guidance_scale}
        return cls(name=student.name + spec.tail(), role="cascade", kind="cascade", source=str(spec),
                   model=teacher.model, scheduler_cls=teacher.scheduler_cls,
                   scheduler_config=teacher.scheduler_config, guidance_scale=teacher.guidance_scale,
                   description=f"{student.description}, {spec.k} steps; {how}", metadata=metadata,
                   spec=spec, student=student, teacher=teacher)

    @property
    def steps(self) -> int:
        return self.spec.k

    @property
    def cfg(self) -> bool:
        return self.teacher.cfg if self.spec.refines else self.student.cfg

    @property
    def guidance_input(self) -> bool:
        return self.student.guidance_input

    @property
    def scheduler_name(self) -> str:
        if not self.spec.refines:
            return self.student.scheduler_name
        return f"{self.student.scheduler_name} + {self.teacher.scheduler_name}"

    def label(self, steps: int | None = None) -> str:
        self._check_steps(steps)
        return self.name

    def nfe(self, steps: int | None = None) -> int:
        """Student NFE at k plus the teacher's at m (doubled by its CFG)."""
        self._check_steps(steps)
        return self.student.nfe(self.spec.k) + (self.teacher.nfe(self.spec.m) if self.spec.refines else 0)

    @property
    def shared_text_encoder(self) -> bool:
        """True when the student's text encoder(s) and tokenizer(s) are the teacher's (a LoRA, an export of it)."""
        if self._shared is None:
            self._shared = _same_text_encoders(self.student.model, self.teacher.model)
        return self._shared

    def encode(self, prompts: list[str]) -> CascadeCond:
        """Both conditionings, encoded once when the text encoder is shared (caches the teacher's uncond)."""
        student = models.encode(self.student, prompts)
        if not self.spec.refines:
            return CascadeCond(student, student)
        if self.shared_text_encoder:
            if self.teacher.cfg:
                self.teacher.model.uncond(1)
            return CascadeCond(student, student)
        return CascadeCond(student, models.encode(self.teacher, prompts))

    def denoise(self, steps: int | None, cond: CascadeCond | Cond, noise: torch.Tensor,
                generators: list[torch.Generator]) -> torch.Tensor:
        """`models.denoise`'s signature; `cond`: a CascadeCond, or one Cond when the text encoder is shared."""
        self._check_steps(steps)
        if not isinstance(cond, CascadeCond):
            if self.spec.refines and not self.shared_text_encoder:
                raise ValueError(f"{self.name}: the student's text encoder differs from the teacher's; pass the "
                                 "CascadeCond that CascadeCandidate.encode returns.")
            cond = CascadeCond(cond, cond)
        return denoise_cascade(self, cond.student, cond.teacher, noise, generators)

    def _check_steps(self, steps: int | None) -> None:
        if steps is not None and steps != self.spec.k:
            raise ValueError(f"{self.name} runs its student for {self.spec.k} steps, not {steps}.")


def _check(spec: CascadeSpec, student: models.Candidate, teacher: models.Candidate) -> None:
    """ConfigError / ModelError now for a cascade that cannot run."""
    total = teacher.scheduler().config.num_train_timesteps
    if spec.schedule_steps > total:
        raise ConfigError(f"Cascade {spec} asks for a teacher schedule of round(m / s) = {spec.schedule_steps} "
                          f"steps, more than its {total} timesteps; raise s or lower m.")
    if student.model.latent_shape() != teacher.model.latent_shape():
        raise ModelError(f"Cascade {spec}: the student's latents {student.model.latent_shape()} are not the "
                         f"teacher's {teacher.model.latent_shape()}; cascade a student of this teacher.")


def _same_text_encoders(a, b) -> bool:
    if type(a.family) is not type(b.family):
        return False
    for name in ("text_encoder", "text_encoder_2"):
        x, y = getattr(a, name, None), getattr(b, name, None)
        if (x is None) != (y is None) or (x is not None and not _same_weights(x, y)):
            return False
    for name in ("tokenizer", "tokenizer_2"):
        x, y = getattr(a.pipe, name, None), getattr(b.pipe, name, None)
        if (x is None) != (y is None) or (x is not None and x.get_vocab() != y.get_vocab()):
            return False
    return True


def _same_weights(x: torch.nn.Module, y: torch.nn.Module) -> bool:
    sx, sy = x.state_dict(), y.state_dict()
    return type(x) is type(y) and sx.keys() == sy.keys() and all(
        sx[k].shape == sy[k].shape and torch.equal(sx[k], sy[k].to(sx[k].device, sx[k].dtype)) for k in sx)


def load_cascade(spec: str | CascadeSpec, teacher_source: str, device: str, dtype: torch.dtype,
                 guidance_scale: float | None = None, compile_unet: bool = False) -> CascadeCandidate:
    """Load the student and the teacher's DDIM-trailing refiner (guidance g, else `guidance_scale`, else default)."""
    spec = parse_cascade(spec) if isinstance(spec, str) else spec
    student = models.load_student(spec.student, teacher_source, device, dtype, compile_unet)
    _, refiner = models.load_teacher(teacher_source, device, dtype, guidance_scale, spec.guidance, compile_unet)
    return CascadeCandidate.build(spec, student, refiner)


# ------------------------------------------------------------------------------------------- sampling
def refine_timesteps(spec: CascadeSpec, scheduler, device=None) -> torch.Tensor:
    """Set `scheduler` to N = round(m / s) steps and return the last m timesteps (img2img's `get_timesteps`)."""
    n = spec.schedule_steps
    scheduler.set_timesteps(n, device=device)
    start = (n - spec.m) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def renoise(scheduler, draft: torch.Tensor, t: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """z_t = add_noise(draft, eps, t) with eps drawn per sample from its own generator (CPU), as img2img does."""
    from diffusers.utils.torch_utils import randn_tensor

    eps = randn_tensor(draft.shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32)
    return scheduler.add_noise(draft, eps.to(draft.device, draft.dtype), t.reshape(1).repeat(len(draft)))


@torch.inference_mode()
def denoise_cascade(cascade: CascadeCandidate, cond_student: Cond, cond_teacher: Cond, noise: torch.Tensor,
                    generators: list[torch.Generator]) -> torch.Tensor:
    """Student k steps from z_T = `noise` -> draft; re-noise to strength s; teacher's last m steps with CFG."""
    spec, teacher = cascade.spec, cascade.teacher
    draft = models.denoise(cascade.student, spec.k, cond_student, noise, generators)
    model = teacher.model
    if not spec.refines:
        return draft.to(model.device, model.dtype)
    scheduler = teacher.scheduler()
    timesteps = refine_timesteps(spec, scheduler, model.device)
    z = renoise(scheduler, draft.to(model.device, model.dtype), timesteps[0], generators)
    return _teacher_steps(teacher, scheduler, timesteps, z, cond_teacher.to(model.device), generators)


def _teacher_steps(teacher: models.Candidate, scheduler, timesteps, z: torch.Tensor, cond: Cond,
                   generators: list[torch.Generator]) -> torch.Tensor:
    """The pipeline's denoising loop over `timesteps` (the loop of `models.denoise`, from a given z_t)."""
    model = teacher.model
    w = teacher.guidance_scale if teacher.cfg else 1.0
    w_embedding = models.guidance_cond(teacher, len(z))
    extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in timesteps:
        z_in = scheduler.scale_model_input(z, t)
        out = model.guided(z_in, t, cond, w, timestep_cond=w_embedding)
        z = scheduler.step(out, t, z, return_dict=False, **extra)[0].to(model.dtype)
    return z
