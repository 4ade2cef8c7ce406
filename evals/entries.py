"""The entries of report.json (see evals/schema.json): one row per (model, steps), one entry per model, the
protocol that says how everything was measured, and the whole report dict with speedups, cost and advice.
"""

from __future__ import annotations

import datetime
import sys
from dataclasses import asdict

import torch

from distill.device import device_name

from evals import cores, models, speed
from evals.decision import decide
from evals.generate import Generated
from evals.measure import Measure
from evals.recommend import recommend
from evals.reference import RealSet
from evals.schema import SCHEMA_VERSION
from evals.settings import EvalSettings


def row_entry(cand: models.Candidate, steps: int, gen: Generated, text_ms: float, lat: dict, batch: int) -> dict:
    """A row's identity and speed; quality and the comparison with the teacher are added later."""
    stage = dict(gen.clock["stage_ms_per_image"], text=text_ms)
    per_image_ms = sum(stage.values())
    extra = {k: cand.metadata[k] for k in ("training", "feature_network", "control_of", "method") if cand.metadata.get(k)}
    return extra | {
        "label": cand.label(steps), "model": cand.name, "role": cand.role, "kind": cand.kind, "steps": steps,
        "scheduler": cand.scheduler_name, "guidance_scale": cand.guidance_scale, "cfg": cand.cfg,
        "guidance_input": cand.guidance_input, "nfe": cand.nfe(steps),
        "speed": {"latency": lat, "batch_size": batch, "stage_ms_per_image": stage,
                  "throughput_img_s": 1000 / per_image_ms, "peak_mem_mb": gen.peak["mb"], "mem_kind": gen.peak["kind"],
                  "generation_s": gen.clock["seconds"], "loop_cv": gen.clock["loop_cv"],
                  "warmup_s": gen.clock["warmup_s"],
                  "weights_mb": models.weights_mb(cand.model)},
    }


def add_models(model_info: list[dict], cands: list[models.Candidate]) -> None:
    """One entry per distinct way of sampling (the teacher's few-step DDIM may be its own scheduler)."""
    for cand in cands:
        entry = _model_entry(cand)
        keys = ("name", "source", "scheduler", "guidance_scale")
        same = [m for m in model_info if all(m[k] == entry[k] for k in keys)]
        if same:
            same[0]["description"] += "; also the few-step baseline (no distillation)"
        else:
            model_info.append(entry)


def _model_entry(cand: models.Candidate) -> dict:
    """What the report says about one model: where it came from, how it samples, its weights."""
    return {"name": cand.name, "role": cand.role, "kind": cand.kind, "source": cand.source,
            "description": cand.description, "scheduler": cand.scheduler_name, "guidance_scale": cand.guidance_scale,
            "cfg": cand.cfg, "guidance_input": cand.guidance_input, "weights_mb": models.weights_mb(cand.model),
            "metadata": {k: v for k, v in cand.metadata.items() if isinstance(v, (str, int, float, bool))}}


def assemble(settings, device, prompts, prompt_source, real, measure, floor, rows, model_info, state, timings,
             sweep=()) -> dict:
    """The report dict (see evals/schema.json): protocol, models, rows with speedups and cost, the sweep, floor."""
    _compare_with_teacher(rows, settings.price_per_gpu_hour)
    decide(rows, list(sweep), settings.price_per_gpu_hour, settings.feature_net)
    timings["features_s"] = measure.seconds["features"]
    timings["features_img_s"] = measure.images / max(measure.seconds["features"], 1e-9)
    if measure.judges:
        timings["judges_s"] = measure.seconds["judges"]
    timings["alignment_s"] = measure.seconds["alignment"]
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("distill") else None,
        "protocol": protocol(settings, device, prompt_source, real, measure, state, len(prompts)),
        "models": model_info, "rows": rows, "floor": floor, "sweep": list(sweep),
        "timings": {k: float(v) for k, v in timings.items()},
    }
    report["recommendations"] = recommend(report)
    return report


def _compare_with_teacher(rows: list[dict], price_per_hour: float) -> None:
    """Add each row's speedups and FD ratio against the first row (the teacher at its usual steps), and its cost."""
    teacher = rows[0]  # the teacher at its usual steps is always generated first
    for row in rows:
        teacher_fd = teacher["quality"]["fd"]  # 0 with --reference none: the teacher is the reference
        row["vs_teacher"] = speed.speedups(row, teacher) | {
            "fd_ratio": row["quality"]["fd"] / teacher_fd if teacher_fd > 1e-6 else None}
        row["cost_usd_per_million"] = speed.cost_per_million(row["speed"]["throughput_img_s"], price_per_hour)


def versions() -> dict[str, str]:
    """Library versions and the hashes of the metric networks (as evals/calibrate.py records them), plus diffusers."""
    import diffusers

    from evals.calibrate import versions as metric_versions

    found = {k: v for k, v in metric_versions().items() if v is not None}
    return {"diffusers": diffusers.__version__, **found}


def protocol(settings: EvalSettings, device: str, prompt_source: str, real: RealSet | None, measure: Measure,
             state: dict, n: int) -> dict:
    """How every number was measured: N, seeds, prompts, reference, metrics, device, timing, versions, settings."""
    name = device_name(device)
    return {
        "n": n, "seed": settings.seed,
        "seeds": f"sample i of every model: torch.Generator().manual_seed(({settings.seed} << 32) + i) on CPU for its "
                 "initial noise and any noise its scheduler draws; diversity samples use a disjoint stream",
        "prompts": prompt_source,
        "reference": _reference_entry(real, n, settings.seed),
        "reference_note": None if real is not None else "no real images (--reference none): distribution metrics "
                                                         "compare with the teacher's samples at its usual steps",
        "feature_net": getattr(measure.net, "name", settings.feature_net), "fd_name": measure.fd_name,
        "feature_resolution": getattr(measure.net, "resolution", 299),
        "judges": measure.judge_entries(),
        "image_resolution": state["image_resolution"], "guidance": state["guidance"],
        "kid": {"subsets": 50, "subset_size": state["kid_size"], "kernel": "(x.y/D + 1)^3", "scale": 1000},
        "precision_recall_k": 3,
        "diversity": {"prompts": settings.diversity_prompts, "samples_per_prompt": settings.diversity_samples,
                      "metric": "mean pairwise feature distance among one prompt's samples, averaged over prompts"},
        "alignment": measure.describe(),
        "teacher": settings.teacher, "teacher_steps": settings.teacher_steps, "steps": list(settings.steps),
        "device": device, "device_name": name,
        "dtype": _dtype_name(settings.dtype, device), "dtype_requested": settings.dtype,
        "threads": torch.get_num_threads(), "batch_split": cores.describe(device), "batch_size": settings.batch_size,
        "compile": settings.compile,
        "latency": {"runs": settings.latency_runs, "warmup": settings.latency_warmup, "batch_size": 1,
                    "seconds_cap": settings.latency_seconds},
        "price_per_gpu_hour": settings.price_per_gpu_hour,
        "cost_note": (f"{settings.price_per_gpu_hour:g} USD per GPU hour" if device.startswith("cuda") else
                      f"CPU time on this machine, priced at {settings.price_per_gpu_hour:g} USD per hour as given"),
        "versions": versions(),
        "settings": {k: v for k, v in asdict(settings).items()},
    }


def _reference_entry(real: RealSet | None, n: int, seed: int) -> dict | None:
    if real is None:
        return None
    return {"source": real.source, "n": len(real.images), "resolution": list(real.images.shape[-2:]),
            "floor_n": None if real.floor_images is None else len(real.floor_images),
            "rows": f"evals.calibrate.split_halves(total, {n}, seed={seed}): reference = first half, floor = second"}


def _dtype_name(name: str, device: str) -> str:
    """What ran: --dtype, with auto resolved for this device."""
    from evals.models import auto_dtype

    return auto_dtype(device) if name == "auto" else name
