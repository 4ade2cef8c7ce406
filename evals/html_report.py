"""report.html: one self-contained page. Images are inlined as base64 and the style sits in a <style> block,
so it loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import re

from evals.gap import GAP_TITLE, gap_note, gap_skipped, gap_tables
from evals.plots import GRID_FILE, PLOTS
from evals.recommend import NOISY_CV
from evals.tables import (DECISION_NOTE, FLOOR_NOTE, JUDGES_NOTE, JUDGES_TITLE, MODEL_HEAD, SWEEP_NOTE, bar_lines,
                          decision_rows, decision_table, judges_table, latency_table, mem_note, models_rows,
                          protocol_items, quality_columns, quality_table, sweep_entries, sweep_table, sweep_title,
                          throughput_table, timings_line)

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
ul.rec li.warning { font-weight: 700; color: #9a3412; }
tr.best-sampler td { font-weight: 700; background: #f3fbf3; } tr.control td { color: #555; font-style: italic; }
tr.own td { background: #f6f9ff; }
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
    for j, (key, _, _, up) in enumerate(quality_columns(report)):
        if key == "diversity":  # more is not simply better: noise is diverse too
            continue
        values = [(r["quality"][key], i) for i, r in enumerate(report["rows"]) if key in r["quality"]]
        if values:
            best.add(((max if up else min)(values)[1], 4 + j))
    return best


def _decision_sections(report: dict) -> str:
    """The decision matrix and the training-free sweep (★ rows bold, controls in italics), where present."""
    e, out = html.escape, ""
    if decision_rows(report):
        out += (f"<h2>Decision matrix</h2>\n{_html_table(*decision_table(report))}\n"
                f"<p class=\"note\">{e(DECISION_NOTE)}</p>\n")
    title = sweep_title(report)
    if title:
        kind = {"control": "control", "student": "own", "cascade": "own"}
        classes = ["best-sampler" if x["best"] else kind.get(x["kind"], "") for x in sweep_entries(report)]
        out += (f"<h2>{e(title)}</h2>\n{_html_table(*sweep_table(report), classes=classes)}\n"
                f"<p class=\"note\">{e(SWEEP_NOTE)}</p>\n")
    return out


def _judges_section(report: dict, classes: list[str]) -> str:
    """The second judges' table (teacher rows shaded, the floor in italics), where the eval had any."""
    table = judges_table(report)
    if table is None:
        return ""
    return (f"<h2>{html.escape(JUDGES_TITLE)}</h2>\n{_html_table(*table, classes=classes)}\n"
            f"<p class=\"note\">{html.escape(JUDGES_NOTE)}</p>\n")


def _gap_section(report: dict) -> str:
    """Per consistency student, its gap to the teacher's ODE along t (see `evals.gap`), where the eval measured it."""
    e, tables, skipped = html.escape, gap_tables(report), gap_skipped(report)
    if not tables and not skipped:
        return ""
    out = f"<h2>{e(GAP_TITLE)}</h2>\n<p class=\"note\">{e(gap_note(report))}</p>\n"
    for name, head, body, line in tables:
        out += f"<h3>{e(name)}</h3><p>{_code(e(line))}</p>\n{_html_table(head, body)}\n"
    return out + (f"<p class=\"note\">{_code(e(skipped))}</p>\n" if skipped else "")


def _inline_png(images: dict[str, bytes], name: str, alt: str) -> str:
    """An <img> carrying the PNG itself, or a note where it is missing."""
    e = html.escape
    if name not in images:
        return f'<p class="note">({e(name)} missing)</p>'
    return f'<img alt="{e(alt)}" src="data:image/png;base64,{base64.b64encode(images[name]).decode()}">'


def render_html(report: dict, images: dict[str, bytes]) -> str:
    """The whole report.html; `images` maps the plot and grid file names to their PNG bytes."""
    e, p = html.escape, report["protocol"]
    img = lambda name, alt: _inline_png(images, name, alt)  # noqa: E731
    rows = report["rows"]
    classes = ["teacher" if r["role"] == "teacher" else "" for r in rows] + ["floor"]
    kinds = {"latency_budget": "budget", "warning": "warning"}
    rec = "".join(f'<li class="{kinds.get(r["kind"], "")}">{_code(e(r["text"]))}</li>'
                  for r in report["recommendations"])
    protocol = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in protocol_items(report))
    bar = "".join(f"<li>{e(line)}</li>" for line in bar_lines(report))
    timings = timings_line(report)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Distillation report: {e(p['teacher'])}</title><style>{STYLE}</style></head>
<body>
<h1>Distillation report: {e(p['teacher'])}</h1>
<p class="sub">{len(rows)} configurations · N = {p['n']} · {e(p['device'])} ({e(p['device_name'])}) ·
{e(p['dtype'])} · schema {e(report['schema_version'])} · {e(report['created'])}</p>
<h2>Recommendation</h2><ul class="rec">{rec}</ul>
{_decision_sections(report)}
<h2>Quality</h2>
{_html_table(*quality_table(report), classes=classes, best=_best_cells(report))}
<p class="note">Bold: best generated value in the column (not for diversity). Teacher rows shaded. {e(FLOOR_NOTE)}</p>
{_judges_section(report, classes)}
{img(PLOTS['quality_vs_steps'], 'quality vs steps')}
{_gap_section(report)}
<h2>Speed</h2>
<h3>Latency at batch 1</h3><p class="note">p50 of each stage over the timed runs; speedups against {e(rows[0]['label'])};
memory: {e(mem_note(report))}.</p>
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
<h2>Models</h2>{_html_table(MODEL_HEAD, models_rows(report))}
<h2>Protocol</h2><dl>{protocol}</dl>
<p class="note">Eval timings (s): {e(timings)}</p>
</body></html>
"""
