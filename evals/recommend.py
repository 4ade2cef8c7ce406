"""What the report recommends: the best configuration under latency budgets, the cheapest ones near the
teacher's quality, and the caveats a reader needs before trusting the numbers.
"""

from __future__ import annotations

import math

NOISY_CV = 0.10  # batch-to-batch variation of the loop time above which speed numbers are flagged


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better), by x ascending."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def nice_ceil(x: float) -> float:
    """The smallest of 1, 2, 5 x 10^k that is >= x (latency budgets people talk in)."""
    power = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * power >= x * (1 - 1e-9):
            return m * power
    return 10 * power


def _who(row: dict) -> str:
    kinds = {"teacher": "the teacher", "lora": "LCM-LoRA", "full": "LCM", "pipeline": "pipeline"}
    name = "" if row["role"] == "teacher" else f" `{row['model']}`"
    return f"{kinds[row['kind']]}{name} at {row['steps']} step{'s' * (row['steps'] != 1)}"


def _fd_vs(row: dict, teacher: dict, fd_name: str) -> str:
    fd, tfd = row["quality"]["fd"], teacher["quality"]["fd"]
    if row is teacher:
        return f"{fd_name} {fd:.1f}"
    if tfd <= 1e-6:  # --reference none: distances are to the teacher's own samples
        return f"{fd_name} {fd:.1f} to {teacher['label']}'s samples (lower is closer)"
    pct = round(100 * (fd / tfd - 1))
    change = f"{pct:+d}%" if pct else "±0%"
    return f"{fd_name} {fd:.1f} ({change} vs {teacher['label']}'s {tfd:.1f}; lower is better)"


def recommend(report: dict) -> list[dict]:
    """Best configuration under latency budgets, cheapest configurations near the teacher, and caveats."""
    rows, teacher, p = report["rows"], report["rows"][0], report["protocol"]
    front = pareto_front([(r["speed"]["latency"]["p50_ms"], r["quality"]["fd"]) for r in rows])
    return (_budget_lines(rows, front, teacher, p) + _dominated_note(rows, front, teacher, p["fd_name"])
            + _cost_lines(rows, teacher, p["fd_name"], p) + _caveats(report))


def _budget_lines(rows, front, teacher, p) -> list[dict]:
    """For each latency budget a Pareto point sets, the best-quality row within it."""
    out = []
    for budget in sorted({nice_ceil(rows[i]["speed"]["latency"]["p50_ms"]) for i in front}):
        fits = [r for r in rows if r["speed"]["latency"]["p50_ms"] <= budget]
        best = min(fits, key=lambda r: r["quality"]["fd"])
        lat = best["speed"]["latency"]["p50_ms"]
        faster = "" if best is teacher else f", {best['vs_teacher']['latency']:.1f}× faster than {teacher['label']}"
        text = (f"≤ {budget:g} ms per image (batch 1, {p['device']}): {_who(best)}, "
                f"{_fd_vs(best, teacher, p['fd_name'])}, recall {best['quality']['recall']:.2f}; p50 {lat:.1f} ms"
                f"{faster}; ${best['cost_usd_per_million']:.2f} per million images at batch {p['batch_size']}")
        out.append({"kind": "latency_budget", "budget_ms": budget, "label": best["label"], "text": text})
    return out


def _dominated_note(rows, front, teacher, fd_name) -> list[dict]:
    """A note when the teacher at its usual steps is off the Pareto front."""
    if 0 in front:
        return []
    better = min((r for r in rows[1:] if r["quality"]["fd"] <= teacher["quality"]["fd"]),
                 key=lambda r: r["speed"]["latency"]["p50_ms"])
    return [{"kind": "note", "label": better["label"], "text": (
        f"{teacher['label']} itself is dominated: {_who(better)} scores at least as well on {fd_name} "
        f"({better['quality']['fd']:.1f} vs {teacher['quality']['fd']:.1f}) {better['vs_teacher']['latency']:.1f}× "
        "faster; check KID, recall and the samples before trusting a small FD difference.")}]


def _cost_lines(rows, teacher, fd_name, p) -> list[dict]:
    out = []
    others = [r for r in rows if r is not teacher]
    for tolerance in (0.10, 0.25):
        near = [r for r in others if r["quality"]["fd"] <= teacher["quality"]["fd"] * (1 + tolerance)]
        if near:
            best = min(near, key=lambda r: r["cost_usd_per_million"])
            text = (f"Cheapest within {tolerance:.0%} of {teacher['label']}'s {fd_name}: {_who(best)}, "
                    f"${best['cost_usd_per_million']:.2f} per million images vs ${teacher['cost_usd_per_million']:.2f} "
                    f"for {teacher['label']} ({best['vs_teacher']['throughput']:.1f}× the throughput at batch "
                    f"{p['batch_size']}).")
        else:
            closest = min(others, key=lambda r: r["quality"]["fd"], default=None)
            if closest is None:
                continue
            text = (f"No configuration is within {tolerance:.0%} of {teacher['label']}'s {fd_name}; the closest is "
                    f"{_who(closest)} ({_fd_vs(closest, teacher, fd_name)}).")
            best = closest
        out.append({"kind": "cost", "label": best["label"], "text": text})
    return out


def _caveats(report: dict) -> list[dict]:
    p, floor = report["protocol"], report["floor"]
    notes = [f"Costs: {p['cost_note']}; throughput measured at batch {p['batch_size']} on {p['device_name']}."]
    if floor is not None:
        notes.append(f"{p['fd_name']} is biased upwards at small N: at N = {p['n']} two disjoint sets of real images "
                     f"score {floor['fd']:.1f} (the floor). Compare numbers only at equal N and feature net; "
                     f"KID is unbiased, and its ± is the spread over subsets.")
    noisy = [f"{r['label']} ({100 * r['speed']['loop_cv']:.0f}%)" for r in report["rows"]
             if r["speed"].get("loop_cv", 0) > NOISY_CV]
    if noisy:
        notes.append(f"Timing noise: the denoising loop's time per image varied between batches by more than "
                     f"{NOISY_CV:.0%} for {', '.join(noisy)}: something else was probably using the device. Quality "
                     "numbers are unaffected; rerun on an idle machine before trusting those speed numbers.")
    notes.append("Diversity (spread of one prompt's samples over seeds) flags mode collapse when it falls well below "
                 f"{report['rows'][0]['label']}'s; higher is not better by itself (blurry or noisy samples are diverse "
                 "too): read it with precision.")
    if p["feature_net"] == "effnet-lite0" and p["feature_resolution"] != 128:
        notes.append(f"Features at {p['feature_resolution']} px, not the 128 px of evals/calibrate.py: these numbers "
                     "compare only with runs at the same resolution (the floor here is at the same one).")
    if p["fd_name"] != "FID":
        notes.append(f"{p['fd_name']} is a Fréchet distance on {p['feature_net']} features at "
                     f"{p['feature_resolution']} px, not FID: it is not comparable with published FID numbers.")
    return [{"kind": "note", "label": None, "text": t} for t in notes]
