"""What the report recommends: a warning first when N is too small to tell configurations apart, the best
configuration under latency budgets, the best training-free sampler per step count and each student's verdict
against it and against its control, what training cost and when it pays back, the cheapest configurations near the
teacher's quality, and the caveats a reader needs before trusting the numbers.

A difference is claimed only when it is significant (evals.decision.compare: the KID means differ by more than the
sum of their spreads); otherwise the text says "not significant at this N" or "within noise of".
"""

from __future__ import annotations

import math

from evals.decision import compare
from evals.tables import count, decision_rows, sampler_name, verdict

NOISY_CV = 0.10  # batch-to-batch variation of the loop time above which speed numbers are flagged
SMALL_N = 500  # below this many images per row, FD / KID differences are mostly noise


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


def _steps(k: int) -> str:
    return f"{k} step{'s' * (k != 1)}"


def _who(row: dict) -> str:
    """"LCM-LoRA `lora` at 4 steps", "the teacher at 4 steps (DPM++2M with CFG 2)", "the cascade `...` (NFE 6)"."""
    if row["role"] == "cascade" or row["kind"] == "cascade":
        return f"the cascade `{row['model']}` ({row['nfe']} network evaluations)"
    if row["role"] == "teacher":
        return f"the teacher at {_steps(row['steps'])}" + (f" ({sampler_name(row)})" if row.get("baseline") else "")
    method = row.get("method", "lcm").upper()  # the recipe that made it: LCM, ADD, LADD
    kinds = {"lora": f"{method}-LoRA", "full": method, "pipeline": "pipeline"}
    return f"{kinds.get(row['kind'], row['kind'])} `{row['model']}` at {_steps(row['steps'])}"


def _fd_vs(row: dict, teacher: dict, fd_name: str) -> str:
    fd, tfd = row["quality"]["fd"], teacher["quality"]["fd"]
    if row is teacher:
        return f"{fd_name} {fd:.1f}"
    if tfd <= 1e-6:  # --reference none: distances are to the teacher's own samples
        return f"{fd_name} {fd:.1f} to {teacher['label']}'s samples (lower is closer)"
    pct = round(100 * (fd / tfd - 1))
    change = f"{pct:+d}%" if pct else "±0%"
    noise = "" if compare(row["quality"], teacher["quality"])["significant"] else ", within noise"
    return f"{fd_name} {fd:.1f} ({change} vs {teacher['label']}'s {tfd:.1f}{noise}; lower is better)"


def recommend(report: dict) -> list[dict]:
    """The small-N warning, best configuration under latency budgets, the training-free baselines and each
    student's verdicts, training cost, cheapest configurations near the teacher, and caveats."""
    rows, teacher, p = report["rows"], report["rows"][0], report["protocol"]
    front = pareto_front([(r["speed"]["latency"]["p50_ms"], r["quality"]["fd"]) for r in rows])
    return (_small_n(report) + _budget_lines(rows, front, teacher, p)
            + _dominated_note(rows, front, teacher, p["fd_name"]) + _baseline_lines(report) + _decision_lines(report)
            + _training_lines(report) + _cost_lines(rows, teacher, p["fd_name"], p) + _caveats(report))


def _small_n(report: dict) -> list[dict]:
    """First of all: at small N most differences are noise."""
    n = report["protocol"]["n"]
    if n >= SMALL_N:
        return []
    screen = sorted({e["n"] for e in report.get("sweep") or []})
    at = f" (screening N = {' / '.join(map(str, screen))})" if screen else ""
    return [{"kind": "warning", "label": None, "text": (
        f"Small N: {n} images per row{at}. {report['protocol']['fd_name']} and KID differences at this N are mostly "
        "noise: compare only the ones marked significant (KID means apart by more than the sum of their spreads), "
        f"and rerun with -n {SMALL_N * 2} or more before deciding.")}]


def _within_noise(best: dict, rows: list[dict]) -> str:
    """"; within noise of X, Y" for the rows `best` does not significantly beat (empty when it beats them all)."""
    tied = [r["label"] for r in rows if r is not best and not compare(best["quality"], r["quality"])["significant"]]
    if not tied:
        return ""
    more = f" and {len(tied) - 3} more" if len(tied) > 3 else ""
    return f"; within noise of {', '.join(tied[:3])}{more} (KID difference within the spreads)"


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
                f"{faster}; ${best['cost_usd_per_million']:.2f} per million images at batch {p['batch_size']}"
                f"{_within_noise(best, fits)}")
        out.append({"kind": "latency_budget", "budget_ms": budget, "label": best["label"], "text": text})
    return out


def _dominated_note(rows, front, teacher, fd_name) -> list[dict]:
    """A note when the teacher at its usual steps is off the Pareto front and a faster row is significantly better."""
    if 0 in front:
        return []
    beats = [r for r in rows[1:] if r["quality"]["fd"] <= teacher["quality"]["fd"]
             and compare(r["quality"], teacher["quality"])["better"]]
    if not beats:
        return []
    better = min(beats, key=lambda r: r["speed"]["latency"]["p50_ms"])
    q, t = better["quality"], teacher["quality"]
    return [{"kind": "note", "label": better["label"], "text": (
        f"{teacher['label']} itself is dominated: {_who(better)} scores significantly better ({fd_name} "
        f"{q['fd']:.1f} vs {t['fd']:.1f}, KID×1000 {q['kid']:.2f} ± {q['kid_std']:.2f} vs {t['kid']:.2f} ± "
        f"{t['kid_std']:.2f}) {better['vs_teacher']['latency']:.1f}× faster; check recall and the samples too.")}]


def _baseline_lines(report: dict) -> list[dict]:
    """Per step count, the best training-free sampler (the row every student at those steps is judged against)."""
    fd_name, out = report["protocol"]["fd_name"], []
    swept = [e for e in report.get("sweep") or [] if e["kind"] == "baseline"]
    for r in sorted((r for r in report["rows"] if r.get("baseline")), key=lambda r: r["steps"]):
        tried = [e for e in swept if e["steps"] == r["steps"]]
        how = (f"best of {len(tried)} sampler × guidance settings screened at N = {tried[0]['n']}" if tried
               else "the only one run; pass --baseline to sweep samplers")
        out.append({"kind": "baseline", "label": r["label"], "text": (
            f"Training-free, {_steps(r['steps'])}: {sampler_name(r)}, {fd_name} {r['quality']['fd']:.1f} "
            f"(`{r['label']}`, NFE {r['nfe']}, N = {report['protocol']['n']}; {how}).")})
    return out


def _verdict_text(cmp: dict, fd_name: str) -> str:
    """"better (FD ×0.85, KID×1000 -3.10: beyond the spreads)" or "not significant at this N (...)"."""
    ratio = "" if cmp["fd_ratio"] is None else f"{fd_name} ×{cmp['fd_ratio']:.2f}, "
    where = "beyond" if cmp["significant"] else "within"
    return f"{verdict(cmp)} ({ratio}KID×1000 {cmp['kid_diff']:+.2f}: {where} the spreads)"


def _decision_lines(report: dict) -> list[dict]:
    """Per student / cascade row: against the best training-free sampler at its steps (and at <= its NFE when that
    is another row), and against its control: what training bought."""
    fd_name, out = report["protocol"]["fd_name"], []
    bought = {True: "training bought this", False: "training made it worse than sampling the teacher this way",
              None: "training bought nothing measurable at this N"}
    for r in decision_rows(report):
        parts, base, cheap, control = [], r.get("vs_baseline"), r.get("vs_baseline_nfe"), r.get("vs_control")
        if base:
            parts.append(f"vs the best training-free sampler at {_steps(r['steps'])} (`{base['label']}`): "
                         + _verdict_text(base, fd_name))
        if cheap and (not base or cheap["label"] != base["label"]):
            parts.append(f"vs the best training-free at ≤ {r['nfe']} NFE (`{cheap['label']}`): "
                         + _verdict_text(cheap, fd_name))
        if control:
            parts.append(f"vs its control (`{control['label']}`, the untrained teacher sampled the same way, N = "
                         f"{control['n']}): {_verdict_text(control, fd_name)}, "
                         f"{bought[control['better'] if control['significant'] else None]}")
        if parts:
            who = _who(r)
            out.append({"kind": "decision", "label": r["label"],
                        "text": f"{who[0].upper()}{who[1:]}: " + "; ".join(parts) + "."})
    return out


def _training_lines(report: dict) -> list[dict]:
    """Per student / cascade row whose training cost is known: the cost and the volume that repays it."""
    teacher, price, out = report["rows"][0], report["protocol"]["price_per_gpu_hour"], []
    for r in decision_rows(report):
        if "training_cost_usd" not in r:
            continue
        t, be = r.get("training") or {}, r.get("break_even_images") or {}
        how = f"{t['device_hours']:.2f} device-hours on {t.get('device', '?')} at {price:g} USD/h"
        how += f", {t['steps']} steps" if t.get("steps") else ""
        how += f" (its share of a {t['pro_rata_of_steps']}-step run)" if t.get("pro_rata_of_steps") else ""
        against = [(teacher["label"], be.get("vs_teacher"))]
        if r.get("vs_baseline"):
            against.append((r["vs_baseline"]["label"], be.get("vs_baseline")))
        paid = "; ".join(f"repaid after {count(n)} images vs {label}" if n is not None
                         else f"never repaid vs {label} (not cheaper per image)" for label, n in against)
        out.append({"kind": "training", "label": r["label"], "text": (
            f"{r['label']}: training cost ${r['training_cost_usd']:.2f} ({how}); {paid}.")})
    return out


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
                     f"score {floor['fd']:.1f} (the real-vs-real row). That is a yardstick of the bias at this N, not "
                     "a bound: a generator can score below it. Compare numbers only at equal N and feature net; "
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
    return _judge_warning(report) + [{"kind": "note", "label": None, "text": t} for t in notes]


def _judge_warning(report: dict) -> list[dict]:
    """Rows whose discriminator saw the eval's judge network: their scores here are not an independent judgement.
    A warning for the first judge (its FD drives every verdict), a note per second judge (its column only)."""
    p = report["protocol"]
    rows = [r for r in report["rows"] if r.get("independent_judge") is False]
    out = []
    if rows:
        clean = [j["name"] for j in p.get("judges") or []
                 if all((r.get("judges") or {}).get(j["name"], {}).get("independent", True) for r in rows)]
        other = f"the second judges' columns ({', '.join(clean)})" if clean else "another feature network (--judges)"
        out.append({"kind": "warning", "label": rows[0]["label"], "text": (
            f"Not an independent judge: {', '.join(r['label'] for r in rows)} trained against {p['feature_net']}, "
            f"the network behind {p['fd_name']} and KID here, so those scores favour them; judge them by prompt "
            f"alignment, the samples, or {other}.")})
    for j in p.get("judges") or []:
        seen = [r["label"] for r in report["rows"] if (r.get("judges") or {}).get(j["name"], {}).get("independent")
                is False]
        if seen:
            out.append({"kind": "note", "label": seen[0], "text": (
                f"Second judge {j['name']} is not independent of {', '.join(seen)}: they trained against "
                f"{j['network']}, so their {j['fd_name']} and KID in that column favour them; read the other "
                "judges for those rows.")})
    return out
