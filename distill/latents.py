"""Training data as the teacher sees it: images -> latents, captions -> `Cond`, once or per batch.

A small fixed dataset (the emoji) is encoded once up front and batches are index look-ups; a large one streams
through a DataLoader and is encoded per batch. Either way a method gets `next_batch(generator)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from distill import data as data_lib
from distill.cond import Cond
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


def latent_batches(data_cfg, teacher, batch_size: int, seed: int, show: bool = True) -> Callable:
    """next_batch(generator) -> (z [B, C, h, w], Cond) over the dataset `data_cfg` (a `DataConfig`) names.

    cache: every latent and text embedding once, then rows drawn with the generator (a resumed run draws the same);
    otherwise a shuffled DataLoader, sharded across processes by accelerate and encoded per batch.
    """
    table = data_lib.load_image_dataset(data_cfg.source, data_cfg.image_column, data_cfg.caption_column)
    if data_cfg.max_samples:
        table = table.select(range(min(data_cfg.max_samples, len(table))))
    items = data_lib.ImageCaptionDataset(table, data_cfg.resolution, data_cfg.image_column, data_cfg.caption_column,
                                         source=data_cfg.source)
    if data_cfg.cache:
        latents, conds = encode_dataset(teacher, items, data_cfg.resolution, show=show)

        def cached(generator):
            idx = torch.randint(len(latents), (batch_size,), generator=generator)
            return latents[idx], conds.select(idx)  # a CPU index works on tensors on any device

        return cached
    loader = data_lib.make_dataloader(items, batch_size, seed=seed, num_workers=data_cfg.num_workers)
    stream = forever(_shard(loader))

    def streamed(generator):
        row = next(stream)
        return encode_batch(teacher, row["pixel_values"], list(row["caption"]), data_cfg.resolution)

    return streamed


def _shard(loader):
    """accelerate's per-process view of the loader, with batches on this process's device."""
    from distill.device import process_state
    from accelerate.data_loader import prepare_data_loader

    state = process_state()
    return prepare_data_loader(loader, state.device, num_processes=state.num_processes,
                               process_index=state.process_index, put_on_device=True)
