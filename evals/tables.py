"""The report's tables and text sections as plain rows of strings, shared by report.md, report.html and the
terminal summary of `distill eval`.
"""

from __future__ import annotations

QUALITY_COLUMNS = [  # key, header, format, higher is better
    ("fd", None, "{:.1f}", False), ("kid", "KID×1000", None, False), ("precision", "precision", "{:.3f}", True),
    ("recall", "recall", "{:.3f}", True), ("diversity", "diversity", "{:.2f}", None),  # None: neither way
    ("align_top1", "top-1", "{:.3f}", True), ("align_top5", "top-5", "{:.3f}", True),
    ("align_cos", "cos", "{:.3f}", True), ("clip_score", "CLIPScore", "{:.2f}", True),
]
MODEL_HEAD = ["name", "what", "source", "scheduler", "guidance", "weights MiB"]


def _fmt(value, spec: str = "{:.1f}") -> str:
    return "—" if value is None else spec.format(value)


def _quality_cells(q: dict | None, columns) -> list[str]:
    cells = []
    for key, _, spec, _ in columns:
        if q is None or key not in q:
            cells.append("—")
        elif key == "kid":
            cells.append(f"{q['kid']:.2f} ± {q['kid_std']:.2f}")
        else:
            cells.append(_fmt(q[key], spec))
    return cells


def quality_columns(report: dict) -> list[tuple]:
    """Quality columns present in at least one row, the FD one named after its network."""
    present = set().union(*(r["quality"] for r in report["rows"]))
    return [(k, report["protocol"]["fd_name"] if k == "fd" else h, s, up) for k, h, s, up in QUALITY_COLUMNS
            if k in present]


def quality_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): scheduler, guidance, NFE and the quality columns of every row, then the floor."""
    columns = quality_columns(report)
    arrow = {True: " ↑", False: " ↓", None: ""}
    head = ["model@steps", "scheduler", "guidance", "NFE"] + [h + arrow[up] for _, h, _, up in columns]
    body = []
    for r in report["rows"]:
        guidance = f"CFG {r['guidance_scale']:g}" if r["cfg"] else (
            f"input {r['guidance_scale']:g}" if r["guidance_input"] else "none")
        body.append([r["label"], r["scheduler"], guidance, str(r["nfe"])]
                    + _quality_cells(r["quality"], columns))
    if report["floor"] is not None:
        body.append(["real vs real (floor)", "—", "—", "—"] + _quality_cells(report["floor"], columns))
    return head, body


def latency_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): batch-1 latency by stage and speedups."""
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
    """(header, rows): throughput at the quality run's batch, time per image by stage, cost."""
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
    return _aligned(head, lines)


def _aligned(head: list[str], lines: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first one left-aligned, the others right-aligned."""
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def protocol_items(report: dict) -> list[tuple[str, str]]:
    """(topic, sentence) pairs saying how every number was measured."""
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


def models_rows(report: dict) -> list[list[str]]:
    """One row per model under MODEL_HEAD."""
    return [[m["name"], m["description"], m["source"], m["scheduler"],
             f"{m['guidance_scale']:g}" + (" (CFG)" if m["cfg"] else " (input)" if m["guidance_input"] else " (none)"),
             _fmt(m.get("weights_mb"), "{:.1f}")] for m in report["models"]]


def mem_note(report: dict) -> str:
    """What the peak-memory column measured."""
    kind = report["rows"][0]["speed"]["latency"]["mem_kind"]
    return {"cuda_max_allocated": "CUDA max allocated during the measurement",
            "process_peak_rss": "peak resident memory of the whole eval process during the measurement (CPU)",
            }.get(kind, "peak resident memory of the eval process since it started (CPU)")


def bar_lines(report: dict) -> list[str]:
    """Each row's denoising-loop speedup against its NFE ratio (the bar: within 10%)."""
    lines = []
    for r in report["rows"][1:]:
        v = r["vs_teacher"]
        verdict = "within 10%" if v["loop_within_10pct_of_nfe"] else "NOT within 10%"
        lines.append(f"{r['label']}: denoising loop {v['loop_batch']:.1f}× faster at batch "
                     f"{r['speed']['batch_size']} vs NFE ratio {v['nfe_ratio']:.1f} ({v['loop_vs_nfe']:.2f}, "
                     f"{verdict}); "
                     f"at batch 1 {v['loop_batch1']:.1f}×")
    return lines


def timings_line(report: dict) -> str:
    """Where the eval's own time went, in seconds."""
    return ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items())
