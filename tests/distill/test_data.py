"""distill.data: sources load through datasets, rows become [-1, 1] tensors, bad input names itself."""

import json

import datasets
import pytest
import torch
from PIL import Image

from distill.data import (
    EMOJI_ROOT, ImageCaptionDataset, caption_dropout, emoji_parquet, load_image_dataset, load_prompts,
    make_dataloader, to_rgb,
)
from distill.errors import DataError

EMOJI_ROWS = 3779


def _png_folder(root, sizes, captions=True):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i, 100, 200)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"a picture {i}"})
    if captions:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("size", [32, 64])
def test_emoji_parquet_loads_as_tensors(size):
    dataset = load_image_dataset(f"emoji:{size}")
    assert len(dataset) == EMOJI_ROWS
    assert emoji_parquet(size) == EMOJI_ROOT / f"{size}px" / "train.parquet"
    data = ImageCaptionDataset(dataset, resolution=size, source=f"emoji:{size}")
    for index in (0, 1234, EMOJI_ROWS - 1):
        item = data[index]
        assert item["pixel_values"].shape == (3, size, size)
        assert item["pixel_values"].dtype == torch.float32
        assert -1.0 <= item["pixel_values"].min() < item["pixel_values"].max() <= 1.0
        assert isinstance(item["caption"], str) and item["caption"].strip()
        assert item["index"] == index
    assert all(isinstance(c, str) and c.strip() for c in dataset["caption"])


def test_emoji_default_is_32px_and_other_sizes_are_refused():
    assert len(load_image_dataset("emoji")) == EMOJI_ROWS
    with pytest.raises(DataError, match="128px"):
        load_image_dataset("emoji:128")


def test_dataloader_order_follows_the_seed():
    data = ImageCaptionDataset(load_image_dataset("emoji:32"), resolution=32)

    def first_indices(seed):
        return next(iter(make_dataloader(data, batch_size=8, seed=seed)))["index"].tolist()

    assert first_indices(0) == first_indices(0)
    assert first_indices(0) != first_indices(1)
    batch = next(iter(make_dataloader(data, batch_size=8, seed=0)))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 8


def test_dataloader_refuses_a_dataset_smaller_than_one_batch(tmp_path):
    data = ImageCaptionDataset(load_image_dataset(str(_png_folder(tmp_path / "imgs", [(8, 8)] * 2))), 8)
    with pytest.raises(DataError, match="2 rows"):
        make_dataloader(data, batch_size=4)
    assert len(make_dataloader(data, batch_size=4, drop_last=False)) == 1


def test_image_folder_with_metadata_loads_and_crops_to_square(tmp_path):
    folder = _png_folder(tmp_path / "imgs", [(40, 20), (20, 60), (16, 16)])
    dataset = load_image_dataset(str(folder))
    assert len(dataset) == 3 and set(dataset["caption"]) == {"a picture 0", "a picture 1", "a picture 2"}
    data = ImageCaptionDataset(dataset, resolution=12, source=str(folder))
    for index in range(3):
        assert data[index]["pixel_values"].shape == (3, 12, 12)
    # the upscaled 16x16 solid image keeps its colour: (0, 100, 200) in [-1, 1]
    by_caption = {data[i]["caption"]: data[i]["pixel_values"] for i in range(3)}
    expected = torch.tensor([0, 100, 200]) / 127.5 - 1
    assert torch.allclose(by_caption["a picture 0"][:, 6, 6], expected, atol=0.02)


def test_center_crop_keeps_the_middle_of_a_wide_image(tmp_path):
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    image.paste((0, 0, 255), (10, 0, 20, 10))  # blue middle third, red sides
    folder = tmp_path / "wide"
    folder.mkdir()
    image.save(folder / "wide.png")
    data = ImageCaptionDataset(load_image_dataset(str(folder), caption_column=None), resolution=10, caption_column=None)
    item = data[0]
    assert item["pixel_values"].shape == (3, 10, 10) and item["caption"] == ""
    assert torch.allclose(item["pixel_values"][:, 5, 5], torch.tensor([-1.0, -1.0, 1.0]), atol=0.02)


def test_parquet_file_and_folder_load(tmp_path):
    image = Image.new("RGB", (24, 24), (10, 20, 30))
    data = datasets.Dataset.from_dict(
        {"image": [image, image], "text": ["one", "two"]},
        features=datasets.Features(image=datasets.Image(), text=datasets.Value("string")),
    )
    (tmp_path / "pq").mkdir()
    data.to_parquet(str(tmp_path / "pq" / "part.parquet"))
    for source in (tmp_path / "pq" / "part.parquet", tmp_path / "pq"):
        dataset = load_image_dataset(str(source), caption_column="text")
        assert dataset["text"] == ["one", "two"]
        item = ImageCaptionDataset(dataset, resolution=16, caption_column="text")[1]
        assert item["pixel_values"].shape == (3, 16, 16) and item["caption"] == "two"


def test_jsonl_with_relative_image_paths_loads(tmp_path):
    _png_folder(tmp_path / "imgs", [(20, 20)], captions=False)
    (tmp_path / "list.jsonl").write_text(json.dumps({"image": "imgs/0.png", "caption": "a picture"}) + "\n")
    dataset = load_image_dataset(str(tmp_path / "list.jsonl"))
    assert ImageCaptionDataset(dataset, resolution=8)[0]["pixel_values"].shape == (3, 8, 8)


def test_random_flip_mirrors_some_draws_and_is_off_by_default(tmp_path):
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    image.paste((0, 0, 255), (4, 0, 8, 8))  # red left half, blue right half
    table = datasets.Dataset.from_dict({"image": [image]}, features=datasets.Features(image=datasets.Image()))
    torch.manual_seed(0)
    flipping = ImageCaptionDataset(table, 8, caption_column=None, random_flip=True)
    left_reds = {flipping[0]["pixel_values"][0, 4, 0].item() > 0 for _ in range(20)}
    assert left_reds == {True, False}
    plain = ImageCaptionDataset(table, 8, caption_column=None)
    assert all(plain[0]["pixel_values"][0, 4, 0] > 0 for _ in range(20))


def test_rgba_is_composited_on_white():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope.*does not exist"):
        load_image_dataset(str(missing))


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no data files"):
        load_image_dataset(str(tmp_path / "empty"))


def test_empty_parquet_is_named(tmp_path):
    path = tmp_path / "none.parquet"
    datasets.Dataset.from_dict({"image": [], "caption": []},
                               features=datasets.Features(image=datasets.Image(), caption=datasets.Value("string"))
                               ).to_parquet(str(path))
    with pytest.raises(DataError, match="none.parquet.*no rows"):
        load_image_dataset(str(path))


def test_missing_caption_column_lists_the_columns(tmp_path):
    folder = _png_folder(tmp_path / "imgs", [(8, 8)])
    with pytest.raises(DataError) as error:
        load_image_dataset(str(folder), caption_column="text")
    message = str(error.value)
    assert "'text'" in message and "image, caption" in message and "data.caption_column" in message


def test_hub_id_offline_is_a_data_error():
    with pytest.raises(DataError, match="someone/no-such-dataset"):
        load_image_dataset("someone/no-such-dataset")


def test_corrupt_image_names_the_row(tmp_path):
    folder = _png_folder(tmp_path / "imgs", [(8, 8), (8, 8)], captions=False)
    (folder / "1.png").write_bytes(b"not a png" * 20)
    data = ImageCaptionDataset(load_image_dataset(str(folder), caption_column=None), 8, caption_column=None,
                               source=str(folder))
    assert data[0]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"row 1 of .*imgs.*1\.png.*remove"):
        data[1]


def test_prompts_skip_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# emoji prompts\n\na red apple\n   \n  # indented comment\n  a cat, smiling  \n")
    assert load_prompts(str(path)) == ["a red apple", "a cat, smiling"]


def test_prompt_file_empty_or_missing_is_named(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# only a comment\n\n")
    with pytest.raises(DataError, match="prompts.txt.*no prompts"):
        load_prompts(str(path))
    with pytest.raises(DataError, match="absent.txt.*does not exist"):
        load_prompts(str(tmp_path / "absent.txt"))


def test_caption_dropout_rate_and_determinism():
    captions = [f"caption {i}" for i in range(5000)]
    dropped = caption_dropout(captions, 0.1, torch.Generator().manual_seed(0))
    rate = sum(c == "" for c in dropped) / len(captions)
    assert 0.08 <= rate <= 0.12
    assert all(d in ("", c) for d, c in zip(dropped, captions))
    assert dropped == caption_dropout(captions, 0.1, torch.Generator().manual_seed(0))
    assert caption_dropout(captions[:10], 0.0) == captions[:10]
    assert caption_dropout(captions[:10], 1.0) == [""] * 10
