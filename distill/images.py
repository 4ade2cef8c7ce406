"""Image helpers: tensors <-> PIL, and sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> list of RGB PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


def grid(images: list[Image.Image], rows: int, scale: int = 1, pad: int = 2) -> Image.Image:
    """Tile images row-major into `rows` rows, upscaled by `scale` (nearest, to keep pixels honest)."""
    cols = -(-len(images) // rows)
    w, h = images[0].size
    w, h = w * scale, h * scale
    canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(img.convert("RGB").resize((w, h), Image.NEAREST), (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(rows: list[list[Image.Image]], path: str | Path) -> Path:
    """Write PIL images as a PNG grid, one list per row (rows of equal length); small images are upscaled (nearest)
    to at least 128 px so that a 32 px emoji can be looked at."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = [image for row in rows for image in row]
    grid(flat, rows=len(rows), scale=max(1, 128 // flat[0].size[0])).save(path)
    return path
