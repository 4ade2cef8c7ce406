"""Image helpers: tensors <-> PIL, and sample grids (optionally labelled: rows and columns named in a margin)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from distill.errors import ConfigError


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> list of RGB PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


Labels = tuple[Sequence[str] | None, Sequence[str] | None]  # (one per row, one per column); either may be None
LABEL_PAD = 4  # px around a label
LABEL_CHARS = 40  # longer row labels (prompts) are cut


def _font():
    return ImageFont.load_default()


def label_margins(labels: Labels | None) -> tuple[int, int]:
    """(left, top) px of white margin a grid adds for its row labels (left) and column labels (top)."""
    rows, cols = labels or (None, None)
    font = _font()
    left = max((math.ceil(font.getlength(_cut(t))) for t in rows), default=0) + 2 * LABEL_PAD if rows else 0
    top = _line_height(font) + 2 * LABEL_PAD if cols else 0
    return left, top


def _line_height(font) -> int:
    return font.getbbox("Agy@")[3]


def _cut(text: str, limit: int = LABEL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def grid(images: list[Image.Image], rows: int, scale: int = 1, pad: int = 2,
         labels: Labels | None = None) -> Image.Image:
    """Tile images row-major into `rows` rows, upscaled by `scale` (nearest, to keep pixels honest).

    labels: (row labels, column labels), written with PIL's default font in a white margin left of the rows and
    above the columns (a column label is cut to its cell's width); None (the default) adds no margin.
    """
    cols = -(-len(images) // rows)
    w, h = images[0].size
    w, h = w * scale, h * scale
    left, top = label_margins(labels)
    canvas = Image.new("RGB", (left + cols * (w + pad) + pad, top + rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(img.convert("RGB").resize((w, h), Image.NEAREST),
                     (left + pad + c * (w + pad), top + pad + r * (h + pad)))
    if labels:
        _draw_labels(canvas, labels, (left, top), (w, h), pad)
    return canvas


def _draw_labels(canvas: Image.Image, labels: Labels, margins: tuple[int, int], cell: tuple[int, int],
                 pad: int) -> None:
    """Row labels left-aligned and centred on their row; column labels centred over their column."""
    (rows, cols), (left, top), (w, h) = labels, margins, cell
    draw, font = ImageDraw.Draw(canvas), _font()
    height = _line_height(font)
    for r, text in enumerate(rows or []):
        draw.text((LABEL_PAD, top + pad + r * (h + pad) + (h - height) // 2), _cut(text), fill=(0, 0, 0), font=font)
    for c, text in enumerate(cols or []):
        text = _fit(text, font, w)
        x = left + pad + c * (w + pad) + (w - font.getlength(text)) / 2
        draw.text((x, LABEL_PAD), text, fill=(0, 0, 0), font=font)


def _fit(text: str, font, width: int) -> str:
    """`text`, cut and ended with "..." when it is wider than `width` px."""
    if font.getlength(text) <= width:
        return text
    while len(text) > 1 and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def check_image_path(path: str | Path, what: str) -> None:
    """A ConfigError unless PIL can write an image under this name (by its extension) into a writable folder."""
    from distill.preflight import check_writable

    Image.init()
    suffix = Path(path).suffix.lower()
    if Image.registered_extensions().get(suffix) not in Image.SAVE:
        raise ConfigError(f"{what} {path}: images cannot be written as {suffix or 'a name without an extension'}; "
                          "end the name in .png, .jpg or .webp.")
    check_writable(Path(path).expanduser().absolute().parent, f"{what}'s folder")


def save_grid(rows: list[list[Image.Image]], path: str | Path, labels: Labels | None = None) -> Path:
    """Write PIL images as a PNG grid, one list per row (rows of equal length); small images are upscaled (nearest)
    to at least 128 px so that a 32 px emoji can be looked at. labels: (row labels, column labels), as `grid`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = [image for row in rows for image in row]
    grid(flat, rows=len(rows), scale=max(1, 128 // flat[0].size[0]), labels=labels).save(path)
    return path
