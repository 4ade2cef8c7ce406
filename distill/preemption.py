"""Preemption: SIGTERM (a scheduler taking the machine back) or SIGINT (Ctrl-C) during training.

The first signal only sets a flag; the loop sees it at the next step boundary, saves a checkpoint and exits 0 with
the command that resumes. A second signal exits at once: checkpoints are atomic (`distill.runs`), so the last
complete one stays loadable whatever was being written.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """`with Preemption() as p:` ... `p.signal` is the name of the first signal received ("SIGTERM"), or None."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = name
            print(f"{name} received: a checkpoint is saved at the end of this step, then the run stops "
                  f"(send {name} again to stop at once).", file=sys.stderr, flush=True)
            return
        self._restore()  # the second signal: what the process would have done without us
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
