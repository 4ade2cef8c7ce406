"""Progress a person can watch: a tqdm bar on a terminal, a plain line every few seconds in a log.

Training shows the step against the budget that binds (steps, or the minutes' expected last step), an ETA,
iterations and samples per second, and the losses. `Ticker` does the same for long set-up phases (data encoding).
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


class Progress:
    """Training progress against a `Budget`; only the main process prints."""

    def __init__(self, name: str, budget, accelerator=None, samples_per_step: int = 1, every_seconds: float = 15.0):
        self.name, self.budget, self.every, self.samples_per_step = name, budget, every_seconds, samples_per_step
        self.enabled = accelerator is None or accelerator.is_main_process
        self.bar = tqdm(total=budget.max_steps, desc=name, dynamic_ncols=True) \
            if self.enabled and sys.stderr.isatty() else None
        self.last = time.monotonic()

    def line(self, step: int, **scalars) -> str:
        seconds, final, binding = self.budget.eta(step)
        elapsed = max(time.monotonic() - self.budget.start, 1e-9)
        rate = (step - self.budget.start_step) / elapsed
        limit = f"{self.budget.max_minutes:g} min" if binding == "minutes" else f"{self.budget.max_steps} steps"
        target = f"~{final}" if binding == "minutes" and final is not None else str(self.budget.max_steps)
        shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        return (f"[{self.name}] step {step}/{target} ({limit} budget binds) ETA {_clock(seconds)} "
                f"{rate:.2f} it/s {rate * self.samples_per_step:.0f} samples/s {shown}").rstrip()

    def update(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            seconds, final, binding = self.budget.eta(step)
            self.bar.total = final if binding == "minutes" and final else self.budget.max_steps
            self.bar.n = step
            self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in scalars.items()}, "ETA": _clock(seconds)}, refresh=True)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            print(self.line(step, **scalars), file=sys.stderr, flush=True)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Ticker:
    """`done/total (pct) ETA` of a set-up phase, printed every few seconds (and once at the end)."""

    def __init__(self, what: str, total: int, every_seconds: float = 5.0, enabled: bool = True):
        self.what, self.total, self.every, self.enabled = what, total, every_seconds, enabled
        self.start = self.last = time.monotonic()
        if enabled:
            print(f"{what}: {total} ...", file=sys.stderr, flush=True)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every and done < self.total):
            return
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate else None
        print(f"{self.what}: {done}/{self.total} ({100 * done / self.total:.0f}%) ETA {_clock(eta)}",
              file=sys.stderr, flush=True)
        self.last = now
