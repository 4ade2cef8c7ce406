"""The consistency-gap section of `distill eval`: where along t a consistency (LCM) student is still off the teacher.

From M real latents z0 (the reference images of the first M prompts, through the teacher's VAE) and one seeded
noise eps, every student meets the same points z_t = alpha_t z0 + sigma_t eps at each t its own sampler visits at
1, 2 and 4 steps (999, 759, 499, 259 for N = 50). Per t (`distill.gap`): the RMS latent distance between the
student's one-step map and the teacher's ODE solution from z_t (DDIM with CFG at the guidance the student was
distilled for, 50-step spacing), the same for the untrained control (the teacher's own one-step x0 with that CFG),
and RMS(Phi - z0), the scale both read against. The teacher's solutions are cached across students.
Students that are not consistency students (ADD, pipelines without student.json) get no rows, only their name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.gap import consistency_gap, ode_steps, student_one_step, teacher_ode_solution
from evals import models
from evals.progress import log

GAP_STEPS = (1, 2, 4)  # the t of the section: the student's own timesteps at these step counts
ODE_STEPS = 50  # the ODE solve's spacing: a 50-step sampler's over the whole schedule
GAP_TITLE = "Consistency gap"
GAP_HEAD = ["t", "student gap", "control gap", "student / control", "ODE scale", "ODE steps"]
GAP_NOTE = ("From the same M re-noised real latents z_t = alpha_t z0 + sigma_t eps at each t the student samples at "
            "(1, 2, 4 steps): the RMS latent distance between its one-step map f(z_t, t) and the teacher's ODE solution "
            "from z_t (DDIM with CFG at the guidance it was distilled for, 50-step spacing), mean ± std over the "
            "points. Control: the untrained teacher's own one-step x0 at that CFG. ODE scale: RMS(ODE solution − z0), "
            "to read the gaps against. 0: the student is exactly the teacher's ODE map at that t.")


CONSISTENCY_SAMPLERS = ("LCMScheduler", "FlowMatchLCMScheduler")  # x0, then re-noise: one-step maps to compare


class GapSection:
    """The section through one eval: the shared points, the teacher's solutions at them, the rows so far."""

    def __init__(self, z0: torch.Tensor, eps: torch.Tensor, prompts: list[str], seed: int):
        self.z0, self.eps, self.prompts, self.seed = z0, eps, prompts, seed
        self.cache: dict = {}  # (t, teacher guidance) -> (Phi [M, C, h, w], control gap [M], scale [M], ODE steps)
        self.students: dict[str, list[dict]] = {}
        self.skipped: list[str] = []

    def entry(self) -> dict:
        """The report's `consistency_gap` (evals/schema.json)."""
        return {"points": len(self.z0), "seed": self.seed, "ode_steps": ODE_STEPS, "students": self.students,
                "skipped": self.skipped}


@torch.no_grad()
def start(teacher: models.Candidate, real, prompts: list[str], points: int, seed: int,
          batch: int) -> GapSection | None:
    """The M points every student shares; None when the section is off (M = 0) or there are no real images."""
    if points == 0:
        return None
    if real is None:
        log("consistency gap: no real images (--reference none) to re-noise; the section is left out")
        return None
    model, m = teacher.model, min(points, len(prompts), len(real.images))
    images = real.images[:m]
    if tuple(images.shape[-2:]) != model.resolution():  # the reference may be stored at another size
        images = F.interpolate(images, size=model.resolution(), mode="bilinear", antialias=True, align_corners=False)
    z0 = torch.cat([model.encode_images(chunk.to(model.device)).float() for chunk in images.split(batch)])
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0.device)
    return GapSection(z0, eps, list(prompts[:m]), seed)


def student_times(student: models.Candidate, schedule) -> list:
    """The times its consistency sampler visits at 1, 2 and 4 steps (those it can take), on the teacher's schedule,
    descending: LCMScheduler's integer t on the VP grid of N, FlowMatchLCMScheduler's sigmas on a flow one."""
    found = set()
    for steps in (s for s in GAP_STEPS if student.supports(s)):
        scheduler = student.scheduler()
        scheduler.set_timesteps(**(student.pinned(steps) or {"num_inference_steps": steps}))
        found |= set(schedule.from_model_time(scheduler.timesteps).tolist())
    return sorted(found, reverse=True)


def measure(section: GapSection, student: models.Candidate, teacher: models.Candidate, batch: int) -> None:
    """One student's rows, or its name among the skipped when it is not a consistency (LCM) student."""
    if student.metadata.get("method") != "lcm" or student.scheduler_cls.__name__ not in CONSISTENCY_SAMPLERS:
        section.skipped.append(student.name)
        return
    w = float(student.metadata.get("teacher_guidance_scale", teacher.guidance_scale))
    rows = []
    schedule = teacher.model.schedule
    for t in student_times(student, schedule):
        phi, control, scale, steps = _teacher_at(section, teacher.model, t, w, batch)
        gap = _student_gap(section, student, teacher.model, t, phi, batch)
        t_shown = int(round(float(schedule.model_time(torch.tensor(t)))))  # the network's units: sigma x 1000 on flow
        rows.append({"t": t_shown, "student_gap": float(gap.mean()), "student_gap_std": _std(gap),
                     "teacher_one_step_gap": float(control.mean()), "ode_scale": float(scale.mean()), "n": len(gap),
                     "ode_steps": steps})
    section.students[student.name] = rows
    log(f"consistency gap of {student.name} (control) at t = " + ", ".join(
        f"{r['t']}: {r['student_gap']:.3f} ({r['teacher_one_step_gap']:.3f})" for r in rows))


def _std(values: torch.Tensor) -> float:
    return float(values.std()) if len(values) > 1 else 0.0  # one point has no spread (and torch would say nan)


def _chunks(section: GapSection, batch: int) -> list[slice]:
    return [slice(i, i + batch) for i in range(0, len(section.z0), batch)]


def _noised(section: GapSection, teacher, rows: slice, t: int) -> torch.Tensor:
    """z_t of the points in `rows`, by the teacher's forward process (every student shares its schedule)."""
    z0 = section.z0[rows]
    return teacher.add_noise(z0, section.eps[rows], torch.full((len(z0),), t, device=z0.device))


def _teacher_at(section: GapSection, teacher, t: int, w: float, batch: int) -> tuple:
    """(Phi, control gap, scale, ODE steps) at t for teacher guidance w, solved once per (t, w)."""
    if (t, w) not in section.cache:
        steps = ode_steps(t, teacher.schedule.t_max, ODE_STEPS)
        phi, one = [], []
        for rows in _chunks(section, batch):
            z_t, cond = _noised(section, teacher, rows, t), teacher.encode_prompt(section.prompts[rows])
            phi.append(teacher_ode_solution(teacher, z_t, t, cond, w, steps))
            one.append(teacher_ode_solution(teacher, z_t, t, cond, w, 1))  # the untrained control's one step
        phi = torch.cat(phi)
        section.cache[(t, w)] = (phi, consistency_gap(torch.cat(one), phi), consistency_gap(phi, section.z0), steps)
    return section.cache[(t, w)]


def _student_gap(section: GapSection, student: models.Candidate, teacher, t: int, phi: torch.Tensor,
                 batch: int) -> torch.Tensor:
    """The student's gap [M] at t, run as its pipeline runs it: CFG only where its sampler uses CFG, its guidance
    embedding where it has a guidance input, the boundary condition with its LCMScheduler's timestep scaling."""
    model, scaling = student.model, float(student.scheduler_config.get("timestep_scaling", 10.0))
    w, gaps = (student.guidance_scale if student.cfg else 1.0), []
    for rows in _chunks(section, batch):
        z_t, cond = _noised(section, teacher, rows, t), model.encode_prompt(section.prompts[rows])
        f = student_one_step(model, z_t, t, cond, w, models.guidance_cond(student, len(z_t)), scaling)
        gaps.append(consistency_gap(f, phi[rows]))
    return torch.cat(gaps)


# ------------------------------------------------------------------------------------------------ tables
def gap_note(report: dict) -> str:
    """What the section's numbers are, with its M and noise seed."""
    section = report.get("consistency_gap") or {}
    return f"{GAP_NOTE} M = {section.get('points', '?')} points, noise seed {section.get('seed', '?')}."


def _ratio(row: dict) -> float:
    return row["student_gap"] / row["teacher_one_step_gap"] if row["teacher_one_step_gap"] > 0 else math.inf


def gap_tables(report: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """Per consistency student: (name, head, body, the line that says where along t it is furthest off)."""
    section = report.get("consistency_gap") or {}
    out = []
    for name, rows in section.get("students", {}).items():
        body = [[str(r["t"]), f"{r['student_gap']:.4f} ± {r['student_gap_std']:.4f}",
                 f"{r['teacher_one_step_gap']:.4f}", f"{_ratio(r):.2f}×" if math.isfinite(_ratio(r)) else "—",
                 f"{r['ode_scale']:.4f}", str(r.get("ode_steps", "—"))] for r in rows]
        out.append((name, GAP_HEAD, body, _furthest(rows)))
    return out


def _furthest(rows: list[dict]) -> str:
    if not rows:
        return "no timesteps measured."
    worst, best = max(rows, key=_ratio), min(rows, key=_ratio)
    if not math.isfinite(_ratio(worst)):
        return f"furthest off at t = {worst['t']}, where the control is exact (gap {worst['student_gap']:.4f})."
    return (f"furthest off, relative to the control, at t = {worst['t']}: its gap is {_ratio(worst):.2f}× the "
            f"untrained teacher's one step there (closest: t = {best['t']}, {_ratio(best):.2f}×).")


def gap_skipped(report: dict) -> str | None:
    """The one line naming the students the section does not measure, if any."""
    skipped = (report.get("consistency_gap") or {}).get("skipped") or []
    if not skipped:
        return None
    return (f"Not measured for {', '.join(f'`{s}`' for s in skipped)}: not consistency (LCM) students (ADD, or no "
            "student.json), so there is no one-step consistency map to check.")
