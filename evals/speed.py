"""Speed of one model at one step count: latency at batch 1 by stage, throughput at batch B, peak memory.

Latency: `runs` timed end-to-end samples of one prompt at batch 1 after `warmup` untimed ones, each split
into text encoder, denoising loop and VAE decode (CUDA is synchronised at every stage boundary), reported
as p50 and p95 (nearest-rank percentiles). Throughput comes from the quality run itself (`StageClock`): the
same N images, generated at batch B; the first batch and a smaller last one are left out when others remain,
so one-time costs (allocator, cuDNN autotuning, torch.compile for a new shape) do not count. Peak memory is
CUDA's max allocated bytes, or on CPU the process's peak resident set (VmHWM, reset before each measurement),
which includes every other tensor the process holds.

Speedups compare against the teacher at its usual step count with CFG. A denoising loop costs about
NFE x (one UNet evaluation), so at a batch large enough to keep the device busy its speedup should be the
NFE ratio (e.g. 100 / k for a k-step student without CFG): `loop_vs_nfe` reports how close it comes.
At batch 1 the unconditional and conditional passes share one forward, so the speedup there is lower.
"""

from __future__ import annotations

import math
import time

import torch

from distill.memory import PeakMemory
from evals import models


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class StageClock:
    """Seconds and images per stage over the batches of a run; the first batch is the warm-up."""

    STAGES = ("text", "loop", "decode")

    def __init__(self, device):
        self.device = device
        self.batches: list[dict[str, float]] = []

    def start_batch(self, size: int) -> None:
        self.batches.append({"size": size, **{s: 0.0 for s in self.STAGES}})

    def time(self, stage: str, fn, *args):
        sync(self.device)
        t0 = time.perf_counter()
        out = fn(*args)
        sync(self.device)
        self.batches[-1][stage] += time.perf_counter() - t0
        return out

    def summary(self) -> dict:
        """ms per image by stage and images/s end to end, over the full batches after the first.

        The first batch pays one-time costs; a smaller last batch would be a new shape (a recompile under
        torch.compile). Both are left out when other batches remain.
        """
        full = self.batches[0]["size"]
        timed = [b for b in self.batches[1:] if b["size"] == full] or self.batches[1:] or self.batches
        images = sum(b["size"] for b in timed)
        per_stage = {s: 1000 * sum(b[s] for b in timed) / images for s in self.STAGES}
        total_s = sum(b[s] for b in timed for s in self.STAGES)
        first = self.batches[0]
        steady = per_stage["loop"] * first["size"] / 1000  # what the first batch's loop would take without warm-up
        return {"images_timed": images, "stage_ms_per_image": per_stage, "throughput_img_s": images / total_s,
                "seconds": sum(b[s] for b in self.batches for s in self.STAGES), "loop_cv": _cv(timed),
                "warmup_s": max(0.0, first["loop"] - steady)}  # one-time costs: allocator, autotuning, compile


def _cv(batches: list[dict]) -> float:
    """Coefficient of variation of the loop's time per image across batches: a sign of a shared, noisy device."""
    values = [b["loop"] / b["size"] for b in batches]
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 / mean


MIN_TIMED_RUNS = 5


def latency(candidate: models.Candidate, steps: int, prompt: str, runs: int = 20, warmup: int = 3,
            seed: int = 0, budget_s: float | None = None) -> dict:
    """Batch-1 latency of `candidate` at `steps`: p50/p95 end to end and p50 of each stage, in ms. With `budget_s`,
    timing stops once the timed runs have taken that long and at least MIN_TIMED_RUNS ran: a 50-step teacher on a
    CPU spends ~1 s a run, and 20 of them buy little over 5 for a median ("runs" says how many were timed)."""
    device = candidate.model.device
    records = []
    with PeakMemory(device) as peak:
        for i in range(warmup + runs):
            if budget_s is not None and len(records) >= MIN_TIMED_RUNS and _spent(records) > budget_s:
                break
            gens = models.sample_generators(seed, [i])
            noise = models.initial_noise(candidate, gens)
            clock = StageClock(device)
            clock.start_batch(1)
            cond = clock.time("text", models.encode, candidate, [prompt])
            z = clock.time("loop", models.denoise, candidate, steps, cond, noise, gens)
            clock.time("decode", models.decode, candidate, z)
            if i >= warmup:
                records.append(clock.batches[0])
    total = [1000 * sum(r[s] for s in StageClock.STAGES) for r in records]
    return {
        "runs": len(records), "warmup": warmup,
        "p50_ms": percentile(total, 50), "p95_ms": percentile(total, 95),
        "stage_p50_ms": {s: percentile([1000 * r[s] for r in records], 50) for s in StageClock.STAGES},
        "peak_mem_mb": peak.mb, "mem_kind": peak.kind,
    }


def _spent(records: list[dict]) -> float:
    return sum(r[s] for r in records for s in StageClock.STAGES)


def speedups(row: dict, reference: dict) -> dict:
    """How much faster `row` is than `reference` (the teacher at its usual steps), stage by stage."""
    r, t = row["speed"], reference["speed"]
    nfe_ratio = reference["nfe"] / row["nfe"]
    loop_b = t["stage_ms_per_image"]["loop"] / r["stage_ms_per_image"]["loop"]
    return {
        "nfe_ratio": nfe_ratio,
        "latency": t["latency"]["p50_ms"] / r["latency"]["p50_ms"],
        "loop_batch1": t["latency"]["stage_p50_ms"]["loop"] / r["latency"]["stage_p50_ms"]["loop"],
        "throughput": r["throughput_img_s"] / t["throughput_img_s"],
        "loop_batch": loop_b,
        "loop_vs_nfe": loop_b / nfe_ratio,
        "loop_within_10pct_of_nfe": abs(loop_b / nfe_ratio - 1) <= 0.10,
    }


def cost_per_million(throughput_img_s: float, price_per_hour: float) -> float:
    """USD per 1e6 images at `throughput_img_s` on a machine priced `price_per_hour` USD."""
    return 1e6 / throughput_img_s / 3600 * price_per_hour
