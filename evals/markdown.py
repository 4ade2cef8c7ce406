"""report.md: the report as markdown, its plots and sample grid linked beside it."""

from __future__ import annotations

from evals.gap import GAP_TITLE, gap_note, gap_skipped, gap_tables
from evals.plots import GRID_FILE, PLOTS
from evals.tables import (DECISION_NOTE, FLOOR_NOTE, JUDGES_NOTE, JUDGES_TITLE, MODEL_HEAD, SWEEP_NOTE, bar_lines,
                          decision_rows, decision_table, judges_table, latency_table, mem_note, models_rows,
                          protocol_items, quality_table, sweep_table, sweep_title, throughput_table, timings_line)


def render_markdown(report: dict) -> str:
    """The whole report.md."""
    p = report["protocol"]
    out = [f"# Distillation report: {p['teacher']}", "",
           f"{len(report['rows'])} configurations, N = {p['n']}, {p['device']} ({p['device_name']}), {p['dtype']}; "
           f"created {report['created']}.", "", "## Recommendation", ""]
    out += [f"- {'**' + r['text'] + '**' if r['kind'] == 'warning' else r['text']}" for r in report["recommendations"]]
    out += _decision_sections(report)
    out += ["", "## Quality", "", _md_table(*quality_table(report)), "", FLOOR_NOTE, ""]
    out += _judges_section(report)
    out += [f"![quality vs steps]({PLOTS['quality_vs_steps']})", ""]
    out += _gap_section(report)
    out += ["## Speed", "",
            f"Latency at batch 1 (p50 per stage; mem: {mem_note(report)}):", "", _md_table(*latency_table(report)), "",
            f"Throughput at batch {p['batch_size']} (the quality run itself):", "",
            _md_table(*throughput_table(report)), "",
            "Denoising-loop speedup against the NFE ratio (the bar: within 10% at batch "
            f"{p['batch_size']}):", ""]
    out += [f"- {line}" for line in bar_lines(report)]
    out += ["", f"![quality vs latency]({PLOTS['quality_vs_latency']})", "",
            f"![time breakdown]({PLOTS['time_breakdown']})", "", "## Samples (same prompts, same seeds)", "",
            f"![samples]({GRID_FILE})", "", "## Models", "", _md_table(MODEL_HEAD, models_rows(report)), "",
            "## Protocol", ""]
    out += [f"- **{k}**: {v}" for k, v in protocol_items(report)]
    out += ["", "## Eval timings (s)", "", timings_line(report), ""]
    return "\n".join(out)


def _decision_sections(report: dict) -> list[str]:
    """The decision matrix and the training-free sweep, where the report has them."""
    out = []
    if decision_rows(report):
        out += ["", "## Decision matrix", "", _md_table(*decision_table(report)), "", DECISION_NOTE]
    title = sweep_title(report)
    if title:
        out += ["", f"## {title}", "", _md_table(*sweep_table(report)), "", SWEEP_NOTE]
    return out


def _judges_section(report: dict) -> list[str]:
    """The second judges' table, where the eval had any (--judges)."""
    table = judges_table(report)
    return [] if table is None else [f"## {JUDGES_TITLE}", "", _md_table(*table), "", JUDGES_NOTE, ""]


def _gap_section(report: dict) -> list[str]:
    """Per consistency student, its gap to the teacher's ODE along t, and one line on students not measured."""
    tables, skipped = gap_tables(report), gap_skipped(report)
    if not tables and not skipped:
        return []
    out = [f"## {GAP_TITLE}", "", gap_note(report), ""]
    for name, head, body, line in tables:
        out += [f"`{name}`: {line}", "", _md_table(head, body), ""]
    return out + ([skipped, ""] if skipped else [])


def _md_table(head: list[str], body: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(esc(c) for c in row) + " |" for row in body])
