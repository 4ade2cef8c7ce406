"""The decision matrix: each student (and cascade) against the strongest no-training alternative, against the
untrained teacher sampled its way (what training bought), and what making it cost.

Significance: two configurations differ when their KID×1000 means differ by more than the sum of their spreads
over subsets (KID is unbiased; FD is not, at small N); otherwise the comparison says "not significant at this N".
"""

from __future__ import annotations

import re

from evals.baselines import best_within_nfe


def compare(a: dict, b: dict) -> dict:
    """a against b (each with fd, kid, kid_std): the FD ratio, the KID difference, and whether it is beyond the
    spreads; `better` is True / False when significant, None when not."""
    diff = a["kid"] - b["kid"]
    significant = abs(diff) > a["kid_std"] + b["kid_std"]
    return {"fd_ratio": a["fd"] / b["fd"] if b["fd"] > 1e-6 else None, "kid_diff": diff, "significant": significant,
            "better": (diff < 0) if significant else None}


def decide(rows: list[dict], sweep: list[dict], price_per_hour: float, judge: str) -> None:
    """Add vs_baseline, vs_baseline_nfe, vs_control, training cost, break-even and judge independence to rows."""
    teacher = rows[0]
    for row in rows:
        flag_judges(row, judge)
    baselines = {r["steps"]: r for r in rows if r.get("baseline")}
    for row in rows:
        if row["role"] == "teacher":
            continue
        base = baselines.get(row["steps"])
        if base is not None:
            row["vs_baseline"] = {"label": base["label"]} | compare(row["quality"], base["quality"])
        cheap = best_within_nfe(rows, row["nfe"])
        if cheap is not None:
            row["vs_baseline_nfe"] = {"label": cheap["label"]} | compare(row["quality"], cheap["quality"])
        control = _control(sweep, row)
        if control is not None and "screen" in row:
            row["vs_control"] = {"label": control["label"], "n": control["n"]} | compare(row["screen"], control)
        _cost(row, teacher, base, price_per_hour)


def flag_judges(row: dict, judge: str) -> None:
    """Whether each judge is independent of the row: not when its student.json names that judge's network (what
    its discriminator read), since training against a network's features is what lowers a distance measured on them.
    The primary judge as `independent_judge` (only when a network is named), each second judge in row["judges"]."""
    named = row.get("feature_network")
    if named:
        row["independent_judge"] = network_key(named) != network_key(judge)
    for name, entry in (row.get("judges") or {}).items():
        entry["independent"] = not named or network_key(named) != network_key(name)


def _control(sweep: list[dict], row: dict) -> dict | None:
    return next((e for e in sweep if e["kind"] == "control" and e["control_of"] == row["model"]
                 and e["steps"] == row["steps"]), None)


def _cost(row: dict, teacher: dict, base: dict | None, price_per_hour: float) -> None:
    """Training cost in USD at the eval's price, and the images after which the cheaper inference has paid it back
    (against the teacher at its usual steps, and against the best training-free row at the same steps)."""
    training = row.get("training") or {}
    if "device_hours" not in training:
        return
    cost = training["device_hours"] * price_per_hour
    row["training_cost_usd"] = round(cost, 4)
    row["break_even_images"] = {"vs_teacher": break_even(cost, teacher, row),
                                "vs_baseline": break_even(cost, base, row) if base else None}


def break_even(training_cost_usd: float, reference: dict, row: dict) -> float | None:
    """Images to generate before `row`'s cheaper inference repays its training cost; None if it is not cheaper."""
    saving = (reference["cost_usd_per_million"] - row["cost_usd_per_million"]) / 1e6
    return training_cost_usd / saving if saving > 0 else None


def network_key(name: str) -> str:
    """One spelling per feature network, so a student.json's `feature_network` meets the judge of the same network.

    "EfficientNet-Lite1", "tf_efficientnet_lite1" and "effnet-lite1" are one; "dinov2", "dinov2-small",
    "facebook/dinov2-small" and "dinov2:facebook/dinov2-small" are one (DINOv2 alone means ViT-S/14, the default,
    while dinov2-base is another network); "InceptionV3" and "inception" are one.
    """
    text = name.strip().lower().replace("efficientnet", "effnet")
    if "dinov2" in text:
        model = text.partition(":")[2] if text.startswith("dinov2:") else text
        size = _alnum(model.rstrip("/").rsplit("/", 1)[-1]).split("dinov2", 1)[-1]
        return "dinov2" + (size or "small")
    effnet = re.search(r"effnet[^a-z0-9]*(lite|b)[^a-z0-9]*([0-9])", text)
    if effnet:
        return "effnet" + effnet[1] + effnet[2]
    return "inception" if "inception" in text else _alnum(text)


def _alnum(text: str) -> str:
    return "".join(c for c in text if c.isalnum())
