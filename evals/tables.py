"""The report's tables and text sections as plain rows of strings, shared by report.md, report.html and the
terminal summary of `distill eval`: quality, speed, the decision matrix (each student against the best training-free
sampler, its control, and what it cost), the training-free sweep at the screening N and the second judges.
"""

from __future__ import annotations

QUALITY_COLUMNS = [  # key, header, format, higher is better
    ("fd", None, "{:.1f}", False), ("kid", "KID×1000", None, False), ("precision", "precision", "{:.3f}", True),
    ("recall", "recall", "{:.3f}", True), ("diversity", "diversity", "{:.2f}", None),  # None: neither way
    ("collapse", "collapsed", "{:.2f}", False), ("collapse_vs_teacher", "collapsed vs teacher", "{:.2f}", False),
    ("align_top1", "top-1", "{:.3f}", True), ("align_top5", "top-5", "{:.3f}", True),
    ("align_cos", "cos", "{:.3f}", True), ("clip_score", "CLIPScore", "{:.2f}", True),
]
MODEL_HEAD = ["name", "what", "source", "scheduler", "guidance", "weights MiB"]
VERDICT = {True: "better", False: "worse", None: "not significant at this N"}  # evals.decision.compare's `better`
JUDGE = {False: "not independent: trained against this network", True: "independent"}
FLOOR_NOTE = ("The real-vs-real row scores N other real images against the reference at this N: a yardstick of the "
              "metrics' bias at this N, not a bound; a generator can score below it.")


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


def guidance_text(entry: dict) -> str:
    """A row's or sweep entry's guidance: "CFG 2", "input 3" or "none"."""
    if entry["cfg"]:
        return f"CFG {entry['guidance_scale']:g}"
    return f"input {entry['guidance_scale']:g}" if entry.get("guidance_input") else "none"


def sampler_name(entry: dict) -> str:
    """How a training-free row samples, "DPM++2M with CFG 2", from its label (teacher[DPM++2M,cfg2]@4) or else
    its scheduler class."""
    label = entry["label"]
    if label.startswith("teacher[") and "]" in label:
        name = label[len("teacher["):label.index("]")].split(",")[0]
    else:
        name = entry["scheduler"].removesuffix("Scheduler")
    how = guidance_text(entry)
    return f"{name} {'without CFG' if how == 'none' else 'with ' + how.replace('input', 'guidance input')}"


def _judged(report: dict) -> bool:
    """Whether any row was trained against the eval's judge network (then the quality table flags it)."""
    return any(r.get("independent_judge") is False for r in report["rows"])


def quality_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): scheduler, guidance, NFE and the quality columns of every row, then the floor; a judge column
    last when some row's discriminator saw the judge network."""
    columns, judged = quality_columns(report), _judged(report)
    arrow = {True: " ↑", False: " ↓", None: ""}
    head = ["model@steps", "scheduler", "guidance", "NFE"] + [h + arrow[up] for _, h, _, up in columns]
    head += ["judge"] if judged else []
    body = []
    for r in report["rows"]:
        judge = [JUDGE[False] if r.get("independent_judge") is False else "—"] if judged else []
        body.append([r["label"], r["scheduler"], guidance_text(r), str(r["nfe"])]
                    + _quality_cells(r["quality"], columns) + judge)
    if report["floor"] is not None:
        body.append(["real vs real (floor)", "—", "—", "—"] + _quality_cells(report["floor"], columns)
                    + (["—"] if judged else []))
    return head, body


NOT_INDEPENDENT = "not independent"
JUDGES_TITLE = "Second judges"
JUDGES_NOTE = ("Every judge scores the same generated images against the same real ones, each on its own feature "
               "network (FD and KID×1000 at the full N; precision, recall, diversity, alignment, the screening and "
               "every verdict are the first judge's). "
               "Numbers on different networks do not compare with each other: compare rows within a column, and "
               "trust an ordering the judges agree on. 'not independent': the row's student trained against that "
               "network (its student.json's feature_network), so that column favours it.")


def _judge_cells(score: dict | None, independent: bool | None) -> list[str]:
    """FD (marked when the judge is not independent of the row) and KID ± spread of one row on one judge."""
    if not score:
        return ["—", "—"]
    mark = f" ({NOT_INDEPENDENT})" if independent is False else ""
    return [f"{score['fd']:.1f}{mark}", f"{score['kid']:.2f} ± {score['kid_std']:.2f}"]


def judges_table(report: dict) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows): every row, then the floor, on the first judge and on each second judge (--judges), FD and
    KID; a cell is marked "not independent" where the row's student trained against that judge's network. None
    when the report has no second judge."""
    p = report["protocol"]
    judges = p.get("judges") or []
    if not judges:
        return None
    head = ["model@steps", "NFE"]
    for name, fd in [(p["feature_net"], p["fd_name"])] + [(j["name"], j["fd_name"]) for j in judges]:
        head += [f"{name}: {fd} ↓", f"{name}: KID×1000 ↓"]
    body = []
    for r in report["rows"]:
        scores = r.get("judges") or {}
        cells = _judge_cells(r["quality"], r.get("independent_judge"))
        for j in judges:
            score = scores.get(j["name"])
            cells += _judge_cells(score, (score or {}).get("independent"))
        body.append([r["label"], str(r["nfe"])] + cells)
    floor = report["floor"]
    if floor is not None:
        body.append(["real vs real (floor)", "—"] + _judge_cells(floor, None)
                    + sum((_judge_cells((floor.get("judges") or {}).get(j["name"]), None) for j in judges), []))
    return head, body


def comparison_cell(cmp: dict | None, fd_name: str = "FD") -> str:
    """One comparison of evals.decision: "teacher[DPM++2M,cfg2]@4: FD ×0.95, not significant at this N"."""
    if not cmp:
        return "—"
    ratio = "" if cmp["fd_ratio"] is None else f"{fd_name} ×{cmp['fd_ratio']:.2f}, "
    at = f" (N = {cmp['n']})" if "n" in cmp else ""
    return f"{cmp['label']}{at}: {ratio}{verdict(cmp)}"


def verdict(cmp: dict) -> str:
    """"better" / "worse" only when the difference is significant, else "not significant at this N"."""
    return VERDICT[cmp["better"] if cmp["significant"] else None]


def count(images: float | None) -> str:
    """An image count as people say it: 850, 12.3k, 4.1M (None: the student is not cheaper, never repaid)."""
    if images is None:
        return "not cheaper"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if images >= div:
            return f"{images / div:.1f}{unit}"
    return f"{images:.0f}"


def decision_rows(report: dict) -> list[dict]:
    """The rows a decision is about: students and cascades."""
    return [r for r in report["rows"] if r["role"] in ("student", "cascade")]


def decision_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per student / cascade, its FD at full N, its verdicts against the best training-free sampler
    at its steps and at <= its NFE, against its control, its collapse rate, what training cost and when it pays
    back, its size and whether the judge network is independent of it."""
    fd = report["protocol"]["fd_name"]
    head = ["model@steps", "NFE", f"{fd} ↓", "vs training-free, same steps", "vs training-free, ≤ NFE",
            "vs control (what training bought)", "collapsed ↓", "training", "training $",
            "break-even vs teacher (images)", "break-even vs training-free (images)", "adapter / fused MiB", "judge"]
    models = {m["name"]: m for m in report["models"]}
    body = []
    for r in decision_rows(report):
        t, be = r.get("training") or {}, r.get("break_even_images") or {}
        hours = (f"{t['device_hours']:.2f} device-h on {t.get('device', '?')}" if "device_hours" in t else "—")
        body.append([r["label"], str(r["nfe"]), f"{r['quality']['fd']:.1f}", comparison_cell(r.get("vs_baseline"), fd),
                     comparison_cell(r.get("vs_baseline_nfe"), fd), comparison_cell(r.get("vs_control"), fd),
                     _fmt(r["quality"].get("collapse"), "{:.2f}"), hours, _fmt(r.get("training_cost_usd"), "${:.2f}"),
                     count(be["vs_teacher"]) if "vs_teacher" in be else "—",
                     count(be["vs_baseline"]) if "vs_baseline" in be and "vs_baseline" in r else "—",
                     _sizes(models.get(r["model"])), JUDGE.get(r.get("independent_judge"), "—")])
    return head, body


def _sizes(model: dict | None) -> str:
    """"adapter / fused" MiB of a model entry (a LoRA's adapter and the fused network it deploys as)."""
    if model is None:
        return "—"
    adapter = (model.get("metadata") or {}).get("adapter_mb")
    return f"{_fmt(adapter, '{:.1f}')} / {_fmt(model.get('weights_mb'), '{:.0f}')}"


DECISION_NOTE = ("Verdicts compare KID×1000: 'better' or 'worse' only when the two means differ by more than the sum "
                 "of their spreads over subsets, otherwise 'not significant at this N'. FD × is the ratio of the FDs "
                 "(below 1: lower FD than the row compared with). Training-free: the best sampler × guidance of the "
                 "teacher at the same steps, and the best costing at most as many network evaluations (NFE). Control: "
                 "the untrained teacher sampled with the student's own sampler and guidance, at the screening N. "
                 "Break-even: images to generate before the cheaper inference repays the training cost.")


def sweep_entries(report: dict) -> list[dict]:
    """The screening entries by step count: training-free samplers best first, then each student or cascade
    followed by its control, then any other control."""
    entries, out = report.get("sweep") or [], []
    for k in sorted({e["steps"] for e in entries}):
        at = [e for e in entries if e["steps"] == k]
        out += sorted((e for e in at if e["kind"] == "baseline"), key=lambda e: (e["fd"], e["nfe"]))
        for e in (e for e in at if e["kind"] in ("student", "cascade")):
            out += [e] + [c for c in at if c["kind"] == "control" and c.get("control_of") == e["model"]]
        out += [e for e in at if not any(e is o for o in out)]
    return out


def sweep_title(report: dict) -> str | None:
    """"Training-free samplers (screening N = 200)", or None when the report has no sweep."""
    entries = report.get("sweep") or []
    if not entries:
        return None
    return f"Training-free samplers (screening N = {' / '.join(str(n) for n in sorted({e['n'] for e in entries}))})"


def _sweep_what(entry: dict) -> str:
    if entry["kind"] == "baseline":
        return "★ best training-free" if entry["best"] else "training-free"
    if entry["kind"] == "control":
        same = f" (the same sampling as {entry['same_as']}: its scores)" if entry.get("same_as") else ""
        return f"control of {entry.get('control_of') or '?'}: untrained teacher, its sampler{same}"
    return f"{entry['kind']} (its first N images)"


def sweep_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): every screening entry per step count, the best training-free one marked ★, the students'
    and cascades' own screening scores with their controls beside them: all at the same screening N."""
    fd = report["protocol"]["fd_name"]
    head = ["steps", "sampler", "what", "scheduler", "guidance", "NFE", f"{fd} ↓", "KID×1000 ↓", "top-5 ↑"]
    body = [[str(e["steps"]), e["label"] + (" ★" if e["best"] else ""), _sweep_what(e), e["scheduler"],
             guidance_text(e), str(e["nfe"]), f"{e['fd']:.1f}", f"{e['kid']:.2f} ± {e['kid_std']:.2f}",
             _fmt(e.get("align_top5"), "{:.3f}")] for e in sweep_entries(report)]
    return head, body


SWEEP_NOTE = ("Screening: every entry scored on the first N prompts and seeds of the eval (the same ones every "
              "full-N row starts with), so they compare with each other, not with the full-N tables. ★: the lowest "
              "FD at its step count, re-run at the full N as the training-free row the students are judged against.")


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
            "loop speedup", "NFE ratio", "loop / NFE", "batch CV", "warm-up s", "peak MiB", "$ / 1M images"]
    body = []
    for r in report["rows"]:
        s, v = r["speed"], r["vs_teacher"]
        stage = s["stage_ms_per_image"]
        body.append([r["label"], str(r["nfe"]), f"{s['throughput_img_s']:.1f}", f"{stage['text']:.2f}",
                     f"{stage['loop']:.2f}", f"{stage['decode']:.2f}", f"{v['throughput']:.1f}×",
                     f"{v['loop_batch']:.1f}×", f"{v['nfe_ratio']:.1f}", f"{v['loop_vs_nfe']:.2f}",
                     f"{100 * s['loop_cv']:.0f}%" if "loop_cv" in s else "—", _fmt(s.get("warmup_s"), "{:.1f}"),
                     f"{s['peak_mem_mb']:.0f}",
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
    return _aligned(head, lines) + _decision_summary(report)


def _decision_summary(report: dict) -> str:
    """The decision matrix's verdicts for the terminal (empty when no row was compared)."""
    rows = [r for r in decision_rows(report) if any(k in r for k in ("vs_baseline", "vs_baseline_nfe", "vs_control"))]
    if not rows:
        return ""
    def cell(c):
        return "—" if not c else verdict(c) + ("" if c["fd_ratio"] is None else f" (×{c['fd_ratio']:.2f})")

    head = ["model@steps", "vs training-free", "vs ≤ NFE", "vs control", "break-even vs teacher", "judge"]
    lines = [[r["label"], cell(r.get("vs_baseline")), cell(r.get("vs_baseline_nfe")), cell(r.get("vs_control")),
              count((r.get("break_even_images") or {}).get("vs_teacher")) if "break_even_images" in r else "—",
              "NOT independent" if r.get("independent_judge") is False else ""] for r in rows]
    return "\n\nDecision (KID beyond the spreads; FD ratio in brackets):\n" + _aligned(head, lines)


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
    judges = "; ".join(f"{j['fd_name']} and KID×1000 on {j['network']} features at {j['feature_resolution']} px"
                       + (f" ({j['source']})" if j.get("source") else "") for j in p.get("judges") or [])
    items = [
        ("metrics", f"{p['fd_name']} on {p['feature_net']} pooled features at {p['feature_resolution']} px; KID×1000 "
                    f"({kid.get('kernel', 'cubic')}, {kid['subsets']} subsets of {kid['subset_size']}); precision/recall "
                    f"k = {p['precision_recall_k']}; diversity: {p['diversity']['prompts']} prompts × "
                    f"{p['diversity']['samples_per_prompt']} seeds"),
        *([("second judges", f"the same images, the same reference: {judges}")] if judges else []),
        ("N", f"{p['n']} generated images per row, compared with {reference}"),
        ("prompts", p["prompts"]), ("seeds", p["seeds"]),
        ("images", f"{'×'.join(map(str, p['image_resolution']))} px generated" if p.get("image_resolution")
         else "—"),
        ("guidance", p.get("guidance") or "per row"),
        ("alignment", p["alignment"] or "off"),
        ("teacher", f"{p['teacher']} at {p['teacher_steps']} steps with its own scheduler; few-step baseline: "
                    + ("the best training-free sampler × guidance of the sweep per step count"
                       if any(e["kind"] == "baseline" for e in report.get("sweep") or []) else
                       "DDIM, trailing timesteps")),
        ("device", f"{p['device']} ({p['device_name']}), {p['dtype']}{_auto(p)}, {p.get('threads', '?')} threads, batch "
                   f"{p['batch_size']}, torch.compile {'on' if p.get('compile') else 'off'}"),
        ("latency", f"batch 1, {p['latency']['runs']} timed runs{_cap(p['latency'])} after "
                    f"{p['latency']['warmup']} warm-up; p50/p95 nearest rank; CUDA synchronised between stages"),
        ("cost", p["cost_note"]),
        ("versions", ", ".join(f"{k} {v[:12] if 'sha' in k else v}" for k, v in p["versions"].items())),
    ]
    return items


def models_rows(report: dict) -> list[list[str]]:
    """One row per model under MODEL_HEAD."""
    return [[m["name"], _described(m), m["source"], m["scheduler"],
             f"{m['guidance_scale']:g}" + (" (CFG)" if m["cfg"] else " (input)" if m["guidance_input"] else " (none)"),
             _fmt(m.get("weights_mb"), "{:.1f}")] for m in report["models"]]


def _described(model: dict) -> str:
    """The model's description, and for an adversarial student the network its discriminator read."""
    network = (model.get("metadata") or {}).get("feature_network")
    return model["description"] + (f"; its discriminator read {network}" if network else "")


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


def _cap(latency: dict) -> str:
    cap = latency.get("seconds_cap")
    return f" or {cap:g} s of them (at least 5, whichever ends first)" if cap else ""


def _auto(protocol: dict) -> str:
    return " (auto)" if protocol.get("dtype_requested") == "auto" else ""
