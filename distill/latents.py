"""Training data as the teacher sees it: images -> latents, captions -> `Cond`, once or per batch.

A small fixed dataset (the emoji) is encoded once up front and batches are index look-ups; a large one streams
through a DataLoader and is encoded per batch. Either way a method gets `next_batch(generator)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from distill import data as data_lib
from distill.cond import Cond
from distill.errors import ConfigError
from distill.progress import Ticker


@torch.no_grad()
def encode_batch(teacher, pixel_values: Tensor, captions: list[str], resolution: int) -> tuple[Tensor, Cond]:
    """(latents [B, C, h, w], Cond) for a batch of images in [-1, 1] and their captions (posterior means)."""
    latents = teacher.encode_images(pixel_values.to(teacher.device))
    return latents.float(), teacher.encode_prompt(captions, resolution)


@torch.no_grad()
def encode_dataset(teacher, items, resolution: int, batch_size: int = 64, show: bool = True) -> tuple[Tensor, Cond]:
    """Every row of a fixed dataset encoded once: latents [N, C, h, w] (float32) and a Cond of N rows.

    `items` yields {"pixel_values", "caption"} (distill.data.ImageCaptionDataset). Kept on the teacher's device.
    """
    latents, conds = [], []
    ticker = Ticker("encoding images and captions once", len(items), enabled=show)
    for start in range(0, len(items), batch_size):
        rows = [items[i] for i in range(start, min(start + batch_size, len(items)))]
        z, cond = encode_batch(teacher, torch.stack([r["pixel_values"] for r in rows]), [r["caption"] for r in rows],
                               resolution)
        latents.append(z)
        conds.append(cond)
        ticker.update(start + len(rows))
    cond = conds[0]
    for more in conds[1:]:
        cond = cond.cat(more)
    return torch.cat(latents), cond


def forever(loader) -> Iterator:
    """Batches from `loader`, epoch after epoch (a DataLoader re-shuffles each epoch)."""
    while True:
        yield from loader


def holdout_split(num_rows: int, holdout: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(training rows, held-out rows): `holdout` rows drawn by a fixed permutation, so every run of a dataset holds
    out the same rows whatever its own seed."""
    if holdout and holdout > num_rows // 10:  # a held-out set is a probe's, not a tenth of the training data
        fix = (f"data.holdout_rows={num_rows // 10} or fewer" if num_rows >= 10 else
               "data.holdout_rows=0 and probe.every_steps=0 (too few rows to hold any out)")
        raise ConfigError(f"data.holdout_rows={holdout} would hold out more than a tenth of the {num_rows} rows of the "
                          f"data: set {fix}.")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    held = order[:holdout].sort().values
    keep = torch.ones(num_rows, dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().squeeze(1), held


@dataclass
class LatentData:
    """A method's data: `next_batch(generator) -> (z, Cond)` over the training rows, and with `data.holdout_rows`
    the held-out rows (z, Cond, captions) and as many fixed training rows (`train_subset`) to compare them with."""

    next_batch: Callable
    holdout: tuple[Tensor, Cond, list[str]] | None = None
    train_subset: tuple[Tensor, Cond, list[str]] | None = None

    def __call__(self, generator):
        return self.next_batch(generator)


def latent_data(data_cfg, teacher, batch_size: int, seed: int, show: bool = True) -> LatentData:
    """The `LatentData` of the dataset `data_cfg` (a `DataConfig`) names.

    cache: every latent and text embedding once, then rows drawn with the generator (a resumed run draws the same);
    otherwise a shuffled DataLoader, sharded across processes by accelerate and encoded per batch.
    """
    table = data_lib.load_image_dataset(data_cfg.source, data_cfg.image_column, data_cfg.caption_column)
    if data_cfg.max_samples:
        table = table.select(range(min(data_cfg.max_samples, len(table))))
    train_rows, held_rows = holdout_split(len(table), data_cfg.holdout_rows)
    held = _encoded_rows(table, held_rows, data_cfg, teacher) if len(held_rows) else None
    subset = _encoded_rows(table, train_rows[:len(held_rows)], data_cfg, teacher) if len(held_rows) else None
    if len(held_rows):
        table = table.select(train_rows.tolist())
    items = _items(table, data_cfg)
    if data_cfg.cache:
        latents, conds = encode_dataset(teacher, items, data_cfg.resolution, show=show)

        def cached(generator):
            idx = torch.randint(len(latents), (batch_size,), generator=generator)
            return latents[idx], conds.select(idx)  # a CPU index works on tensors on any device

        return LatentData(cached, held, subset)
    loader = data_lib.make_dataloader(items, batch_size, seed=seed, num_workers=data_cfg.num_workers)
    stream = forever(_shard(loader))

    def streamed(generator):
        row = next(stream)
        return encode_batch(teacher, row["pixel_values"], list(row["caption"]), data_cfg.resolution)

    return LatentData(streamed, held, subset)


def latent_batches(data_cfg, teacher, batch_size: int, seed: int, show: bool = True) -> Callable:
    """next_batch(generator) -> (z [B, C, h, w], Cond) over the training rows (`latent_data` without its splits)."""
    return latent_data(data_cfg, teacher, batch_size, seed, show).next_batch


def real_images(data_cfg, count: int, seed: int = 0) -> Tensor:
    """Pixel values [n, 3, H, W] in [-1, 1] of `count` rows of the data (a fixed draw): a probe's reference set."""
    table = data_lib.load_image_dataset(data_cfg.source, data_cfg.image_column, data_cfg.caption_column)
    rows = torch.randperm(len(table), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    items = _items(table.select(rows.tolist()), data_cfg)
    return torch.stack([items[i]["pixel_values"] for i in range(len(items))])


def _items(table, data_cfg) -> data_lib.ImageCaptionDataset:
    return data_lib.ImageCaptionDataset(table, data_cfg.resolution, data_cfg.image_column, data_cfg.caption_column,
                                        source=data_cfg.source)


def _encoded_rows(table, rows: Tensor, data_cfg, teacher) -> tuple[Tensor, Cond, list[str]]:
    items = _items(table.select(rows.tolist()), data_cfg)
    latents, cond = encode_dataset(teacher, items, data_cfg.resolution, show=False)
    return latents, cond, [items[i]["caption"] for i in range(len(items))]


def _shard(loader):
    """accelerate's per-process view of the loader, with batches on this process's device."""
    from distill.device import process_state
    from accelerate.data_loader import prepare_data_loader

    state = process_state()
    return prepare_data_loader(loader, state.device, num_processes=state.num_processes,
                               process_index=state.process_index, put_on_device=True)
