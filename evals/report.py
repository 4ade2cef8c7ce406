"""The deployment report of `distill eval`: report.json (the data), report.md, and a self-contained report.html.

    distill report outputs/eval      # regenerate report.md, report.html and the plots from report.json

report.json follows evals/schema.json (`SCHEMA_VERSION`; checked by `validate`, a small subset of JSON Schema,
so no extra dependency). The HTML inlines its images as base64 and its style in a <style> block: it loads
nothing from anywhere. Plots are matplotlib (Agg) PNGs: quality against steps with the teacher and the
real-vs-real floor as lines, quality against latency with the Pareto front, and where batch-1 time goes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

from distill.errors import DataError

SCHEMA_VERSION = "1.0.0"
SCHEMA_PATH = Path(__file__).resolve().parent / "schema.json"
PLOTS = {"quality_vs_steps": "quality_vs_steps.png", "quality_vs_latency": "quality_vs_latency.png",
         "time_breakdown": "time_breakdown.png"}
GRID_FILE = "samples.png"
NOISY_CV = 0.10  # batch-to-batch variation of the loop time above which speed numbers are flagged
FILES = ("report.json", "report.md", "report.html", GRID_FILE, *PLOTS.values())
QUALITY_COLUMNS = [  # key, header, format, higher is better
    ("fd", None, "{:.1f}", False), ("kid", "KID×1000", None, False), ("precision", "precision", "{:.3f}", True),
    ("recall", "recall", "{:.3f}", True), ("diversity", "diversity", "{:.2f}", None),  # None: neither way
    ("align_top1", "top-1", "{:.3f}", True), ("align_top5", "top-5", "{:.3f}", True),
    ("align_cos", "cos", "{:.3f}", True), ("clip_score", "CLIPScore", "{:.2f}", True),
]


# ------------------------------------------------------------------------------------------- validation
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value, name: str) -> bool:
    if name in ("number", "integer"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        finite = not (isinstance(value, float) and math.isnan(value))
        return ok and finite and (name == "number" or float(value).is_integer())
    return isinstance(value, _TYPES[name])


def validate(instance, schema: dict | None = None, root: dict | None = None, path: str = "$") -> list[str]:
    """Errors of `instance` against `schema` (default: evals/schema.json) as 'path: problem' strings."""
    if schema is None:
        schema = json.loads(SCHEMA_PATH.read_text())
    root = root or schema
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return validate(instance, target, root, path)
    if "anyOf" in schema:
        if all(validate(instance, option, root, path) for option in schema["anyOf"]):
            return [f"{path}: matches none of the allowed forms"]
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is_type(instance, t) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(instance).__name__}"]
    return _check_value(instance, schema, path) + _check_children(instance, schema, root, path)


def _check_value(value, schema: dict, path: str) -> list[str]:
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: must be {schema['const']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: {value} <= exclusive minimum {schema['exclusiveMinimum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list) and len(value) < schema.get("minItems", 0):
        errors.append(f"{path}: fewer than {schema['minItems']} items")
    return errors


def _check_children(value, schema: dict, root: dict, path: str) -> list[str]:
    errors = []
    if isinstance(value, dict):
        errors += [f"{path}: missing required {key!r}" for key in schema.get("required", []) if key not in value]
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                errors += validate(item, props[key], root, f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                errors += validate(item, extra, root, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], root, f"{path}[{i}]")
    return errors


def check(report: dict) -> None:
    """Raise DataError naming the first problems if `report` does not follow the schema."""
    errors = validate(report)
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DataError(f"report.json does not follow evals/schema.json: {'; '.join(errors[:3])}{more}; "
                        "re-run `distill eval` to write a fresh one.")


# ------------------------------------------------------------------------------------- recommendations
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


def _who(report: dict, row: dict) -> str:
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
    fd_name = p["fd_name"]
    front = pareto_front([(r["speed"]["latency"]["p50_ms"], r["quality"]["fd"]) for r in rows])
    out = []
    for budget in sorted({nice_ceil(rows[i]["speed"]["latency"]["p50_ms"]) for i in front}):
        fits = [r for r in rows if r["speed"]["latency"]["p50_ms"] <= budget]
        best = min(fits, key=lambda r: r["quality"]["fd"])
        lat = best["speed"]["latency"]["p50_ms"]
        faster = "" if best is teacher else f", {best['vs_teacher']['latency']:.1f}× faster than {teacher['label']}"
        text = (f"≤ {budget:g} ms per image (batch 1, {p['device']}): {_who(report, best)}, "
                f"{_fd_vs(best, teacher, fd_name)}, recall {best['quality']['recall']:.2f}; p50 {lat:.1f} ms{faster}; "
                f"${best['cost_usd_per_million']:.2f} per million images at batch {p['batch_size']}")
        out.append({"kind": "latency_budget", "budget_ms": budget, "label": best["label"], "text": text})
    if 0 not in front:
        better = min((r for r in rows[1:] if r["quality"]["fd"] <= teacher["quality"]["fd"]),
                     key=lambda r: r["speed"]["latency"]["p50_ms"])
        out.append({"kind": "note", "label": better["label"], "text": (
            f"{teacher['label']} itself is dominated: {_who(report, better)} scores at least as well on {fd_name} "
            f"({better['quality']['fd']:.1f} vs {teacher['quality']['fd']:.1f}) {better['vs_teacher']['latency']:.1f}× "
            "faster; check KID, recall and the samples before trusting a small FD difference.")})
    out += _cost_lines(rows, teacher, fd_name, p)
    out += _caveats(report)
    return out


def _cost_lines(rows, teacher, fd_name, p) -> list[dict]:
    out = []
    others = [r for r in rows if r is not teacher]
    for tolerance in (0.10, 0.25):
        near = [r for r in others if r["quality"]["fd"] <= teacher["quality"]["fd"] * (1 + tolerance)]
        if near:
            best = min(near, key=lambda r: r["cost_usd_per_million"])
            text = (f"Cheapest within {tolerance:.0%} of {teacher['label']}'s {fd_name}: {_who(None, best)}, "
                    f"${best['cost_usd_per_million']:.2f} per million images vs ${teacher['cost_usd_per_million']:.2f} "
                    f"for {teacher['label']} ({best['vs_teacher']['throughput']:.1f}× the throughput at batch "
                    f"{p['batch_size']}).")
        else:
            closest = min(others, key=lambda r: r["quality"]["fd"], default=None)
            if closest is None:
                continue
            text = (f"No configuration is within {tolerance:.0%} of {teacher['label']}'s {fd_name}; the closest is "
                    f"{_who(None, closest)} ({_fd_vs(closest, teacher, fd_name)}).")
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


# -------------------------------------------------------------------------------------------- formatting
def _fmt(value, spec: str = "{:.1f}") -> str:
    return "—" if value is None else spec.format(value)


def _quality_cells(q: dict | None, fd_name: str, columns) -> list[str]:
    cells = []
    for key, _, spec, _ in columns:
        if q is None or key not in q:
            cells.append("—")
        elif key == "kid":
            cells.append(f"{q['kid']:.2f} ± {q['kid_std']:.2f}")
        else:
            cells.append(_fmt(q[key], spec))
    return cells


def _columns(report: dict) -> list[tuple]:
    """Quality columns present in at least one row, the FD one named after its network."""
    present = set().union(*(r["quality"] for r in report["rows"]))
    return [(k, report["protocol"]["fd_name"] if k == "fd" else h, s, up) for k, h, s, up in QUALITY_COLUMNS
            if k in present]


def quality_table(report: dict) -> tuple[list[str], list[list[str]]]:
    columns = _columns(report)
    arrow = {True: " ↑", False: " ↓", None: ""}
    head = ["model@steps", "scheduler", "guidance", "NFE"] + [h + arrow[up] for _, h, _, up in columns]
    body = []
    for r in report["rows"]:
        guidance = f"CFG {r['guidance_scale']:g}" if r["cfg"] else (
            f"input {r['guidance_scale']:g}" if r["guidance_input"] else "none")
        body.append([r["label"], r["scheduler"], guidance, str(r["nfe"])]
                    + _quality_cells(r["quality"], report["protocol"]["fd_name"], columns))
    if report["floor"] is not None:
        body.append(["real vs real (floor)", "—", "—", "—"] + _quality_cells(report["floor"], "", columns))
    return head, body


def latency_table(report: dict) -> tuple[list[str], list[list[str]]]:
    head = ["model@steps", "NFE", "p50 ms", "p95 ms", "text ms", "loop ms", "decode ms", "speedup",
            "loop speedup", "peak MiB"]
    body = []
    for r in report["rows"]:
        lat, v = r["speed"]["latency"], r["vs_teacher"]
        body.append([r["label"], str(r["nfe"]), f"{lat['p50_ms']:.1f}", f"{lat['p95_ms']:.1f}",
                     f"{lat['stage_p50_ms']['text']:.1f}", f"{lat['stage_p50_ms']['loop']:.1f}",
                     f"{lat['stage_p50_ms']['decode']:.1f}", f"{v['latency']:.1f}×", f"{v['loop_batch1']:.1f}×",
                     f"{lat['peak_mem_mb']:.0f}"])
    return head, body


def throughput_table(report: dict) -> tuple[list[str], list[list[str]]]:
    head = ["model@steps", "NFE", "img/s", "text ms/img", "loop ms/img", "decode ms/img", "speedup",
            "loop speedup", "NFE ratio", "loop / NFE", "batch CV", "peak MiB", "$ / 1M images"]
    body = []
    for r in report["rows"]:
        s, v = r["speed"], r["vs_teacher"]
        stage = s["stage_ms_per_image"]
        body.append([r["label"], str(r["nfe"]), f"{s['throughput_img_s']:.1f}", f"{stage['text']:.2f}",
                     f"{stage['loop']:.2f}", f"{stage['decode']:.2f}", f"{v['throughput']:.1f}×",
                     f"{v['loop_batch']:.1f}×", f"{v['nfe_ratio']:.1f}", f"{v['loop_vs_nfe']:.2f}",
                     f"{100 * s['loop_cv']:.0f}%" if "loop_cv" in s else "—", f"{s['peak_mem_mb']:.0f}",
                     f"{r['cost_usd_per_million']:.2f}"])
    return head, body


def summary_table(report: dict) -> str:
    """A plain-text table for the terminal."""
    fd_name = report["protocol"]["fd_name"]
    head = ["model@steps", "NFE", fd_name, "KID×1000", "prec", "recall", "div", "top-1", "p50 ms", "img/s", "speedup"]
    lines = []
    for r in report["rows"]:
        q, s = r["quality"], r["speed"]
        lines.append([r["label"], str(r["nfe"]), f"{q['fd']:.1f}", f"{q['kid']:.1f}", f"{q['precision']:.3f}",
                      f"{q['recall']:.3f}", _fmt(q.get("diversity"), "{:.2f}"), _fmt(q.get("align_top1"), "{:.3f}"),
                      f"{s['latency']['p50_ms']:.1f}", f"{s['throughput_img_s']:.1f}",
                      f"{r['vs_teacher']['latency']:.1f}×"])
    if report["floor"] is not None:
        f = report["floor"]
        lines.append(["real (floor)", "—", f"{f['fd']:.1f}", f"{f['kid']:.1f}", f"{f['precision']:.3f}",
                      f"{f['recall']:.3f}", "—", _fmt(f.get("align_top1"), "{:.3f}"), "—", "—", "—"])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


# ----------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buffer.getvalue()


def _families(report: dict) -> dict[str, list[dict]]:
    """Rows by model, without the teacher's usual-steps row (a horizontal line instead)."""
    out: dict[str, list[dict]] = {}
    for r in report["rows"][1:]:
        name = "teacher, DDIM (no distillation)" if r["role"] == "teacher" else f"{r['model']} ({r['kind']})"
        out.setdefault(name, []).append(r)
    return out


def plot_quality_vs_steps(report: dict) -> bytes:
    plt = _plt()
    columns = [c for c in _columns(report) if c[0] not in ("align_cos", "align_top5")][:6]
    ncols = 3
    nrows = math.ceil(len(columns) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.4 * nrows), squeeze=False)
    teacher, floor = report["rows"][0], report["floor"]
    for ax, (key, header, _, up) in zip(axes.flat, columns):
        for name, rows in _families(report).items():
            rows = sorted((r for r in rows if key in r["quality"]), key=lambda r: r["steps"])
            xs, ys = [r["steps"] for r in rows], [r["quality"][key] for r in rows]
            err = [r["quality"]["kid_std"] for r in rows] if key == "kid" else None
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        if key in teacher["quality"]:
            ax.axhline(teacher["quality"][key], color="black", ls="--", lw=1, label=teacher["label"])
        if floor is not None and key in floor:
            ax.axhline(floor[key], color="gray", ls=":", lw=1.5, label="real vs real (floor)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["protocol"]["steps"], [str(s) for s in report["protocol"]["steps"]])
        ax.set_xlabel("steps")
        better = {True: "higher is better", False: "lower is better", None: "collapse if far below the teacher"}
        ax.set_title(f"{header} ({better[up]})", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)),
               bbox_to_anchor=(0.5, -0.02 - 0.03 * (len(labels) > 4)))
    fig.suptitle(f"Quality vs steps (N = {report['protocol']['n']}, same prompts and seeds)", fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _png(fig)


def plot_quality_vs_latency(report: dict) -> bytes:
    plt = _plt()
    fd_name, rows, floor = report["protocol"]["fd_name"], report["rows"], report["floor"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    xs_all = [[r["speed"]["latency"]["p50_ms"] for r in rows], [1000 / r["speed"]["throughput_img_s"] for r in rows]]
    titles = ["batch-1 latency p50 (ms per image)", f"ms per image at batch {report['protocol']['batch_size']}"]
    ys = [r["quality"]["fd"] for r in rows]
    families = {name: [rows.index(r) for r in group] for name, group in _families(report).items()}
    for ax, xs, title in zip(axes, xs_all, titles):
        for name, idx in families.items():
            ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], label=name, zorder=3)
        ax.scatter([xs[0]], [ys[0]], marker="*", s=180, color="black", label=rows[0]["label"], zorder=4)
        for i, r in enumerate(rows):
            ax.annotate(r["label"], (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_front(list(zip(xs, ys)))
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="tab:red", lw=1.2,
                label="Pareto front", zorder=2)
        if floor is not None:
            ax.axhline(floor["fd"], color="gray", ls=":", lw=1.5, label="real vs real (floor)")
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
        ax.set_xlabel(title)
        ax.set_ylabel(f"{fd_name} (lower is better)")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=9)
    fig.suptitle(f"Quality vs cost on {report['protocol']['device_name']} ({report['protocol']['device']}, "
                 f"{report['protocol']['dtype']})", fontsize=12)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * (len(labels) > 5), 1, 1))
    return _png(fig)


def _plain_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers (20, 50, 100), not 2x10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def plot_time_breakdown(report: dict) -> bytes:
    """Share of the batch-1 latency (p50 per stage) spent in text encoder, denoising loop and VAE decode."""
    plt = _plt()
    rows = report["rows"][::-1]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.5))
    labels = [r["label"] for r in rows]
    totals = [sum(r["speed"]["latency"]["stage_p50_ms"].values()) for r in rows]
    left = [0.0] * len(rows)
    for stage, color, name in (("text", "tab:green", "text encoder"), ("loop", "tab:blue", "denoising loop"),
                               ("decode", "tab:orange", "VAE decode")):
        ms = [r["speed"]["latency"]["stage_p50_ms"][stage] for r in rows]
        share = [100 * m / t for m, t in zip(ms, totals)]
        ax.barh(labels, share, left=left, color=color, label=name)
        for y, (x0, w, m) in enumerate(zip(left, share, ms)):
            if w > 9:  # room for the number
                ax.text(x0 + w / 2, y, f"{m:.0f} ms" if m >= 10 else f"{m:.1f} ms", ha="center", va="center",
                        fontsize=7, color="white")
        left = [a + b for a, b in zip(left, share)]
    for y, (total, r) in enumerate(zip(totals, rows)):
        ax.text(101, y, f"{r['speed']['latency']['p50_ms']:.0f} ms p50", va="center", fontsize=8)
    ax.set_xlim(0, 118)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_xlabel("share of the batch-1 latency (%), p50 of each stage")
    ax.legend(loc="lower center", bbox_to_anchor=(0.45, 1.0), ncol=3, fontsize=8, frameon=False)
    ax.set_title("Where the time goes (batch 1)", fontsize=11, pad=22)
    fig.tight_layout()
    return _png(fig)


def sample_grid_png(grids: list[tuple[str, object]], prompts: list[str], real=None) -> bytes:
    """One row per model@steps (after the real images of the same captions), one column per prompt.

    Every image is scaled to one square cell of at least 64 px with nearest-neighbour, so pixels stay honest.
    """
    import numpy as np
    from PIL import Image

    plt = _plt()
    rows = ([("real (reference)", real)] if real is not None else []) + list(grids)
    arrays = [np.asarray(images) for _, images in rows]
    count = max(len(a) for a in arrays)
    side = max(max(a.shape[1:3]) for a in arrays)
    cell = side * max(1, math.ceil(64 / side))
    pad = 3
    canvas = np.full((len(rows) * (cell + pad) + pad, count * (cell + pad) + pad, 3), 255, dtype=np.uint8)
    for r, images in enumerate(arrays):
        for c, image in enumerate(images):
            big = np.asarray(Image.fromarray(image).resize((cell, cell), Image.NEAREST))
            y, x = pad + r * (cell + pad), pad + c * (cell + pad)
            canvas[y:y + cell, x:x + cell] = big
    dpi, left, top, right = 100, 1.9, 1.3, 1.3
    width, height = canvas.shape[1] / dpi, canvas.shape[0] / dpi
    fig = plt.figure(figsize=(width + left + right, height + top + 0.1), dpi=dpi)
    ax = fig.add_axes((left / (width + left + right), 0.1 / (height + top + 0.1),
                       width / (width + left + right), height / (height + top + 0.1)))
    ax.imshow(canvas, interpolation="nearest")
    centres = lambda n: [pad + i * (cell + pad) + cell / 2 for i in range(n)]  # noqa: E731
    ax.set_yticks(centres(len(rows)), [label for label, _ in rows], fontsize=9)
    ax.set_xticks(centres(count), [_short(p) for p in prompts[:count]], fontsize=8, rotation=30, ha="left")
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------- documents
def _protocol_items(report: dict) -> list[tuple[str, str]]:
    p = report["protocol"]
    ref = p["reference"]
    reference = (f"{ref['source']}: N = {ref['n']} images (floor: {ref['floor_n'] or 'none'} disjoint ones); "
                 f"{ref.get('rows', '')}" if ref else p.get("reference_note") or "none")
    kid = p["kid"]
    items = [
        ("metrics", f"{p['fd_name']} on {p['feature_net']} pooled features at {p['feature_resolution']} px; KID×1000 "
                    f"({kid.get('kernel', 'cubic')}, {kid['subsets']} subsets of {kid['subset_size']}); precision/recall "
                    f"k = {p['precision_recall_k']}; diversity: {p['diversity']['prompts']} prompts × "
                    f"{p['diversity']['samples_per_prompt']} seeds"),
        ("N", f"{p['n']} generated images per row, compared with {reference}"),
        ("prompts", p["prompts"]), ("seeds", p["seeds"]),
        ("images", f"{'×'.join(map(str, p['image_resolution']))} px generated" if p.get("image_resolution")
         else "—"),
        ("guidance", p.get("guidance") or "per row"),
        ("alignment", p["alignment"] or "off"),
        ("teacher", f"{p['teacher']} at {p['teacher_steps']} steps with its own scheduler; few-step baseline: DDIM, "
                    "trailing timesteps"),
        ("device", f"{p['device']} ({p['device_name']}), {p['dtype']}, {p.get('threads', '?')} threads, batch "
                   f"{p['batch_size']}, torch.compile {'on' if p.get('compile') else 'off'}"),
        ("latency", f"batch 1, {p['latency']['runs']} timed runs after {p['latency']['warmup']} warm-up; "
                    "p50/p95 nearest rank; CUDA synchronised between stages"),
        ("cost", p["cost_note"]),
        ("versions", ", ".join(f"{k} {v[:12] if 'sha' in k else v}" for k, v in p["versions"].items())),
    ]
    return items


def _models_rows(report: dict) -> list[list[str]]:
    return [[m["name"], m["description"], m["source"], m["scheduler"],
             f"{m['guidance_scale']:g}" + (" (CFG)" if m["cfg"] else " (input)" if m["guidance_input"] else " (none)"),
             _fmt(m.get("weights_mb"), "{:.1f}")] for m in report["models"]]


MODEL_HEAD = ["name", "what", "source", "scheduler", "guidance", "weights MiB"]


def _mem_note(report: dict) -> str:
    kind = report["rows"][0]["speed"]["latency"]["mem_kind"]
    return {"cuda_max_allocated": "CUDA max allocated during the measurement",
            "process_peak_rss": "peak resident memory of the whole eval process during the measurement (CPU)",
            }.get(kind, "peak resident memory of the eval process since it started (CPU)")


def _bar_lines(report: dict) -> list[str]:
    lines = []
    for r in report["rows"][1:]:
        v = r["vs_teacher"]
        verdict = "within 10%" if v["loop_within_10pct_of_nfe"] else "NOT within 10%"
        lines.append(f"{r['label']}: denoising loop {v['loop_batch']:.1f}× faster at batch "
                     f"{r['speed']['batch_size']} vs NFE ratio {v['nfe_ratio']:.1f} ({v['loop_vs_nfe']:.2f}, "
                     f"{verdict}); "
                     f"at batch 1 {v['loop_batch1']:.1f}×")
    return lines


def render_markdown(report: dict) -> str:
    p = report["protocol"]
    out = [f"# Distillation report: {p['teacher']}", "",
           f"{len(report['rows'])} configurations, N = {p['n']}, {p['device']} ({p['device_name']}), {p['dtype']}; "
           f"created {report['created']}.", "", "## Recommendation", ""]
    out += [f"- {r['text']}" for r in report["recommendations"]]
    out += ["", "## Quality", "", _md_table(*quality_table(report)), "",
            f"![quality vs steps]({PLOTS['quality_vs_steps']})", "", "## Speed", "",
            f"Latency at batch 1 (p50 per stage; mem: {_mem_note(report)}):", "", _md_table(*latency_table(report)), "",
            f"Throughput at batch {p['batch_size']} (the quality run itself):", "",
            _md_table(*throughput_table(report)), "",
            "Denoising-loop speedup against the NFE ratio (the bar: within 10% at batch "
            f"{p['batch_size']}):", ""]
    out += [f"- {line}" for line in _bar_lines(report)]
    out += ["", f"![quality vs latency]({PLOTS['quality_vs_latency']})", "",
            f"![time breakdown]({PLOTS['time_breakdown']})", "", "## Samples (same prompts, same seeds)", "",
            f"![samples]({GRID_FILE})", "", "## Models", "", _md_table(MODEL_HEAD, _models_rows(report)), "",
            "## Protocol", ""]
    out += [f"- **{k}**: {v}" for k, v in _protocol_items(report)]
    out += ["", "## Eval timings (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()), ""]
    return "\n".join(out)


def _md_table(head: list[str], body: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(esc(c) for c in row) + " |" for row in body])


STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1180px; color: #1d1d1f; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #ddd; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 12.5px; margin: 8px 0; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e5e5e5; text-align: right; white-space: nowrap; }
th { background: #f3f4f6; position: sticky; top: 0; } td:first-child, th:first-child { text-align: left; }
tr.floor td { color: #555; font-style: italic; background: #fafafa; } tr.teacher td { background: #f6f9ff; }
td.best { font-weight: 700; } td.t, th.t { text-align: left; } h3 { font-size: 15px; margin: 18px 0 4px; }
.wrap { overflow-x: auto; } img { max-width: 100%; height: auto; }
ul.rec li { margin: 4px 0; } ul.rec li.budget { font-weight: 500; }
dl { display: grid; grid-template-columns: 140px 1fr; gap: 4px 12px; font-size: 13px; }
dt { font-weight: 600; color: #444; } dd { margin: 0; }
.note { color: #555; font-size: 13px; }
"""


def _code(text: str) -> str:
    """`name` -> <code>name</code> (the recommendation texts are written for markdown too)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _html_table(head, body, classes=None, best=None) -> str:
    e = html.escape
    rows = []
    for i, row in enumerate(body):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f'<td class="{_cell_class(c, best and (i, j) in best)}">{e(c)}</td>' for j, c in enumerate(row))
        rows.append(f"<tr{cls}>{cells}</tr>")
    first = body[0] if body else []
    header = "".join(f'<th class="{"t" if j < len(first) and "t" in _cell_class(first[j], False).split() else ""}">'
                     f"{e(h)}</th>" for j, h in enumerate(head))
    return f'<div class="wrap"><table><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


_NUMERIC = re.compile(r"^[-+$]?[0-9.,]+( ± [0-9.]+)?[×%]?$|^—$")


def _cell_class(text: str, best: bool) -> str:
    return " ".join(c for c in ("best" if best else "", "" if _NUMERIC.match(str(text)) else "t") if c)


def _best_cells(report: dict) -> set[tuple[int, int]]:
    """(row, column) of the best generated value in each quality column (the floor is not a contender)."""
    best = set()
    for j, (key, _, _, up) in enumerate(_columns(report)):
        if key == "diversity":  # more is not simply better: noise is diverse too
            continue
        values = [(r["quality"][key], i) for i, r in enumerate(report["rows"]) if key in r["quality"]]
        if values:
            best.add(((max if up else min)(values)[1], 4 + j))
    return best


def render_html(report: dict, images: dict[str, bytes]) -> str:
    e, p = html.escape, report["protocol"]
    def img(name: str, alt: str) -> str:
        if name not in images:
            return f'<p class="note">({e(name)} missing)</p>'
        return f'<img alt="{e(alt)}" src="data:image/png;base64,{base64.b64encode(images[name]).decode()}">'

    rows = report["rows"]
    classes = ["teacher" if r["role"] == "teacher" else "" for r in rows] + ["floor"]
    rec = "".join(f'<li class="{"budget" if r["kind"] == "latency_budget" else ""}">{_code(e(r["text"]))}</li>'
                  for r in report["recommendations"])
    protocol = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _protocol_items(report))
    bar = "".join(f"<li>{e(line)}</li>" for line in _bar_lines(report))
    timings = ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Distillation report: {e(p['teacher'])}</title><style>{STYLE}</style></head>
<body>
<h1>Distillation report: {e(p['teacher'])}</h1>
<p class="sub">{len(rows)} configurations · N = {p['n']} · {e(p['device'])} ({e(p['device_name'])}) ·
{e(p['dtype'])} · schema {e(report['schema_version'])} · {e(report['created'])}</p>
<h2>Recommendation</h2><ul class="rec">{rec}</ul>
<h2>Quality</h2>
{_html_table(*quality_table(report), classes=classes, best=_best_cells(report))}
<p class="note">Bold: best generated value in the column (not for diversity). Teacher rows shaded; the real-vs-real floor is the best any
generator can score at this N.</p>
{img(PLOTS['quality_vs_steps'], 'quality vs steps')}
<h2>Speed</h2>
<h3>Latency at batch 1</h3><p class="note">p50 of each stage over the timed runs; speedups against {e(rows[0]['label'])};
memory: {e(_mem_note(report))}.</p>
{_html_table(*latency_table(report), classes=classes[:-1])}
<h3>Throughput at batch {p['batch_size']}</h3>
<p class="note">Measured on the quality run itself (first batch left out). Batch CV: how much the loop's time per
image varied between batches; above {NOISY_CV:.0%} the device was probably shared.</p>
{_html_table(*throughput_table(report), classes=classes[:-1])}
<p class="note">Speedups are against {e(rows[0]['label'])} (CFG counted in its NFE). Denoising-loop speedup against the
NFE ratio (the bar: within 10% at batch {p['batch_size']}):</p><ul class="note">{bar}</ul>
{img(PLOTS['quality_vs_latency'], 'quality vs latency')}
{img(PLOTS['time_breakdown'], 'where the time goes')}
<h2>Samples</h2><p class="note">Same prompts and the same per-sample seeds in every row.</p>
{img(GRID_FILE, 'sample grid')}
<h2>Models</h2>{_html_table(MODEL_HEAD, _models_rows(report))}
<h2>Protocol</h2><dl>{protocol}</dl>
<p class="note">Eval timings (s): {e(timings)}</p>
</body></html>
"""


# ------------------------------------------------------------------------------------------------ files
def write(report: dict, out_dir: str | Path, grid_png: bytes | None = None) -> Path:
    """Validate and write every file of the report folder; returns the path of report.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")  # kept even if invalid
    if grid_png is not None:
        (out / GRID_FILE).write_bytes(grid_png)
    check(report)
    return render(report, out)


def render(report: dict, out: Path) -> Path:
    images = {PLOTS["quality_vs_steps"]: plot_quality_vs_steps(report),
              PLOTS["quality_vs_latency"]: plot_quality_vs_latency(report),
              PLOTS["time_breakdown"]: plot_time_breakdown(report)}
    for name, data in images.items():
        (out / name).write_bytes(data)
    if (out / GRID_FILE).is_file():
        images[GRID_FILE] = (out / GRID_FILE).read_bytes()
    (out / "report.md").write_text(render_markdown(report))
    (out / "report.html").write_text(render_html(report, images))
    return out / "report.html"


def load(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "report.json"
    if not path.is_file():
        raise DataError(f"No report.json in {out_dir}: pass the --out folder of a `distill eval` run.")
    try:
        report = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON ({err}); re-run `distill eval`.") from err
    version = str(report.get("schema_version", ""))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise DataError(f"{path} has schema version {version or 'none'}, this distill reads "
                        f"{SCHEMA_VERSION.split('.')[0]}.x; re-run `distill eval` with this version.")
    check(report)
    return report


def regenerate(out_dir: str | Path) -> Path:
    """report.md, report.html and the plots again from report.json (the sample grid is reused as it is)."""
    return render(load(out_dir), Path(out_dir))
