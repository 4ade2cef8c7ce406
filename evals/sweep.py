"""Screening at a smaller N: the training-free sweep and the control rows, cheap enough to run many of.

A screening entry is one (candidate, steps) generated for the first `sweep_samples` prompts and seeds of the eval
(the same ones every full-N row starts with), scored by FD, KID and prompt alignment against the full reference.
No latency or diversity is measured: only the best entry per step count goes on to a full-N row. Every full-N row
also gets its own screening score from the first `sweep_samples` of its images, so screening entries and full rows
compare at equal N.
"""

from __future__ import annotations

import time

import torch

from evals import cores, models
from evals.generate import encode_all, joined
from evals.measure import Measure, quality
from evals.progress import log
from evals.settings import EvalSettings


def screen_n(settings: EvalSettings, n: int) -> int:
    """The screening N: `sweep_samples`, at most the eval's N (0 means: screen at the full N)."""
    return n if settings.sweep_samples <= 0 else min(settings.sweep_samples, n)


def screen_quality(measure: Measure, ref: torch.Tensor, feats: torch.Tensor, prompts: list[str],
                   embeddings: torch.Tensor | None, seed: int) -> dict:
    """FD / KID / precision / recall (+ alignment) of the first len(prompts) samples against the reference."""
    n = len(prompts)
    out = quality(measure, ref, feats[:n], max(2, n // 2), seed)
    if embeddings is not None:
        out.update(measure.alignment(embeddings[:n], prompts))
    return out | {"n": n}


def screen(cands: list[models.Candidate], steps: list[int], prompts: list[str], settings: EvalSettings,
           measure: Measure, ref: torch.Tensor, kind: str) -> list[dict]:
    """A screening entry for every candidate at every step count (`kind`: "baseline" or "control")."""
    entries = []
    conds = None
    for cand in cands:
        if conds is None or cand.model is not cands[0].model:
            conds, _ = encode_all(cand, prompts, settings.batch_size)
        for k in steps:
            t0 = time.perf_counter()
            feats, embs = _features(cand, k, prompts, conds, settings, measure)
            q = screen_quality(measure, ref, feats, prompts, embs, settings.seed)
            entries.append(_entry(cand, k, q, kind, time.perf_counter() - t0))
            log(f"screen {cand.label(k)}: {measure.fd_name} {q['fd']:.1f} at N = {len(prompts)} (NFE {cand.nfe(k)})")
    return entries


def _features(cand, k, prompts, conds, settings, measure):
    feats, embs = [], []
    batch = settings.batch_size
    shares = cores.workers(cand, batch)
    for b, start in enumerate(range(0, len(prompts), batch * shares)):
        idx = range(start, min(len(prompts), start + batch * shares))
        gens = models.sample_generators(settings.seed, idx)
        cond = joined(conds[b * shares:(b + 1) * shares])
        z = cores.denoise(cand, k, cond, models.initial_noise(cand, gens), gens, shares)
        images = models.decode(cand, z).cpu()
        f = measure.features(images)
        feats.append(f)
        embs.append(measure.embed_images(images, f))
    return torch.cat(feats), None if embs[0] is None else torch.cat(embs)


def _entry(cand: models.Candidate, k: int, q: dict, kind: str, seconds: float) -> dict:
    return {"label": cand.label(k), "model": cand.name, "kind": kind, "steps": k, "nfe": cand.nfe(k),
            "scheduler": cand.scheduler_name, "guidance_scale": cand.guidance_scale, "cfg": cand.cfg,
            "control_of": cand.metadata.get("control_of"), "best": False, "seconds": round(seconds, 2),
            "fd": q["fd"], "kid": q["kid"], "kid_std": q["kid_std"], "n": q["n"],
            **{key: q[key] for key in ("align_top1", "align_top5") if key in q}}


def student_entries(rows: list[dict]) -> list[dict]:
    """Screening entries of full-N student and cascade rows (their first N images), for the equal-N tables."""
    out = []
    for r in rows:
        if r["role"] == "teacher" or "screen" not in r:
            continue
        q = r["screen"]
        out.append({"label": r["label"], "model": r["model"], "kind": r["role"], "steps": r["steps"], "nfe": r["nfe"],
                    "scheduler": r["scheduler"], "guidance_scale": r["guidance_scale"], "cfg": r["cfg"],
                    "control_of": None, "best": False, "seconds": 0.0, "fd": q["fd"], "kid": q["kid"],
                    "kid_std": q["kid_std"], "n": q["n"],
                    **{key: q[key] for key in ("align_top1", "align_top5") if key in q}})
    return out
