"""The eval stage: teacher and students at several step counts, same prompts and seeds, quality and speed.

    distill eval --teacher checkpoints/emoji-sd --student runs/002-lcm-emoji_sd_lora -n 1000 --out outputs/eval

Rows of the report, all generated from the same N prompts with the same per-sample noise:
  teacher@T        the teacher with its own scheduler at its usual steps (T = --teacher-steps), CFG
  teacher@k        the teacher with DDIM (trailing timesteps) at k in --steps, CFG: no distillation
  <student>@k      each student at k steps with its LCMScheduler and the guidance its metadata gives
  real (floor)     N other real images against the reference: the best any generator can score at this N
Quality (`evals.metrics`, `evals.alignment`): FD on the feature net, KID x 1000 (mean, std over subsets),
precision / recall (k = 3), per-prompt diversity, prompt alignment (retrieval among captions, cosine).
Speed (`evals.speed`): batch-1 latency by stage, throughput at --batch-size, peak memory, speedups.
Generated images are turned into features batch by batch and dropped; only a few are kept for the grid.

The pieces: `evals.settings` (what was asked), `evals.reference` (real images, prompts), `evals.generate`,
`evals.measure` (features, metrics), `evals.speed`, `evals.entries` (the report dict), `evals.report` (files).
"""

from __future__ import annotations

import time
from pathlib import Path

from evals import models, speed
from evals.entries import add_models, assemble, row_entry
from evals.generate import GRID_PROMPTS, Generated, encode_all, generate
from evals.measure import Measure, floor_entry, quality
from evals.plots import sample_grid_png
from evals.progress import log
from evals.reference import RealSet, choose_prompts, grid_images, load_real
from evals.report import write
from evals.settings import EvalSettings


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
    measure = Measure(settings.feature_net, settings.alignment, device, settings.feature_resolution)
    guidance = settings.guidance_scale if settings.guidance_scale is not None else guidance_from_students(settings)
    timings["setup_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    state = {"ref": None, "kid_size": max(2, settings.num_samples // 2), "seed": settings.seed}
    floor = _real_features(measure, real, state)
    timings["real_features_s"] = time.perf_counter() - t0

    rows, grids, model_info = [], [], []
    for source in [None] + list(settings.students):
        t0 = time.perf_counter()
        group = _load_group(source, settings, device, dtype, guidance, state, model_info)
        _add(timings, "load_s", time.perf_counter() - t0)
        cands = list(dict.fromkeys(c for c, _ in group))
        add_models(model_info, cands)
        evaluate_candidate(group, prompts, settings, measure, state, rows, grids, timings)
        for cand in cands:
            models.free(cand)

    report = assemble(settings, device, prompts, prompt_source, real, measure, floor, rows, model_info, state, timings)
    t0 = time.perf_counter()
    grid_png = sample_grid_png(grids, prompts[:GRID_PROMPTS], grid_images(real, prompts, GRID_PROMPTS))
    report["timings"]["report_s"] = time.perf_counter() - t0
    report["timings"]["total_s"] = time.perf_counter() - t_start
    write(report, Path(settings.out), grid_png)
    return report


def _prepare(settings: EvalSettings) -> tuple[str, object]:
    """(device, torch dtype), after checking every student exists: fail before the long teacher generation."""
    device = models.check_device(settings.device)
    dtype = models.parse_dtype(settings.dtype, device)
    for source in settings.students:
        models.check_student(source)
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
    return None if real.floor_images is None else floor_entry(measure, real, state)


def _load_group(source, settings, device, dtype, guidance, state, model_info) -> list[tuple]:
    """(candidate, steps) pairs of one loaded model: the teacher's when `source` is None, else one student's."""
    if source is None:
        return _load_teacher(settings, device, dtype, guidance, state)
    log(f"loading student {source}")
    student = models.load_student(source, settings.teacher, device, dtype, settings.compile)
    _unique_name(student, model_info)
    return [(student, k) for k in settings.steps]


def _load_teacher(settings, device, dtype, guidance, state) -> list[tuple]:
    log(f"loading teacher {settings.teacher}")
    usual, baseline = models.load_teacher(settings.teacher, device, dtype, guidance, settings.baseline_guidance,
                                          settings.compile)
    origin = _guidance_origin(settings, guidance)
    log(f"teacher guidance {usual.guidance_scale:g} ({origin})")
    state["image_resolution"] = list(usual.model.resolution())
    state["guidance"] = (f"teacher: CFG {usual.guidance_scale:g} ({origin}); few-step teacher: CFG "
                         f"{baseline.guidance_scale:g}; students: the guidance their student.json gives "
                         "(LCM-LoRA: 1, no CFG; full LCM: its guidance input), shown per row")
    return teacher_rows(usual, baseline, settings)


def teacher_rows(usual: models.Candidate, baseline: models.Candidate, settings: EvalSettings) -> list[tuple]:
    """The teacher at its usual steps first (it is the speed reference), then the few-step DDIM baseline."""
    same = usual.scheduler_config == baseline.scheduler_config and usual.guidance_scale == baseline.guidance_scale
    return [(usual, settings.teacher_steps)] + [(baseline, k) for k in settings.steps
                                                if not (same and k == settings.teacher_steps)]


def evaluate_candidate(group, prompts, settings, measure, state, rows, grids, timings) -> None:
    """Generate, measure and time every (candidate, steps) of one loaded model; append to rows and grids.

    state["ref"]: the reference features; None with --reference none, when the first row (the teacher at
    its usual steps) becomes the reference.
    """
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
        log(f"{label}: batch-1 latency, {settings.latency_runs} runs after {settings.latency_warmup} warm-up")
        lat = speed.latency(cand, steps, prompts[0], settings.latency_runs, settings.latency_warmup, settings.seed)
        _add(timings, "latency_s", time.perf_counter() - t1)
        t2 = time.perf_counter()
        row = _scored_row(cand, steps, gen, text_ms, lat, prompts, settings, measure, state)
        _add(timings, "metrics_s", time.perf_counter() - t2)
        rows.append(row)
        grids.append((label, gen.grid))
        log(f"{label}: {measure.fd_name} {row['quality']['fd']:.1f}, latency p50 {lat['p50_ms']:.1f} ms, "
            f"{row['speed']['throughput_img_s']:.1f} img/s at batch {settings.batch_size}")


def _scored_row(cand: models.Candidate, steps: int, gen: Generated, text_ms: float, lat: dict, prompts: list[str],
                settings: EvalSettings, measure: Measure, state: dict) -> dict:
    """The row of one (candidate, steps) with its quality against the reference features."""
    if state["ref"] is None:
        state["ref"] = gen.feats
    row = row_entry(cand, steps, gen, text_ms, lat, settings.batch_size)
    row["quality"] = quality(measure, state["ref"], gen.feats, state["kid_size"], settings.seed)
    row["quality"]["diversity"] = gen.diversity
    if gen.embeddings is not None:
        row["quality"].update(measure.alignment(gen.embeddings, prompts))
    return row


def _add(timings: dict, key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


def guidance_from_students(settings: EvalSettings) -> float | None:
    """The teacher guidance the (first) student was distilled to imitate, from its student.json."""
    from distill.info import INFO_FILE, StudentInfo

    found = []
    for source in settings.students:
        path = Path(source)
        if (path / INFO_FILE).is_file():
            found.append(float(StudentInfo.load(path).teacher_guidance_scale))
        elif path.is_dir() and not (path / "model_index.json").is_file():
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
