"""The engine's quality watch: every `probe.every_steps`, the method's probe; the best student kept in `best/`.

A method that can judge its own samples implements `probe(step) -> {"score": lower is better, ...}` (the LCM
recipe: KID of a few hundred samples, and its consistency loss on held-out and on training rows). The watch logs
every value, appends it to `probe.jsonl`, writes the student to `best/` (atomically, like a checkpoint) when the
score is the best so far, and says once when `patience` probes in a row have not beaten it: more steps stopped
paying. With `stop_on_plateau` the run then stops (a budget, like `max_train_minutes`: the schedule is cut).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from distill.files import apply_umask
from distill.probe import BestKeeper

BEST = "best"  # the best probed student, beside student/ (the last one)
HISTORY = "probe.jsonl"
PLOT = "probe.png"  # the probe's values against steps, redrawn at each probe


class QualityWatch:
    def __init__(self, folder: Path, every: int, patience: int, stop_on_plateau: bool, step: int):
        self.folder, self.every, self.stop_on_plateau = folder, every, stop_on_plateau
        self.keeper = BestKeeper.load(folder / HISTORY, patience, upto=step)  # later probes are repeated
        self.said_plateau = self.keeper.plateaued()

    def due(self, step: int) -> bool:
        """Every `every` steps, step 0 (before training: the untrained control) included, each step once."""
        return bool(self.every) and step % self.every == 0 and step not in {h["step"] for h in self.keeper.history}

    def probe(self, accelerator, method, step: int, minutes: float) -> bool:
        """Probe now (main process); True when the run should stop on a plateau."""
        values = method.probe(step)
        if not values:
            return False
        improved = self.keeper.record(step, values.pop("score"), **values, minutes=round(minutes, 2))
        self.keeper.save(self.folder / HISTORY)
        plot_history(self.keeper.history, self.folder / PLOT)
        accelerator.log({f"probe/{k}": v for k, v in self.keeper.history[-1].items() if k != "step"}, step=step)
        best = self.keeper.best
        if improved:
            self._save_best(method, step)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.keeper.history[-1].items() if k not in ("step", "minutes"))
        accelerator.print(f"probe at step {step}: {shown}" + ("  (best so far: best/)" if improved else
                                                            f"  (best: {best['score']:.4g} at step {best['step']})"))
        if self.keeper.plateaued() and not self.said_plateau:
            self.said_plateau = True
            accelerator.print(self._plateau_line(step))
            return self.stop_on_plateau
        return False

    def _plateau_line(self, step: int) -> str:
        best, since = self.keeper.best, self.keeper.since_best()
        then = "stopping here (probe.stop_on_plateau)" if self.stop_on_plateau else "training goes on"
        return (f"quality stopped improving: the best probe score {best['score']:.4g} was at step {best['step']}, and "
                f"the {len(since)} probes since (steps {since[0]['step']}-{step}) were no better; more steps are not "
                f"paying. The best student is in {self.folder / BEST}; {then}.")

    def _save_best(self, method, step: int) -> None:
        partial, final = self.folder / f"{BEST}.partial", self.folder / BEST
        shutil.rmtree(partial, ignore_errors=True)
        method.save_student(partial, step)
        apply_umask(partial)
        old = self.folder / f"{BEST}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)

    def summary(self) -> dict | None:
        return self.keeper.summary() if self.keeper.history else None


def plot_history(history: list[dict], path: Path) -> None:
    """One panel per probed value (the score, the held-out and training losses, ...) against training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history[0] if k not in ("step", "minutes")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, key in zip(axes.flat, keys):
        ax.plot(steps, [h.get(key) for h in history], marker="o")
        ax.set_xlabel("training step")
        ax.set_title("probe score (lower is better)" if key == "score" else key)
    best = min((h for h in history if h["score"] == h["score"]), key=lambda h: h["score"], default=None)
    if best:
        axes.flat[0].axvline(best["step"], color="grey", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
