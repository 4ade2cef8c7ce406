"""A training budget in steps and wall-clock minutes: whichever comes first ends the run."""

from __future__ import annotations

import math
import time


class Budget:
    """Tracks progress in [0, 1] as the larger of the step fraction and the time fraction.

    `elapsed_before` carries the minutes spent before a resume, so a resumed run keeps its budget.
    """

    def __init__(self, max_steps: int, max_minutes: float | None, elapsed_before: float = 0.0):
        self.max_steps, self.max_minutes = max_steps, max_minutes
        self.elapsed_before, self.start = elapsed_before, time.monotonic()

    def minutes(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.start) / 60.0

    def progress(self, step: int) -> float:
        by_time = self.minutes() / self.max_minutes if self.max_minutes else 0.0
        return min(1.0, max(step / self.max_steps, by_time))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def warmup_cosine(progress: float, step: int, warmup_steps: int, floor: float = 0.0) -> float:
    """LR multiplier: linear warm-up over `warmup_steps`, then cosine from 1 to `floor` over progress."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
