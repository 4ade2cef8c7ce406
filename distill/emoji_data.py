"""The embedded dataset: every emoji of Debian's Noto Color Emoji font, with a caption.

Rendering needs the font (`apt-get install fonts-noto-color-emoji`) and Pillow with raqm
(the PyPI wheel has it); without raqm, ZWJ sequences draw as several glyphs. The rendered
parquet files are committed under `data/emoji/`, so nothing else needs the font.
Licences: font OFL-1.1, images Apache-2.0 (Noto Emoji).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from distill.errors import DataError

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109  # CBDT bitmaps exist at this size only
SIZES = (64, 32)
_SKIN_TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
# A pair of regional indicators that names no country: the font draws its unknown-flag glyph.
_UNKNOWN_FLAG = "\U0001F1FD\U0001F1FD"


def _is_flag(text: str) -> bool:
    regional = all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in text) and len(text) == 2
    subdivision = text.startswith("\U0001F3F4") and any(0xE0061 <= ord(c) <= 0xE007A for c in text)
    return regional or subdivision


def caption_from_name(name: str, text: str = "") -> str:
    """':woman_firefighter_medium_skin_tone:' -> 'woman firefighter, medium skin tone'.

    Country and subdivision flags are named by the place alone (':France:'): say "flag: France".
    """
    words = name.strip(":").replace("_", " ")
    if text and _is_flag(text):
        words = f"flag: {words}"
    for tone in sorted(_SKIN_TONES, key=len, reverse=True):
        for sep in (" ", ", "):
            words = words.replace(f"{sep}{tone} skin tone", f", {tone} skin tone")
    # Two tones (couples) come out as "light skin tone, dark skin tone": keep them readable.
    words = words.replace(" skin tone, ", " skin tone and ").replace(", ,", ",")
    return " ".join(words.split())


def _load_font() -> ImageFont.FreeTypeFont:
    if not Path(FONT_PATH).exists():
        raise DataError(
            f"The emoji font {FONT_PATH} is missing: install it with "
            "`apt-get install fonts-noto-color-emoji`, or use the committed data/emoji/ parquet files."
        )
    return ImageFont.truetype(FONT_PATH, FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


def render(text: str, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """Draw one emoji on white, square; None when the font has nothing for it."""
    left, top, right, bottom = font.getbbox(text, mode="RGBA")
    width, height = right - left, bottom - top
    if width <= 0 or height <= 0:
        return None
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((-left, -top), text, font=font, embedded_color=True)
    if canvas.getbbox() is None:
        return None
    side = max(width, height)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(canvas, ((side - width) // 2, (side - height) // 2))
    return square.convert("RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def render_all(progress: bool = False) -> list[dict]:
    """Render every fully-qualified or component emoji into rows of the dataset."""
    import emoji

    font = _load_font()
    single_width = font.getbbox("\U0001F600", mode="RGBA")[2]
    unknown = render(_UNKNOWN_FLAG, font)
    unknown_digest = hashlib.sha1(unknown.tobytes()).hexdigest() if unknown else None
    rows, seen = [], set()
    entries = [(e, d) for e, d in emoji.EMOJI_DATA.items()
               if d["status"] in (emoji.STATUS["fully_qualified"], emoji.STATUS["component"])]
    for text, data in sorted(entries, key=lambda kv: kv[1]["en"]):
        if font.getbbox(text, mode="RGBA")[2] > 1.2 * single_width:
            continue  # the sequence fell apart into several glyphs
        image = render(text, font)
        if image is None:
            continue
        digest = hashlib.sha1(image.tobytes()).hexdigest()
        if digest == unknown_digest or digest in seen:
            continue
        seen.add(digest)
        row = {"emoji": text, "name": data["en"], "caption": caption_from_name(data["en"], text)}
        for size in SIZES:
            row[f"image_{size}"] = image.resize((size, size), Image.LANCZOS)
        rows.append(row)
    return rows


def write_dataset(out_dir: str | Path) -> dict[int, Path]:
    """Write `<out_dir>/<size>px/train.parquet` for each size; returns the paths."""
    import datasets

    rows = render_all()
    out_dir = Path(out_dir)
    paths = {}
    for size in SIZES:
        table = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": _png(r[f"image_{size}"]), "path": None} for r in rows],
                "caption": [r["caption"] for r in rows],
                "name": [r["name"] for r in rows],
                "emoji": [r["emoji"] for r in rows],
            },
            features=datasets.Features(
                image=datasets.Image(), caption=datasets.Value("string"),
                name=datasets.Value("string"), emoji=datasets.Value("string"),
            ),
        )
        path = out_dir / f"{size}px" / "train.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(path))
        paths[size] = path
    (out_dir / "LICENSE.md").write_text(LICENCE_TEXT)
    return paths


LICENCE_TEXT = """\
# Emoji dataset licences

Images rendered from Debian's `fonts-noto-color-emoji` (Noto Color Emoji).
- The font: SIL Open Font License 1.1 (OFL-1.1).
- The emoji images: Apache License 2.0 (Noto Emoji project).
- Captions: derived from the names in the PyPI package `emoji` (BSD-3-Clause), which follow Unicode CLDR.

Regenerate with `distill data emoji data/emoji` (needs the font package and Pillow with raqm).
"""


def as_array(image: Image.Image) -> np.ndarray:
    """PIL RGB -> float32 HWC in [-1, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
