"""Progress a person can watch: a tqdm bar on a terminal, a plain line every few seconds in a log."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    """Shows step, it/s and the given scalars; only the main process prints."""

    def __init__(self, name: str, total: int, accelerator=None, every_seconds: float = 15.0):
        self.name, self.total, self.every = name, total, every_seconds
        self.enabled = accelerator is None or accelerator.is_main_process
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=name, dynamic_ncols=True) if self.enabled and self.tty else None
        self.start = self.last = time.monotonic()
        self.step0 = None

    def update(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        if self.step0 is None:
            self.step0 = step - 1
        shown = {k: f"{v:.4g}" for k, v in scalars.items()}
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(shown, refresh=True)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            rate = (step - self.step0) / max(now - self.start, 1e-9)
            items = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"[{self.name}] step {step}/{self.total} {rate:.2f} it/s {items}", file=sys.stderr, flush=True)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
