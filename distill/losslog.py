"""Losses of a run, per name, summarised for report.json: first and last 50 steps, and by tenths of the run."""

from __future__ import annotations


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def summarise(values: list[float]) -> dict:
    n = len(values)
    return {"first_50": _mean(values[:50]), "last_50": _mean(values[-50:]),
            "by_tenth": [_mean(values[i * n // 10:(i + 1) * n // 10]) for i in range(10)]}


class LossLog:
    """One list per loss name; `summary()` gives `losses` per name, and the `loss_*` keys of the main loss
    ("loss" if the method reports one, else its first) at the top level."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.values.setdefault(name, []).append(value)

    def summary(self) -> dict:
        per_name = {name: summarise(values) for name, values in self.values.items()}
        main = "loss" if "loss" in per_name else next(iter(per_name), None)
        top = {f"loss_{k}": v for k, v in per_name[main].items()} if main else {}
        return {**top, "losses": per_name}


def group_means(values, groups, names: dict[int, str]) -> dict:
    """Mean of per-sample `values` [B] within each group id in `groups` [B] present in the batch, keyed by
    `names[id]`: e.g. the consistency loss of each interval, so a user sees which part of t still moves."""
    out = {}
    for g in groups.unique().tolist():
        mask = groups == g
        out[names[g]] = values[mask.to(values.device)].mean()
    return out
