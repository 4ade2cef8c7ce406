"""Image-caption data through HF `datasets`, and prompt-only sources for data-free recipes.

`load_image_dataset` turns a source string into a checked `datasets.Dataset`;
`ImageCaptionDataset` turns its rows into `[-1, 1]` tensors; `make_dataloader` batches them
reproducibly. Images are decoded here with PIL, not by `datasets`, so that one bad file
names its row instead of killing a worker with a bare PIL traceback.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import torch
from datasets.data_files import EmptyDatasetError
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from distill.emoji_data import as_array
from distill.errors import ConfigError, DataError

EMOJI_ROOT = Path(__file__).resolve().parent.parent / "data" / "emoji"
EMOJI_SIZES = (32, 64)
# Builders for single local files; folders are left to datasets' own inference
# (parquet files -> "parquet", images [+ metadata.jsonl/csv] -> "imagefolder").
_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def emoji_parquet(size: int = 32) -> Path:
    """Path of the committed emoji parquet at `size` px (32 or 64)."""
    if size not in EMOJI_SIZES:
        raise DataError(f"The embedded emoji data has no {size}px version: use data.source=emoji:32 or emoji:64.")
    path = EMOJI_ROOT / f"{size}px" / "train.parquet"
    if not path.is_file():
        raise DataError(
            f"The embedded emoji data is missing at {path}: it ships with the source checkout only, "
            "so install distill with `pip install -e .` from the repository (or regenerate it with "
            "`distill data emoji data/emoji`)."
        )
    return path


def _emoji_size(source: str) -> int | None:
    """'emoji' -> 32, 'emoji:64' -> 64, anything else -> None."""
    name, _, size = source.partition(":")
    if name != "emoji":
        return None
    if not size:
        return 32
    if not size.isdigit():
        raise DataError(f"Data source {source!r} names no size after 'emoji:': use emoji:32 or emoji:64.")
    return int(size)


def _looks_local(source: str) -> bool:
    """A hub id is 'name' or 'owner/name'; anything else that is not on disk is a missing path."""
    return (source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source
            or Path(source).suffix.lower() in _FILE_BUILDERS)


_SCRATCH: list[str] = []


def _scratch_cache() -> str:
    """Where `datasets` may write its Arrow copy of a local file: a temporary folder removed when the process ends,
    so that reading the user's own files writes nothing outside the run folder (hub datasets keep the HF cache)."""
    if not _SCRATCH:
        import atexit
        import shutil
        import tempfile

        _SCRATCH.append(tempfile.mkdtemp(prefix="distill-datasets-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


def _load(builder: str | None, source: str, split: str, **kwargs) -> datasets.Dataset:
    """`datasets.load_dataset` with its user-facing failures turned into one DataError."""
    try:
        if builder is None:
            return datasets.load_dataset(source, split=split, **kwargs)
        return datasets.load_dataset(builder, split=split, cache_dir=_scratch_cache(), **kwargs)
    except EmptyDatasetError as e:
        raise DataError(f"Dataset folder {source} holds no data files: add images or parquet files to it.") from e
    except ValueError as e:
        if "corresponds to no data" not in str(e):  # datasets' only sign of a zero-row split
            raise _not_loaded(source, split, e) from e
        raise DataError(f"Dataset {source} (split {split!r}) has no rows: add data or change data.source.") from e
    except (ConnectionError, FileNotFoundError) as e:  # a hub id that is offline, private or absent
        raise _not_loaded(source, split, e) from e


def _not_loaded(source: str, split: str, e: Exception) -> DataError:
    return DataError(
        f"Dataset {source!r} (split {split!r}) could not be loaded ({str(e).strip()}): check data.source "
        "(a local path, 'emoji' or a hub id) and data.split; a hub dataset needs the network "
        "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE unset) or an earlier download."
    )


def _absolute_paths(dataset: datasets.Dataset, column: str, base: Path) -> datasets.Dataset:
    """Image paths in a .jsonl/.csv are relative to that file: make them absolute, then an Image column."""
    if dataset.features[column] != datasets.Value("string"):
        return dataset
    paths = [p if not p or "://" in p or Path(p).is_absolute() else str(base / p) for p in dataset[column]]
    dataset = dataset.remove_columns(column).add_column(column, paths)
    return dataset.cast_column(column, datasets.Image())


def _load_source(source: str, split: str, image_column: str) -> tuple[datasets.Dataset, str]:
    """Load `source` and return it with the name used for it in messages."""
    size = _emoji_size(source)
    if size is not None:
        return _load("parquet", source, split, data_files=str(emoji_parquet(size))), f"emoji:{size}"
    path = Path(source).expanduser()
    if path.is_dir():
        return _load(None, str(path), split), str(path)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"Data source {path} is a {path.suffix or 'suffix-less'} file: point data.source at a folder of "
                "images, a .parquet, .jsonl or .csv file, 'emoji', or a hub dataset id."
            )
        dataset = _load(builder, str(path), split, data_files=str(path))
        if builder in ("json", "csv") and image_column in dataset.column_names:
            dataset = _absolute_paths(dataset, image_column, path.parent)
        return dataset, str(path)
    if _looks_local(source):
        raise DataError(f"Data source {source} does not exist: fix data.source (relative paths start at {Path.cwd()}).")
    return _load(None, source, split), source


def _check_column(dataset: datasets.Dataset, name: str, column: str, key: str) -> None:
    if column not in dataset.column_names:
        raise DataError(
            f"Dataset {name} has no column {column!r}; its columns are {', '.join(dataset.column_names)}: "
            f"set data.{key} to one of them."
        )


def load_image_dataset(source: str, image_column: str = "image", caption_column: str | None = "caption",
                       split: str = "train") -> datasets.Dataset:
    """Load images (and captions) from `source` and check that they can be used.

    `source` is "emoji" / "emoji:32" / "emoji:64" (the committed data), a local image folder
    (captions from its metadata.jsonl/csv), a local .parquet file or folder of them, a local
    .jsonl/.csv whose image column holds paths (relative to that file), or a hub dataset id.
    """
    dataset, name = _load_source(source, split, image_column)
    if len(dataset) == 0:
        raise DataError(f"Dataset {name} (split {split!r}) has no rows: add images or point data.source elsewhere.")
    _check_column(dataset, name, image_column, "image_column")
    if caption_column is not None:
        _check_column(dataset, name, caption_column, "caption_column")
    return dataset


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (emoji and logos have transparent margins)."""
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("LA", "PA", "La"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to `resolution`, then the centre `resolution` x `resolution` square."""
    if image.size == (resolution, resolution):
        return image
    shrinking = min(image.size) > resolution
    method = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
    return ImageOps.fit(image, (resolution, resolution), method=method, centering=(0.5, 0.5))


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Rows of a `datasets.Dataset` as {"pixel_values": float32 [3, R, R] in [-1, 1], "caption": str, "index": int}.

    `random_flip` is off by default: mirroring emoji or text changes what the caption describes.
    Flips draw from torch's global RNG, which DataLoader seeds per worker from its generator.
    """

    def __init__(self, dataset: datasets.Dataset, resolution: int, image_column: str = "image",
                 caption_column: str | None = "caption", random_flip: bool = False, source: str = "the dataset"):
        columns = list(dict.fromkeys(c for c in (image_column, caption_column) if c is not None))
        self.source = source
        self.dataset = self._undecoded(dataset.select_columns(columns), image_column)
        self.resolution = resolution
        self.image_column, self.caption_column = image_column, caption_column
        self.random_flip = random_flip

    def _undecoded(self, dataset: datasets.Dataset, column: str) -> datasets.Dataset:
        try:
            return dataset.cast_column(column, datasets.Image(decode=False))
        except (TypeError, ValueError) as e:
            raise DataError(
                f"Column {column!r} of {self.source} holds {dataset.features[column]}, not images: "
                "set data.image_column to the column that holds images."
            ) from e

    def __len__(self) -> int:
        return len(self.dataset)

    def _decode(self, value: dict | None, index: int) -> Image.Image:
        value = value or {}
        where = f" ({value['path']})" if value.get("path") else ""
        if value.get("bytes") is None and not value.get("path"):
            raise DataError(f"Row {index} of {self.source} has no image: remove that row.")
        try:
            image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"])
            image.load()
            return image
        except (OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
            raise DataError(
                f"Image at row {index} of {self.source}{where} cannot be decoded ({e}): "
                "remove that row or replace the file."
            ) from e

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[index]
        image = resize_center_crop(to_rgb(self._decode(row[self.image_column], index)), self.resolution)
        pixel_values = torch.from_numpy(as_array(image)).permute(2, 0, 1).contiguous()
        if self.random_flip and torch.rand(()) < 0.5:
            pixel_values = pixel_values.flip(-1)
        caption = row[self.caption_column] if self.caption_column is not None else ""
        return {"pixel_values": pixel_values, "caption": caption or "", "index": index}


def caption_dropout(captions: list[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by "" with probability `p`, so one model also learns the unconditional branch (CFG)."""
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"Caption dropout probability {p} is outside [0, 1]: set it between 0 and 1.")
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


def load_prompts(path: str) -> list[str]:
    """Prompts from a text file: one a line; blank lines and lines starting with '#' are skipped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"Prompt file {path} does not exist: point the prompts setting at a text file of prompts.")
    lines = (line.strip() for line in file.read_text(encoding="utf-8").splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise DataError(f"Prompt file {path} has no prompts (blank and '#' lines are skipped): add one prompt a line.")
    return prompts


def make_dataloader(dataset, batch_size: int, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                    drop_last: bool = True) -> DataLoader:
    """A DataLoader whose order (and workers' RNG) follow `seed` alone."""
    if batch_size < 1:
        raise ConfigError(f"Batch size {batch_size} is not positive: set the batch size to 1 or more.")
    if drop_last and len(dataset) < batch_size:
        raise DataError(
            f"The dataset has {len(dataset)} rows, fewer than one batch of {batch_size}, so no batch would be "
            "made: lower the batch size or add data."
        )
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
