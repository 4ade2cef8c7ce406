"""The report's images, matplotlib (Agg) PNGs: quality against steps with the teacher and the real-vs-real score
(the metrics' bias at this N, not a bound) as lines, quality against latency with the Pareto front (students,
cascades and the best training-free samplers), where batch-1 time goes, and the sample grid.
"""

from __future__ import annotations

import io
import math

from evals.recommend import pareto_front
from evals.tables import quality_columns

PLOTS = {"quality_vs_steps": "quality_vs_steps.png", "quality_vs_latency": "quality_vs_latency.png",
         "time_breakdown": "time_breakdown.png"}
GRID_FILE = "samples.png"


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


def families(report: dict) -> dict[str, list[dict]]:
    """Rows by model, without the teacher's usual-steps row (a horizontal line instead): the teacher's best
    training-free sampler per step count as one family, each student, and each cascade as its own."""
    swept = any(e["kind"] == "baseline" for e in report.get("sweep") or [])
    out: dict[str, list[dict]] = {}
    for r in report["rows"][1:]:
        if r["role"] == "teacher":
            name = ("teacher, best training-free sampler" if swept and r.get("baseline")
                    else "teacher, DDIM (no distillation)")
        elif r["role"] == "cascade" or r["kind"] == "cascade":
            name = f"cascade {r['model']}"
        else:
            name = f"{r['model']} ({r['kind']})"
        out.setdefault(name, []).append(r)
    return out


def plot_quality_vs_steps(report: dict) -> bytes:
    """One panel per quality column: each model's curve over steps, the teacher and the floor as lines."""
    plt = _plt()
    columns = [c for c in quality_columns(report) if c[0] not in ("align_cos", "align_top5")][:6]
    ncols = 3
    nrows = math.ceil(len(columns) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.4 * nrows), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        _steps_panel(ax, report, column)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)),
               bbox_to_anchor=(0.5, -0.02 - 0.03 * (len(labels) > 4)))
    fig.suptitle(f"Quality vs steps (N = {report['protocol']['n']}, same prompts and seeds)", fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _png(fig)


def _steps_panel(ax, report: dict, column: tuple) -> None:
    key, header, _, up = column
    teacher, floor = report["rows"][0], report["floor"]
    for name, rows in families(report).items():
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


def plot_quality_vs_latency(report: dict) -> bytes:
    """FD against batch-1 latency and against time per image at the batch size, with the Pareto front."""
    plt = _plt()
    rows, p = report["rows"], report["protocol"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    xs_all = [[r["speed"]["latency"]["p50_ms"] for r in rows], [1000 / r["speed"]["throughput_img_s"] for r in rows]]
    titles = ["batch-1 latency p50 (ms per image)", f"ms per image at batch {p['batch_size']}"]
    for ax, xs, title in zip(axes, xs_all, titles):
        _latency_panel(ax, report, xs, title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=9)
    fig.suptitle(f"Quality vs cost on {p['device_name']} ({p['device']}, {p['dtype']})", fontsize=12)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * (len(labels) > 5), 1, 1))
    return _png(fig)


def _latency_panel(ax, report: dict, xs: list[float], title: str) -> None:
    rows, floor = report["rows"], report["floor"]
    ys = [r["quality"]["fd"] for r in rows]
    for name, group in families(report).items():
        idx = [rows.index(r) for r in group]
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
    ax.set_ylabel(f"{report['protocol']['fd_name']} (lower is better)")
    ax.grid(alpha=0.3, which="both")


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
    plt = _plt()
    rows = ([("real (reference)", real)] if real is not None else []) + list(grids)
    canvas, cell, pad, count = _grid_canvas([images for _, images in rows])
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


def _grid_canvas(image_rows: list, pad: int = 3):
    """(canvas uint8 (H, W, 3), cell side, pad, columns): every image in its cell on a white background."""
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(images) for images in image_rows]
    count = max(len(a) for a in arrays)
    side = max(max(a.shape[1:3]) for a in arrays)
    cell = side * max(1, math.ceil(64 / side))
    canvas = np.full((len(arrays) * (cell + pad) + pad, count * (cell + pad) + pad, 3), 255, dtype=np.uint8)
    for r, images in enumerate(arrays):
        for c, image in enumerate(images):
            big = np.asarray(Image.fromarray(image).resize((cell, cell), Image.NEAREST))
            y, x = pad + r * (cell + pad), pad + c * (cell + pad)
            canvas[y:y + cell, x:x + cell] = big
    return canvas, cell, pad, count


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_plots(report: dict) -> dict[str, bytes]:
    """Every plot of the report: file name -> PNG bytes."""
    return {PLOTS["quality_vs_steps"]: plot_quality_vs_steps(report),
            PLOTS["quality_vs_latency"]: plot_quality_vs_latency(report),
            PLOTS["time_breakdown"]: plot_time_breakdown(report)}
