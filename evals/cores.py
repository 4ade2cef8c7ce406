"""Sample-parallel denoising on a CPU: consecutive batches side by side, one thread each.

A batch of the embedded teacher's 8x8 latents is too small for torch's intra-op threads to keep two cores busy
(the 50-step teacher's UNet: 1.7x on 2 threads over 1; two batches side by side, one thread each: 1.9x). Every
sample has its own generator, so where a sample is computed does not change it. On a GPU, or with one thread,
batches run one at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from evals import models

MIN_PER_CORE = 8  # a batch smaller than this is not worth a thread of its own


def workers(candidate: models.Candidate, batch: int) -> int:
    """How many batches of `batch` samples run side by side, one thread each (1: one at a time, on every thread)."""
    if candidate.model.device.type != "cpu" or hasattr(candidate, "spec"):  # a cascade: two models, its own cond
        return 1
    return torch.get_num_threads() if batch >= MIN_PER_CORE else 1


def describe(device: str) -> str:
    """The protocol's line on how CPU batches ran."""
    threads = torch.get_num_threads()
    if device != "cpu" or threads < 2:
        return "one batch at a time"
    return (f"{threads} batches side by side, one thread each (each sample has its own noise, so the same samples); "
            "batch-1 latency runs on every thread")


def denoise(candidate: models.Candidate, steps: int, cond, noise: torch.Tensor, generators: list[torch.Generator],
            shares: int) -> torch.Tensor:
    """`models.denoise` of `shares` consecutive batches (one cond, noise and generator list), side by side."""
    if shares < 2 or len(noise) < 2:
        return models.denoise(candidate, steps, cond, noise, generators)
    parts = [p.tolist() for p in torch.arange(len(noise)).chunk(shares)]
    threads = torch.get_num_threads()

    def one(index: list[int]) -> torch.Tensor:
        torch.set_num_threads(1)
        with torch.inference_mode():
            return models.denoise(candidate, steps, cond.select(index), noise[index], [generators[i] for i in index])

    try:
        with ThreadPoolExecutor(len(parts)) as pool:
            return torch.cat(list(pool.map(one, parts)))
    finally:
        torch.set_num_threads(threads)
