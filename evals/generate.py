"""Generation for the eval: N images per (model, steps) in batches with the same per-sample seeds for every
model, turned into features batch by batch and dropped; only the first few are kept for the sample grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from distill.memory import PeakMemory
from evals import cores, models, speed
from evals.measure import Measure
from evals.progress import Ticker
from evals.settings import EvalSettings

GRID_PROMPTS = 8


@dataclass
class Generated:
    """What one (model, steps) generation leaves: features, embeddings, grid images, timings, memory, diversity."""

    feats: torch.Tensor
    embeddings: torch.Tensor | None
    grid: torch.Tensor  # the first GRID_PROMPTS images, uint8 (G, H, W, 3)
    clock: dict
    peak: dict
    diversity: float
    collapse: float | None = None  # share of prompts whose samples over seeds are near-duplicates (None: no tau)
    judge_feats: dict[str, torch.Tensor] = field(default_factory=dict)  # each second judge's features, same images
    spreads: list[float] | None = None  # per diversity prompt: the mean pairwise feature distance over seeds


def encode_all(cand: models.Candidate, prompts: list[str], batch: int) -> tuple[list, float]:
    """Conditioning for every batch of prompts, and the text encoder's ms per image (after the first batch)."""
    conds, times = [], []
    device = cand.model.device
    for start in range(0, len(prompts), batch):
        speed.sync(device)
        t0 = time.perf_counter()
        conds.append(models.encode(cand, prompts[start:start + batch]))
        speed.sync(device)
        times.append((time.perf_counter() - t0, len(prompts[start:start + batch])))
    timed = times[1:] if len(times) > 1 else times
    return conds, 1000 * sum(t for t, _ in timed) / sum(n for _, n in timed)


def generate(cand: models.Candidate, steps: int, prompts: list[str], conds: list, settings: EvalSettings,
             measure: Measure, label: str) -> Generated:
    """N images in batches (same per-sample seeds for every model) -> features (of every judge) and alignment
    embeddings. On a CPU with several threads, `evals.cores` runs consecutive batches side by side."""
    n, batch, device = len(prompts), settings.batch_size, cand.model.device
    shares = cores.workers(cand, batch)
    clock, feats, embs, grid = speed.StageClock(device), [], [], None
    judged: dict[str, list] = {}
    progress = Ticker(label, n)
    peak = {"mb": 0.0, "kind": ""}
    for b, start in enumerate(range(0, n, batch * shares)):
        idx = range(start, min(n, start + batch * shares))
        gens = models.sample_generators(settings.seed, idx)
        noise = models.initial_noise(cand, gens)
        clock.start_batch(len(idx))
        with PeakMemory(device) as memory:  # the model's own memory: the feature net runs outside
            cond = joined(conds[b * shares:(b + 1) * shares])
            z = clock.time("loop", cores.denoise, cand, steps, cond, noise, gens, shares)
            images = clock.time("decode", models.decode, cand, z).cpu()
        peak = {"mb": max(peak["mb"], memory.mb), "kind": memory.kind}
        f = measure.features(images)
        feats.append(f)
        embs.append(measure.embed_images(images, f))
        for name, jf in measure.judge_features(images).items():
            judged.setdefault(name, []).append(jf)
        grid = _keep_for_grid(grid, images)
        progress.update(idx.stop)
    div, collapse, spreads = diversity(cand, steps, prompts, settings, measure)
    return Generated(torch.cat(feats), None if embs[0] is None else torch.cat(embs), torch.from_numpy(grid),
                     clock.summary(), peak, div, collapse, {k: torch.cat(v) for k, v in judged.items()}, spreads)


def joined(conds: list):
    """One conditioning for consecutive batches (a cascade's pair of conditionings runs one batch at a time)."""
    out = conds[0]
    for more in conds[1:]:
        out = out.cat(more)
    return out


def _keep_for_grid(grid: np.ndarray | None, images: torch.Tensor) -> np.ndarray:
    """The first GRID_PROMPTS images seen so far, uint8 (G, H, W, 3)."""
    from distill.images import to_uint8

    if grid is not None and len(grid) >= GRID_PROMPTS:
        return grid
    kept = to_uint8(images[:GRID_PROMPTS])
    return kept if grid is None else np.concatenate([grid, kept])[:GRID_PROMPTS]


def diversity_prompts(prompts: list[str], count: int) -> list[str]:
    """The first `count` distinct prompts."""
    return list(dict.fromkeys(prompts))[:count]


def diversity(cand: models.Candidate, steps: int, prompts: list[str], settings: EvalSettings,
              measure: Measure) -> tuple[float, float | None, list[float]]:
    """(mean pairwise feature distance among K samples (different seeds) of each of P prompts, the share of those
    prompts whose samples are near-duplicates under the calibrated threshold, or None without one, and each prompt's
    spread)."""
    from evals.calibrate import collapse_tau
    from evals.metrics import collapse_rate, diversity as metric, pairwise_spread

    chosen = diversity_prompts(prompts, settings.diversity_prompts)
    k = settings.diversity_samples
    repeated = [p for p in chosen for _ in range(k)]
    feats = []
    for start in range(0, len(repeated), settings.batch_size):
        part = repeated[start:start + settings.batch_size]
        gens = models.sample_generators(settings.seed, range(start, start + len(part)), models.DIVERSITY_STREAM)
        z = models.denoise(cand, steps, models.encode(cand, part), models.initial_noise(cand, gens), gens)
        feats.append(measure.features(models.decode(cand, z).cpu()))
    grouped = torch.cat(feats).view(len(chosen), k, -1)
    tau = collapse_tau(settings.feature_net, settings.feature_resolution, cand.model.resolution()[0], k=k)
    spreads = [round(float(v), 4) for v in pairwise_spread(grouped)]
    return metric(grouped), None if tau is None else collapse_rate(grouped, tau), spreads
