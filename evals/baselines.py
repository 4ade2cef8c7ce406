"""The strongest no-training alternative: the teacher at few steps under a sweep of diffusers samplers and guidance.

A user who owns a teacher would first try a better sampler before distilling, so every claim a student makes is
measured against the best training-free row at the same step count (and the report also compares at equal network
evaluations: CFG doubles a step's cost). A baseline spec is

    SchedulerClass[:key=value,...]@g1,g2,...      e.g. "DDIMScheduler:timestep_spacing=trailing@2,3"

the scheduler built from the teacher's own config with those settings, at each guidance scale g (1: no CFG pass).
One setting is not the scheduler's: `grid=N` pins the sigmas a consistency student of an N-point flow grid samples
at (FlowMatchLCMScheduler's own spacing runs down to sigma_min, so its last step does nothing and 2 steps give
what 1 does; the pinned row is the flow counterpart of LCMScheduler's `original_inference_steps`).
The sweep runs every (spec, guidance, steps) at a screening N (the first `sweep_samples` prompts and seeds of the
eval, so a full-N row contains its screening subset), ranks them by FD at that N, and re-runs the best per step
count at the full N. Control rows (`control_candidates`) sample the untrained teacher with a student's own sampler
and guidance, so what training bought is not confused with what a sampler or dropping CFG bought.
"""

from __future__ import annotations

import json

from distill.consistency import pinned_sigmas
from distill.errors import ConfigError
from evals import models
from evals.specs import BaselineSpec, parse_baseline

DEFAULT_BASELINES = (
    "DDIMScheduler:timestep_spacing=trailing@2,3",
    "DPMSolverMultistepScheduler@2,3",
    "UniPCMultistepScheduler@3",
    "EulerDiscreteScheduler:timestep_spacing=trailing@3",
    "LCMScheduler@1",
)
# A flow-matching teacher (SD3, FLUX) has its own training-free samplers: Euler on the flow ODE (its stock one),
# DPM-Solver++ and UniPC on flow sigmas (their shift set to the teacher's), and the consistency-style sampler
# (x0, then re-noise) that a flow student ships with. `defaults_for` picks the list by the teacher's schedule.
FLOW_BASELINES = (
    "FlowMatchEulerDiscreteScheduler@2,3",
    "DPMSolverMultistepScheduler:use_flow_sigmas=true,prediction_type=flow_prediction@2,3",
    "UniPCMultistepScheduler:use_flow_sigmas=true,prediction_type=flow_prediction@3",
    "FlowMatchLCMScheduler@1",
    "FlowMatchLCMScheduler:grid=50@1",
)
SHORT = {"DDIMScheduler": "DDIM", "FlowMatchEulerDiscreteScheduler": "FlowEuler", "FlowMatchLCMScheduler": "FlowLCM", "DPMSolverMultistepScheduler": "DPM++2M", "UniPCMultistepScheduler": "UniPC",
         "EulerDiscreteScheduler": "Euler", "LCMScheduler": "LCM", "EulerAncestralDiscreteScheduler": "EulerA",
         "DPMSolverSinglestepScheduler": "DPM++S", "DEISMultistepScheduler": "DEIS", "PNDMScheduler": "PNDM"}


def defaults_for(family: str, baselines: list[str]) -> list[str]:
    """The sweep to run for a teacher of this schedule family: the flow list in place of the untouched VP default."""
    if family == "flow" and list(baselines) == list(DEFAULT_BASELINES):
        return list(FLOW_BASELINES)
    return list(baselines)


def baseline_name(spec: BaselineSpec, guidance: float) -> str:
    """A short, unique row name: teacher[DDIM-trailing,cfg2]."""
    short = SHORT.get(spec.scheduler, spec.scheduler.removesuffix("Scheduler"))
    extra = "".join(f"-{v}" if k == "timestep_spacing" else f"-{k}={v}" for k, v in spec.config.items()
                    if k not in ("use_flow_sigmas", "prediction_type"))  # what every flow row says
    how = f"cfg{guidance:g}" if guidance > 1 else "no-cfg"
    return f"teacher[{short}{extra},{how}]"


def sweep_candidates(model, source: str, specs: list[str]) -> list[models.Candidate]:
    """One candidate per (scheduler spec, guidance), all on the one loaded teacher model."""
    out = []
    for text in specs:
        spec = parse_baseline(text)
        config = {k: v for k, v in spec.config.items() if k != "grid"}
        for guidance in spec.guidances:
            cand = models.teacher_candidate(model, source, spec.scheduler, config, guidance,
                                            baseline_name(spec, guidance), "teacher, training-free sampler")
            if "grid" in spec.config:
                cand.sigmas = grid_sigmas(model.schedule, spec.config["grid"], text)
            out.append(cand)
    return out


def grid_sigmas(schedule, n, spec: str) -> dict[str, list[float]]:
    """The `grid=N` setting: the sigmas a consistency student of an N-point flow grid samples at, for 1..N steps."""
    if not hasattr(schedule, "unshifted") or not isinstance(n, int) or n < 1:
        raise ConfigError(f"Baseline sampler {spec!r}: grid=N (a whole number) pins the sigmas of a flow-matching "
                          "teacher's FlowMatchLCMScheduler; drop it for this teacher or write e.g. grid=50.")
    return pinned_sigmas(schedule, n, list(range(1, n + 1)))


def control_candidate(model, source: str, student: models.Candidate) -> models.Candidate:
    """The untrained teacher with a student's own scheduler (its settings) and guidance: what training bought."""
    guidance = student.guidance_scale
    cand = models.Candidate(f"control[{student.name}]", "teacher", "teacher", source, model,
                            student.scheduler_cls, dict(student.scheduler_config), guidance,
                            f"control: the untrained teacher sampled as {student.name} is", {"control_of": student.name},
                            sigmas=student.sigmas, timesteps=student.timesteps)
    return cand


def sampling_key(cand: models.Candidate, steps: int) -> tuple:
    """What decides a candidate's samples at `steps`: its model, its scheduler with the timesteps (or sigmas) it
    visits, and its guidance. Two candidates with equal keys draw the same images from the same seeds (a student's
    control is often a sweep row: LCMScheduler without CFG; its `original_inference_steps` only moves timesteps)."""
    scheduler = cand.scheduler()
    scheduler.set_timesteps(**(cand.pinned(steps) or {"num_inference_steps": steps}))
    config = {k: v for k, v in scheduler.config.items() if k != "original_inference_steps" and not k.startswith("_")}
    sigmas = getattr(scheduler, "sigmas", None)
    return (id(cand.model), type(scheduler).__name__, json.dumps(config, sort_keys=True, default=str),
            tuple(round(float(t), 4) for t in scheduler.timesteps),
            None if sigmas is None else tuple(round(float(s), 6) for s in sigmas),
            cand.cfg, cand.guidance_scale if cand.cfg or cand.guidance_input else None)


def best_per_steps(entries: list[dict], key: str = "fd") -> dict[int, dict]:
    """{steps: the entry with the lowest `key`} over sweep entries (ties: fewer network evaluations)."""
    best: dict[int, dict] = {}
    for entry in entries:
        k = entry["steps"]
        if k not in best or (entry[key], entry["nfe"]) < (best[k][key], best[k]["nfe"]):
            best[k] = entry
    return best


def best_within_nfe(rows: list[dict], nfe: int) -> dict | None:
    """Among the full-N best training-free rows, the best (lowest FD) that costs at most `nfe` evaluations."""
    fits = [r for r in rows if r.get("baseline") and r["nfe"] <= nfe]
    return min(fits, key=lambda r: r["quality"]["fd"], default=None)

