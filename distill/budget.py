"""A training budget in steps and wall-clock minutes: whichever comes first ends the run.

Steps define training (a resumed or re-run job repeats itself); minutes only stop it, because the same job runs
3-5x slower on a loaded machine. `eta` says which limit binds and when the run will end.
"""

from __future__ import annotations

import time


class Budget:
    """Tracks progress in [0, 1] as the larger of the step fraction and the time fraction.

    `elapsed_before` carries the minutes spent before a resume, so a resumed run keeps its budget.
    """

    def __init__(self, max_steps: int, max_minutes: float | None, elapsed_before: float = 0.0, start_step: int = 0):
        self.max_steps, self.max_minutes = max_steps, max_minutes
        self.elapsed_before, self.start = elapsed_before, time.monotonic()
        self.start_step = start_step
        self.stopped_by: str | None = None  # what ended the run before its steps did, when something else did

    def minutes(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.start) / 60.0

    def progress(self, step: int) -> float:
        by_time = self.minutes() / self.max_minutes if self.max_minutes else 0.0
        return min(1.0, max(step / self.max_steps, by_time))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def eta(self, step: int) -> tuple[float | None, int | None, str]:
        """(seconds left, expected final step, "steps" | "minutes": the limit that binds) at the session's pace."""
        seconds = time.monotonic() - self.start
        done = step - self.start_step
        if done <= 0 or seconds <= 0:
            return None, None, "minutes" if self.max_minutes and not self.max_steps else "steps"
        rate = done / seconds
        by_steps = (self.max_steps - step) / rate
        by_time = (self.max_minutes - self.minutes()) * 60.0 if self.max_minutes else float("inf")
        if by_time < by_steps:
            return max(by_time, 0.0), step + int(max(by_time, 0.0) * rate), "minutes"
        return max(by_steps, 0.0), self.max_steps, "steps"
