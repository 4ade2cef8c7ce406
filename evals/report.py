"""The deployment report of `distill eval`: report.json (the data), report.md, and a self-contained report.html.

    distill report outputs/eval      # regenerate report.md, report.html and the plots from report.json

report.json follows evals/schema.json (`evals.schema`); the pages are built by `evals.markdown` and
`evals.html_report` from the tables of `evals.tables` and the images of `evals.plots`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from distill.errors import DataError
from evals.html_report import render_html
from evals.markdown import render_markdown
from evals.plots import GRID_FILE, PLOTS, render_plots
from evals.schema import SCHEMA_VERSION, check
from evals.tables import summary_table

FILES = ("report.json", "report.md", "report.html", GRID_FILE, *PLOTS.values())


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
    """The plots, report.md and report.html from the report dict (the sample grid is read back if present)."""
    images = render_plots(report)
    for name, data in images.items():
        (out / name).write_bytes(data)
    if (out / GRID_FILE).is_file():
        images[GRID_FILE] = (out / GRID_FILE).read_bytes()
    (out / "report.md").write_text(render_markdown(report))
    (out / "report.html").write_text(render_html(report, images))
    return out / "report.html"


def load(out_dir: str | Path) -> dict:
    """report.json of a report folder, checked against this distill's schema version and the schema."""
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


def echo_summary(report: dict, out: Path) -> None:
    """What `distill eval` and `distill demo` print at the end: the table, the recommendations, where the report is."""
    click.echo(summary_table(report))
    for line in report["recommendations"]:
        click.echo(f"- {line['text']}")
    click.echo(f"report: {out / 'report.html'} (data: {out / 'report.json'}; {report['timings']['total_s']:.0f} s)")
