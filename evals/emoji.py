"""The real emoji set as tensors, for calibration and the alignment scorer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from distill.errors import DataError

DATA_ROOT = Path(__file__).resolve().parent.parent / "data" / "emoji"


@dataclass(frozen=True)
class EmojiSet:
    images: torch.Tensor  # (N, 3, S, S) float32 in [-1, 1]
    captions: tuple[str, ...]
    names: tuple[str, ...]


@lru_cache(maxsize=4)
def load_emoji(size: int = 32, root: str | Path = DATA_ROOT) -> EmojiSet:
    """All 3,779 emoji of `data/emoji/<size>px/train.parquet`, in the file's order."""
    import datasets

    path = Path(root) / f"{size}px" / "train.parquet"
    if not path.is_file():
        raise DataError(f"No emoji parquet at {path}: sizes 32 and 64 are committed under data/emoji/.")
    table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    pixels = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in table["image"]])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return EmojiSet(images.contiguous(), tuple(table["caption"]), tuple(table["name"]))
