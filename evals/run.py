"""The eval stage: teacher and students at several step counts, same prompts and seeds, quality and speed.

    distill eval --teacher checkpoints/emoji-sd --student runs/002-lcm-emoji_sd_lora -n 1000 --out outputs/eval

Rows of the report, all generated from the same N prompts with the same per-sample noise:
  teacher@T        the teacher with its own scheduler at its usual steps (T = --teacher-steps), CFG
  teacher@k        the teacher with DDIM (trailing timesteps) at k in --steps, CFG: no distillation
  <student>@k      each student at k steps with its LCMScheduler and the guidance its metadata gives
  real (floor)     N other real images against the reference: the metric's bias at this N (a yardstick, not a bound)
Quality (`evals.metrics`, `evals.alignment`): FD on the feature net, KID x 1000 (mean, std over subsets),
precision / recall (k = 3), per-prompt diversity, prompt alignment (retrieval among captions, cosine); with
--judges, FD and KID on each further feature network too, from the same images in the same pass.
Speed (`evals.speed`): batch-1 latency by stage, throughput at --batch-size, peak memory, speedups.
Generated images are turned into features batch by batch and dropped; only a few are kept for the grid.

The pieces: `evals.settings` (what was asked), `evals.reference` (real images, prompts), `evals.generate`,
`evals.measure` (features, metrics), `evals.speed`, `evals.entries` (the report dict), `evals.report` (files).
"""

from __future__ import annotations

import time
from pathlib import Path

from evals import gap, models, speed
from evals.baselines import best_per_steps, control_candidate, defaults_for, sampling_key, sweep_candidates
from evals.cascade_rows import cascade_for
from evals.entries import add_models, assemble, row_entry
from evals.generate import GRID_PROMPTS, Generated, encode_all, generate
from evals.measure import Measure, floor_entry, judge_quality, quality
from evals.plots import sample_grid_png
from evals.preflight import check_eval
from evals.progress import log
from evals.reference import RealSet, choose_prompts, grid_images, load_real
from evals.report import write
from evals.settings import EvalSettings
from evals.sweep import screen, screen_n, screen_quality, student_entries


def run_eval(settings: EvalSettings) -> dict:
    """Run the whole eval and write the report folder; returns the report dict."""
    settings.check()
    _quiet_loading()
    device, dtype = _prepare(settings)
    t_start = time.perf_counter()
    timings: dict = {}

    t0 = time.perf_counter()
    real = load_real(settings.reference, settings.num_samples, settings.seed)
    prompts, prompt_source = choose_prompts(settings, real)
    measure = Measure(settings.feature_net, settings.alignment, device, settings.feature_resolution, settings.judges)
    guidance = settings.guidance_scale if settings.guidance_scale is not None else guidance_from_students(settings)
    timings["setup_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    state = {"ref": None, "judge_ref": {}, "kid_size": max(2, settings.num_samples // 2), "seed": settings.seed}
    floor = _real_features(measure, real, state)
    timings["real_features_s"] = time.perf_counter() - t0

    rows, grids, model_info, sweep = [], [], [], []
    teacher = _teacher_stage(settings, device, dtype, guidance, prompts, measure, state, rows, grids, model_info,
                             sweep, timings)
    t0 = time.perf_counter()
    state["gap"] = gap.start(teacher, real, prompts, settings.consistency_gap, settings.seed, settings.batch_size)
    if state["gap"] is not None:
        _add(timings, "consistency_gap_s", time.perf_counter() - t0)
    for source in settings.students:
        _student_stage(source, teacher, settings, device, dtype, prompts, measure, state, rows, grids, model_info,
                       sweep, timings)
    models.free(teacher)
    sweep += student_entries(rows)
    _collapse_vs_teacher(rows, settings.teacher_steps)

    report = assemble(settings, device, prompts, prompt_source, real, measure, floor, rows, model_info, state, timings,
                      sweep)
    if state["gap"] is not None:
        report["consistency_gap"] = state["gap"].entry()
    t0 = time.perf_counter()
    grid_png = sample_grid_png(grids, prompts[:GRID_PROMPTS], grid_images(real, prompts, GRID_PROMPTS))
    report["timings"]["report_s"] = time.perf_counter() - t0
    report["timings"]["total_s"] = time.perf_counter() - t_start
    write(report, Path(settings.out), grid_png)
    return report


def _prepare(settings: EvalSettings) -> tuple[str, object]:
    """(device, torch dtype), after every check that needs no image (`evals.preflight`): the report folder, the
    teacher's files, each student's files and sampler: fail before the long teacher generation."""
    device = models.check_device(settings.device)
    dtype = models.parse_dtype(settings.dtype, device)
    check_eval(settings)
    if settings.compile and device == "cpu":
        log("--compile on CPU: inductor compiles once per new batch shape (minutes); the timings leave warm-up out")
    return device, dtype


def _quiet_loading() -> None:
    """No per-file loading bars from diffusers/transformers: the eval prints its own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _real_features(measure: Measure, real: RealSet | None, state: dict) -> dict | None:
    """Reference features into state["ref"]; returns the floor entry when there is a disjoint floor set."""
    if real is None:
        return None
    log(f"features of {len(real.images)} reference images"
        + (f" and {len(real.floor_images)} floor images" if real.floor_images is not None else ""))
    state["ref"] = measure.features(real.images)
    state["judge_ref"] = measure.judge_features(real.images)
    return None if real.floor_images is None else floor_entry(measure, real, state)


def _teacher_stage(settings, device, dtype, guidance, prompts, measure, state, rows, grids, model_info, sweep,
                   timings) -> models.Candidate:
    """The teacher at its usual steps, the training-free sweep at screening N, and its best per step count at full
    N (or, without a sweep, the single DDIM baseline). Returns the teacher candidate, kept loaded for the controls."""
    t0 = time.perf_counter()
    usual, baseline = _load_teacher(settings, device, dtype, guidance, state)
    _add(timings, "load_s", time.perf_counter() - t0)
    add_models(model_info, [usual])
    evaluate_candidate([(usual, settings.teacher_steps)], prompts, settings, measure, state, rows, grids, timings)
    if not settings.baselines:
        group = [(baseline, k) for k in settings.steps if not (_same(usual, baseline) and k == settings.teacher_steps)]
    else:
        group = _sweep(usual, settings, prompts, measure, state, sweep, timings)
    add_models(model_info, list(dict.fromkeys(c for c, _ in group)))
    start = len(rows)
    evaluate_candidate(group, prompts, settings, measure, state, rows, grids, timings)
    for row in rows[start:]:
        row["baseline"] = True
    return usual


def _sweep(usual, settings, prompts, measure, state, sweep, timings) -> list[tuple]:
    """Screen every sampler spec x guidance x step count; the best per step count, as (candidate, steps) pairs."""
    t0 = time.perf_counter()
    cands = sweep_candidates(usual.model, usual.source, defaults_for(usual.model.schedule.family, settings.baselines))
    n = screen_n(settings, len(prompts))
    log(f"training-free sweep: {len(cands)} samplers x {len(settings.steps)} step counts at N = {n}")
    entries = screen(cands, settings.steps, prompts[:n], settings, measure, state["ref"], "baseline")
    keys = [sampling_key(c, k) for c in cands for k in settings.steps]  # screen's order: candidates x steps
    state["screened"] = dict(zip(keys, entries))
    best = best_per_steps(entries)
    for entry in best.values():
        entry["best"] = True
    sweep.extend(entries)
    _add(timings, "sweep_s", time.perf_counter() - t0)
    by_name = {c.name: c for c in cands}
    return [(by_name[best[k]["model"]], k) for k in settings.steps]


def _student_stage(source, teacher, settings, device, dtype, prompts, measure, state, rows, grids, model_info, sweep,
                   timings) -> None:
    """One student's rows at full N, its control entries at screening N, and the cascades that draft with it."""
    t0 = time.perf_counter()
    log(f"loading student {source}")
    student = models.load_student(source, settings.teacher, device, dtype, settings.compile, settings.student_sampler)
    _unique_name(student, model_info)
    _add(timings, "load_s", time.perf_counter() - t0)
    add_models(model_info, [student])
    steps = [k for k in settings.steps if student.supports(k)]
    if steps != list(settings.steps):
        log(f"{student.name}: its sampler has no schedule for {sorted(set(settings.steps) - set(steps))} steps; skipped")
    evaluate_candidate([(student, k) for k in steps], prompts, settings, measure, state, rows, grids, timings)
    if settings.control and state["ref"] is not None:
        t1 = time.perf_counter()
        control = control_candidate(teacher.model, teacher.source, student)
        n = screen_n(settings, len(prompts))
        reused, todo = _reuse_screened(control, steps, state)
        sweep.extend(reused + screen([control], todo, prompts[:n], settings, measure, state["ref"], "control"))
        _add(timings, "control_s", time.perf_counter() - t1)
    if state["gap"] is not None:
        t1 = time.perf_counter()
        gap.measure(state["gap"], student, teacher, settings.batch_size)
        _add(timings, "consistency_gap_s", time.perf_counter() - t1)
    for spec in settings.cascades:
        cascade = cascade_for(spec, source, student, teacher)
        if cascade is not None:
            add_models(model_info, [cascade])
            evaluate_candidate([(cascade, cascade.spec.k)], prompts, settings, measure, state, rows, grids, timings)
    models.free(student)


def _reuse_screened(control: models.Candidate, steps: list[int], state: dict) -> tuple[list[dict], list[int]]:
    """Control entries the sweep already screened (the same sampling of the same model: the same images), copied
    under the control's name; and the step counts still to screen."""
    reused, todo = [], []
    for k in steps:
        found = state.get("screened", {}).get(sampling_key(control, k))
        if found is None:
            todo.append(k)
            continue
        log(f"{control.label(k)}: samples as {found['label']} of the sweep does; its screening scores are reused")
        reused.append(found | {"label": control.label(k), "model": control.name, "kind": "control",
                               "control_of": control.metadata["control_of"], "best": False, "seconds": 0.0,
                               "same_as": found["label"]})
    return reused, todo


def _load_teacher(settings, device, dtype, guidance, state) -> tuple[models.Candidate, models.Candidate]:
    log(f"loading teacher {settings.teacher}")
    usual, baseline = models.load_teacher(settings.teacher, device, dtype, guidance, settings.baseline_guidance,
                                          settings.compile)
    origin = _guidance_origin(settings, guidance)
    log(f"teacher guidance {usual.guidance_scale:g} ({origin})")
    state["image_resolution"] = list(usual.model.resolution())
    few = ("few-step teacher: the best of the training-free sweep per step count (its sampler and CFG per row)"
           if settings.baselines else f"few-step teacher: {baseline.description}, CFG {baseline.guidance_scale:g}")
    state["guidance"] = (f"teacher: CFG {usual.guidance_scale:g} ({origin}); {few}; students: the guidance their "
                         "student.json gives (LCM-LoRA: 1, no CFG; full LCM: its guidance input), shown per row")
    return usual, baseline


def _same(usual: models.Candidate, baseline: models.Candidate) -> bool:
    return usual.scheduler_config == baseline.scheduler_config and usual.guidance_scale == baseline.guidance_scale


def evaluate_candidate(group, prompts, settings, measure, state, rows, grids, timings) -> None:
    """Generate, measure and time every (candidate, steps) of one loaded model; append to rows and grids.

    state["ref"]: the reference features; None with --reference none, when the first row (the teacher at
    its usual steps) becomes the reference.
    """
    if not group:  # a student whose sampler takes none of --steps (refused up front; kept safe here)
        return
    t0 = time.perf_counter()
    conds, text_ms = encode_all(group[0][0], prompts, settings.batch_size)
    _add(timings, "text_encode_s", time.perf_counter() - t0)
    for cand, steps in group:
        label = cand.label(steps)
        how = (f"CFG {cand.guidance_scale:g}" if cand.cfg else
               f"guidance input {cand.guidance_scale:g}" if cand.guidance_input else "no CFG")
        log(f"{label}: {len(prompts)} images at batch {settings.batch_size} ({cand.scheduler_name}, {how}, "
            f"NFE {cand.nfe(steps)})")
        gen = generate(cand, steps, prompts, conds, settings, measure, label)
        t1 = time.perf_counter()
        cap = f" or {settings.latency_seconds:g} s" if settings.latency_seconds > 0 else ""
        log(f"{label}: batch-1 latency, {settings.latency_runs} runs{cap} after {settings.latency_warmup} warm-up")
        lat = speed.latency(cand, steps, prompts[0], settings.latency_runs, settings.latency_warmup, settings.seed,
                            settings.latency_seconds or None)
        _add(timings, "latency_s", time.perf_counter() - t1)
        t2 = time.perf_counter()
        row = _scored_row(cand, steps, gen, text_ms, lat, prompts, settings, measure, state)
        _add(timings, "metrics_s", time.perf_counter() - t2)
        rows.append(row)
        grids.append((label, gen.grid))
        judged = "".join(f", {measure.judges[k].fd_name} {v['fd']:.1f}" for k, v in row.get("judges", {}).items())
        log(f"{label}: {measure.fd_name} {row['quality']['fd']:.1f}{judged}, latency p50 {lat['p50_ms']:.1f} ms, "
            f"{row['speed']['throughput_img_s']:.1f} img/s at batch {settings.batch_size}")


def _scored_row(cand: models.Candidate, steps: int, gen: Generated, text_ms: float, lat: dict, prompts: list[str],
                settings: EvalSettings, measure: Measure, state: dict) -> dict:
    """The row of one (candidate, steps) with its quality against the reference features (on every judge)."""
    if state["ref"] is None:
        state["ref"], state["judge_ref"] = gen.feats, gen.judge_feats
    row = row_entry(cand, steps, gen, text_ms, lat, settings.batch_size)
    row["quality"] = quality(measure, state["ref"], gen.feats, state["kid_size"], settings.seed)
    if measure.judges:
        row["judges"] = judge_quality(state["judge_ref"], gen.judge_feats, state["kid_size"], settings.seed)
    row["quality"]["diversity"] = gen.diversity
    if gen.collapse is not None:
        row["quality"]["collapse"] = gen.collapse
    row["spreads"] = gen.spreads
    if gen.embeddings is not None:
        row["quality"].update(measure.alignment(gen.embeddings, prompts))
    n = screen_n(settings, len(prompts))  # its score at the screening N, comparable with the sweep and the controls
    row["screen"] = screen_quality(measure, state["ref"], gen.feats, prompts[:n], gen.embeddings, settings.seed)
    return row


def _collapse_vs_teacher(rows: list[dict], teacher_steps: int) -> None:
    """Each row's collapse paired per prompt with the teacher at its usual steps (same prompts and seeds); the
    per-prompt spreads are dropped from the rows afterwards."""
    import torch

    from evals.metrics import collapse_vs_teacher

    usual = next((r for r in rows if r["role"] == "teacher" and r["steps"] == teacher_steps and r.get("spreads")), None)
    teacher = torch.tensor(usual["spreads"]) if usual is not None else None
    for row in rows:
        spreads = row.pop("spreads", None)
        if teacher is not None and spreads and len(spreads) == len(teacher):
            row["quality"]["collapse_vs_teacher"] = collapse_vs_teacher(torch.tensor(spreads), teacher)


def _add(timings: dict, key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


def guidance_from_students(settings: EvalSettings) -> float | None:
    """The teacher guidance the (first) student was distilled to imitate, from its student.json."""
    from distill.info import INFO_FILE, LORA_WEIGHTS, StudentInfo

    found = []
    for source in settings.students:
        path = Path(source)
        if (path / INFO_FILE).is_file():
            found.append(float(StudentInfo.load(path).teacher_guidance_scale))
        elif path.is_dir() and not (path / "model_index.json").is_file() and not (path / LORA_WEIGHTS).is_file():
            from distill.runs import student_folder

            found.append(float(StudentInfo.load(student_folder(path)).teacher_guidance_scale))
    if len(set(found)) > 1:
        log(f"the students imitate different teacher guidance {sorted(set(found))}: the teacher uses the first "
            f"student's, {found[0]:g} (pass --guidance-scale to choose)")
    return found[0] if found else None


def _guidance_origin(settings: EvalSettings, guidance: float | None) -> str:
    """Where the teacher's guidance came from, for the log and the report."""
    if settings.guidance_scale is not None:
        return "--guidance-scale"
    if guidance is not None:
        return "the guidance the students were distilled to imitate, per their student.json"
    return "the pipeline's default; pass --guidance-scale to change it"


def _unique_name(student: models.Candidate, model_info: list[dict]) -> None:
    """Rename a student whose name an earlier model took (name-2, name-3, ...)."""
    taken = {m["name"] for m in model_info}
    base, i = student.name, 2
    while student.name in taken:
        student.name, i = f"{base}-{i}", i + 1
