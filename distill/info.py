"""What a saved student is: `student.json` beside its weights, and the sampler it needs.

Every student a recipe writes (a run's `student/`, each checkpoint's `student/`, every export) carries a
`StudentInfo`, and in it a `SamplerSpec`: the diffusers scheduler class and the settings to build it with from the
teacher's scheduler config, the guidance scale to call the pipeline with, the step counts it was made for and,
where the method fixes them, the timesteps. `distill export`, `distill sample` and `distill eval` build the
scheduler from it instead of assuming one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from distill.errors import ConfigError, ModelError

INFO_FILE = "student.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name


@dataclass
class SamplerSpec:
    """How to sample a student with plain diffusers."""

    scheduler: str  # a diffusers scheduler class name, e.g. "LCMScheduler"
    config: dict = field(default_factory=dict)  # settings applied over the teacher's scheduler config
    guidance_scale: float = 1.0  # what to pass to the pipeline (1: no CFG pass)
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # the step counts it was made for
    timesteps: dict[str, list[int]] | None = None  # per step count, the pipeline's `timesteps=` (a tuned schedule,
    #   `distill tune-sampler`); step counts not named keep the scheduler's own spacing
    sigmas: dict[str, list[float]] | None = None  # per step count, the pipeline's `sigmas=` for a flow student
    #   (before the scheduler's shift): an ADD student's own grid, which FlowMatchLCMScheduler's spacing would miss

    @property
    def max_steps(self) -> int | None:
        """The most steps it can take: an LCMScheduler only walks its grid of `original_inference_steps` (N) points
        (an ADD student's 4 timesteps have no 8-step schedule); None for samplers without such a limit."""
        if self.sigmas:
            return max(int(k) for k in self.sigmas)
        if self.scheduler != "LCMScheduler":
            return None
        return int(self.config.get("original_inference_steps", 50))  # LCMScheduler's own default

    def check_steps(self, steps, what: str) -> None:
        """A ConfigError naming the step counts above `max_steps`, before anything is generated."""
        limit = self.max_steps
        over = [s for s in steps if (limit is not None and s > limit) or (self.sigmas and str(s) not in self.sigmas)]
        if over and self.sigmas:  # a flow or ADD student: sigmas pinned per step count, no others
            made = ", ".join(sorted(self.sigmas, key=int))
            raise ConfigError(f"{what} cannot take {', '.join(map(str, over))} steps: its sampler ({self.scheduler}) "
                              f"visits sigmas pinned for {made} steps only; ask for those.")
        if over:
            raise ConfigError(f"{what} cannot take {', '.join(map(str, over))} steps: its sampler ({self.scheduler}) "
                              f"walks a grid of N = {limit} timesteps; ask for at most {limit} steps.")

    def pinned(self, steps: int) -> dict:
        """What `set_timesteps` (or a pipeline call) takes besides the step count to visit this step count's pinned
        schedule: {"sigmas": ...}, {"timesteps": ...}, or {} for the scheduler's own spacing."""
        if self.sigmas and str(steps) in self.sigmas:
            return {"sigmas": self.sigmas[str(steps)]}
        if self.timesteps and str(steps) in self.timesteps:
            return {"timesteps": self.timesteps[str(steps)]}
        return {}

    def build(self, teacher_scheduler_config):
        """The scheduler instance: `<scheduler>.from_config(teacher config, **config)`."""
        import diffusers

        cls = getattr(diffusers, self.scheduler, None)
        if cls is None:
            raise ModelError(f"The student's sampler names {self.scheduler}, which this diffusers "
                             f"({diffusers.__version__}) does not have; upgrade diffusers.")
        return cls.from_config(teacher_scheduler_config, **self.config)


@dataclass
class StudentInfo:
    """Written as `student.json` beside a student's weights (and into exports)."""

    kind: str  # "full" | "lora"
    teacher: str  # the teacher pipeline: a local folder (absolute) or a hub id
    teacher_kind: str  # the teacher's family adaptor ("sd", "sdxl", ...)
    pipeline_class: str  # the teacher's diffusers pipeline class, which loads the LoRA or the student pipeline
    prediction_type: str
    sampler: SamplerSpec
    teacher_guidance_scale: float  # the teacher's guidance the student imitates
    method: str = "lcm"  # the recipe that made it
    step: int = 0
    details: dict = field(default_factory=dict)  # the method's own settings (e.g. LCM's N, omega range)
    feature_network: str | None = None  # what a discriminator saw, for adversarial methods
    training: dict | None = None  # what making it cost (steps, minutes, device, device_hours, samples_seen), if known
    network: str = "unet"  # the pipeline's denoiser attribute and folder: "unet", or "transformer" (SD3, FLUX)
    pipeline_kwargs: dict = field(default_factory=dict)  # what a pipeline call needs besides the sampler's settings
    #   (the emoji SD3's max_sequence_length=16)

    @property
    def guidance_scale(self) -> float:
        return self.sampler.guidance_scale

    @property
    def weights(self) -> str:
        """Where the shipped weights lie in the student's folder."""
        return LORA_WEIGHTS if self.kind == "lora" else self.network

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / INFO_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> StudentInfo:
        path = Path(folder) / INFO_FILE
        try:
            data = json.loads(path.read_text())
            if "sampler" not in data:
                data = _from_version_1(data)
            data["sampler"] = SamplerSpec(**data["sampler"])
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ModelError(f"{path} is missing or unreadable ({err}); re-run the export or the training.") from err


def _from_version_1(data: dict) -> dict:
    """student.json as distill wrote it before students carried their sampler: LCM students, whose sampler was
    always LCMScheduler with their N and timestep scaling (what `distill.consistency.lcm_sampler` builds now)."""
    details = {k: data[k] for k in ("num_ddim_timesteps", "timestep_scaling", "w_min", "w_max") if k in data}
    config = dict(original_inference_steps=data["num_ddim_timesteps"], timestep_scaling=data["timestep_scaling"],
                  prediction_type=data["prediction_type"], clip_sample=False, thresholding=False)
    sampler = {"scheduler": "LCMScheduler", "config": config, "guidance_scale": data["guidance_scale"],
               "steps": [s for s in (1, 2, 4, 8) if s <= data["num_ddim_timesteps"]]}
    pipeline = "StableDiffusionXLPipeline" if data.get("teacher_kind") == "sdxl" else "StableDiffusionPipeline"
    return {**data, "sampler": sampler, "details": details, "pipeline_class": pipeline}
