"""The eval's inputs: the real reference images (and the disjoint real-vs-real floor set) and the N prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.errors import ConfigError, DataError
from evals.progress import log
from evals.settings import EvalSettings


@dataclass
class RealSet:
    """Reference images (paired with the prompts when these are dataset captions) and the disjoint floor set."""

    source: str
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    captions: list[str] | None
    floor_images: torch.Tensor | None
    floor_captions: list[str] | None


def _dataset_rows(source: str) -> tuple[int, callable, list[str] | None]:
    """(row count, rows -> images in [-1, 1], captions or None) of an image dataset source."""
    from evals.emoji import load_emoji

    name, _, size = source.partition(":")
    if name == "emoji":
        data = load_emoji(int(size or 32))
        return len(data.captions), lambda rows: data.images[rows], list(data.captions)
    from distill.data import ImageCaptionDataset, load_image_dataset

    dataset = load_image_dataset(source, "image", None)
    has_captions = "caption" in dataset.column_names
    wrapped = ImageCaptionDataset(dataset, 512, "image", "caption" if has_captions else None, source=source)
    # ImageCaptionDataset resizes to a fixed square; the feature net resizes again, so any size works.
    load = lambda rows: torch.stack([wrapped[int(i)]["pixel_values"] for i in rows])  # noqa: E731
    return len(dataset), load, list(dataset["caption"]) if has_captions else None


def load_real(source: str, n: int, seed: int) -> RealSet | None:
    """N reference rows and N disjoint floor rows, chosen with `seed` as evals.calibrate chooses its halves."""
    from evals.calibrate import split_halves

    if source in ("none", ""):
        return None
    total, load, captions = _dataset_rows(source)
    if n > total:
        raise DataError(f"--num-samples {n} is more than the {total} images of the reference {source}; lower it.")
    if 2 * n <= total:
        ref_rows, floor_rows = split_halves(total, n, seed)
    else:  # no disjoint floor at this N
        ref_rows, floor_rows = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n], None
        log(f"the reference has {total} images, fewer than 2N = {2 * n}: no real-vs-real floor at this N")
    pick = (lambda rows: [captions[int(i)] for i in rows]) if captions else (lambda rows: None)
    return RealSet(source, load(ref_rows), pick(ref_rows), None if floor_rows is None else load(floor_rows),
                   None if floor_rows is None else pick(floor_rows))


def choose_prompts(settings: EvalSettings, real: RealSet | None) -> tuple[list[str], str]:
    """N prompts and a sentence saying where they came from."""
    from distill.data import load_prompts

    n = settings.num_samples
    if settings.prompts:
        lines = load_prompts(settings.prompts)
        prompts = [lines[i % len(lines)] for i in range(n)]
        cycled = " (cycled; each repeat has its own seed)" if len(lines) < n else ""
        return prompts, f"{settings.prompts}: first {min(n, len(lines))} of {len(lines)} prompts{cycled}"
    if real is None or real.captions is None:
        raise ConfigError(f"The reference {settings.reference} has no captions to use as prompts: pass --prompts FILE.")
    return list(real.captions), (f"captions of the {n} reference images of {real.source} "
                                 f"(rows drawn with seed {settings.seed}; the images are the reference set)")



def grid_images(real: RealSet | None, prompts: list[str], count: int) -> torch.Tensor | None:
    """The first `count` reference images, uint8, when the prompts are their captions (a grid row of real ones)."""
    from distill.images import to_uint8

    if real is None or real.captions is None or real.captions[:count] != prompts[:count]:
        return None
    return torch.from_numpy(to_uint8(real.images[:count]))
