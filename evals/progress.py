"""Progress of the eval on stderr: `[eval] ...` lines, and a rate-limited image counter."""

from __future__ import annotations

import sys
import time


def log(message: str) -> None:
    """One `[eval] message` line on stderr."""
    print(f"[eval] {message}", file=sys.stderr, flush=True)


class Ticker:
    """'[eval] label: 640/1000 images, 2.2 img/s, ~160 s left' at most every `every` seconds, and when done."""

    def __init__(self, label: str, total: int, every: float = 10.0):
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        rate = done / max(now - self.start, 1e-9)
        left = f", ~{(self.total - done) / rate:.0f} s left" if done < self.total else f" in {now - self.start:.0f} s"
        log(f"{self.label}: {done}/{self.total} images, {rate:.1f} img/s{left}")
        self.last = now
