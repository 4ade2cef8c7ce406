"""What `distill eval` is asked for: `EvalSettings`, the single source of every option's default.

cli.py reads its option defaults from here (`defaults()`), so a default is changed in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from distill.errors import ConfigError
from evals.baselines import DEFAULT_BASELINES
from evals.specs import parse_baseline


@dataclass
class EvalSettings:
    """What `distill eval` was asked for (its options, one for one)."""

    teacher: str
    out: str
    students: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    teacher_steps: int = 50
    num_samples: int = 1000
    prompts: str | None = None
    reference: str = "emoji:32"
    device: str = "cpu"
    dtype: str = "auto"  # bf16 where the device has it natively (1.6-1.8x on AVX512-BF16 CPUs), else fp32
    batch_size: int = 64
    guidance_scale: float | None = None
    baseline_guidance: float | None = None
    seed: int = 0
    feature_net: str = "effnet-lite0"
    # Second judges: FD and KID on other feature networks, from the same images (effnet-lite1, dinov2[:id], inception)
    judges: list[str] = field(default_factory=list)
    feature_resolution: int = 128  # EffNet input size; 128 is what evals/calibrate.py uses
    alignment: str = "emoji-align"
    price_per_gpu_hour: float = 2.0
    compile: bool = False
    latency_runs: int = 20
    latency_warmup: int = 3
    latency_seconds: float = 10.0  # a configuration's timed runs stop after this long (5 runs at least; 0: no cap)
    diversity_prompts: int = 8
    diversity_samples: int = 4
    # The training-free sweep: the teacher at --steps under each sampler spec (Class[:k=v]@g1,g2); its best per
    # step count is re-run at full N and is the baseline every student claim is measured against. Empty: the old
    # single DDIM baseline at --baseline-guidance.
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    sweep_samples: int = 200  # screening N of the sweep and the control rows (0: the full N)
    control: bool = True  # per student: the untrained teacher with the student's own sampler and guidance
    cascades: list[str] = field(default_factory=list)  # STUDENT@k+teacher@m:s[:g] rows (draft, then refine)
    student_sampler: str | None = None  # Class[:k=v]@g for students without student.json (a plain LoRA or pipeline)
    consistency_gap: int = 64  # points of the consistency-gap section for LCM students (0: no section)
    overwrite: bool = False  # replace a report already in `out` (without it, such an `out` is refused)

    def check(self) -> None:
        """Raise ConfigError for settings no eval can run with."""
        if self.num_samples < 4:
            raise ConfigError(f"--num-samples {self.num_samples} is too small for FD/KID/precision: use 4 or more.")
        if not self.steps or any(s < 1 for s in self.steps) or self.teacher_steps < 1:
            raise ConfigError("--steps and --teacher-steps must be positive step counts, e.g. --steps 1,2,4,8.")
        if self.batch_size < 1 or self.latency_runs < 1:
            raise ConfigError("--batch-size and --latency-runs must be 1 or more.")
        if self.latency_seconds < 0:
            raise ConfigError(f"--latency-seconds {self.latency_seconds:g} is negative: give seconds, or 0 for no cap.")
        if self.diversity_samples < 2:
            raise ConfigError("--diversity-samples must be 2 or more (diversity compares samples of one prompt).")
        if self.price_per_gpu_hour < 0:
            raise ConfigError("--price-per-gpu-hour must not be negative.")
        for spec in self.baselines + ([self.student_sampler] if self.student_sampler else []):
            parse_baseline(spec)
        self._check_baseline_steps()
        from evals.cascade_rows import unmatched

        missing = unmatched(self.cascades, self.students)
        if missing:
            raise ConfigError(f"--cascade {missing[0]} drafts with a student that is not among --student; add "
                              "--student with the same path.")
        self._check_judges()
        if self.consistency_gap < 0:
            raise ConfigError(f"--consistency-gap {self.consistency_gap} is negative: give a number of points, "
                              "e.g. 64 (0 turns the section off).")
        if self.sweep_samples and self.sweep_samples < 16:
            raise ConfigError(f"--sweep-samples {self.sweep_samples} is too small to rank samplers: use 16 or more "
                              "(or 0 for the full N).")

    def _check_baseline_steps(self) -> None:
        """A sampler of the sweep with a fixed grid (LCMScheduler: N timesteps) can take --steps up to N only."""
        from evals.specs import parse_sampler

        for spec in self.baselines:
            sampler = parse_sampler(spec)
            sampler.check_steps(self.steps, f"--baseline {spec}")
            grid = sampler.config.get("grid")
            if "grid" in sampler.config and (not isinstance(grid, int) or grid < 1):
                raise ConfigError(f"--baseline {spec}: grid=N takes a whole number of sigmas, e.g. grid=50.")
            if isinstance(grid, int) and max(self.steps) > grid:
                raise ConfigError(f"--baseline {spec} pins a grid of N = {grid} sigmas and cannot take "
                                  f"{max(self.steps)} steps; ask for at most {grid} steps or raise grid.")

    def _check_judges(self) -> None:
        """Unknown or repeated judges are refused here, before any network is loaded or image generated."""
        from evals.decision import network_key
        from evals.features import FEATURE_NETS, known_feature_net

        seen = {network_key(self.feature_net): f"--feature-net {self.feature_net}"}
        for name in self.judges:
            if not known_feature_net(name):
                raise ConfigError(f"--judges {name}: unknown feature network; choose among "
                                  f"{', '.join(FEATURE_NETS)} or dinov2:<hub id or folder>.")
            if network_key(name) in seen:
                raise ConfigError(f"--judges {name} is the same network as {seen[network_key(name)]}: "
                                  "list each judge once.")
            seen[network_key(name)] = f"--judges {name}"


def defaults() -> dict:
    """The default of every field that has one, by name (default factories called); required fields left out."""
    out = {}
    for f in dataclasses.fields(EvalSettings):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out
