from pathlib import Path

import pytest

from distill import emoji_data


@pytest.mark.parametrize("name, text, caption", [
    (":woman_firefighter_medium_skin_tone:", "", "woman firefighter, medium skin tone"),
    (":thumbs_up_medium-light_skin_tone:", "", "thumbs up, medium-light skin tone"),
    (":kiss_woman_man_light_skin_tone_medium-dark_skin_tone:", "",
     "kiss woman man, light skin tone and medium-dark skin tone"),
    (":France:", "\U0001F1EB\U0001F1F7", "flag: France"),
    (":pirate_flag:", "\U0001F3F4\u200d\u2620\ufe0f", "pirate flag"),
    (":grinning_face:", "\U0001F600", "grinning face"),
])
def test_caption_from_name(name, text, caption):
    assert emoji_data.caption_from_name(name, text) == caption


def test_committed_dataset_has_licence_and_both_sizes():
    root = Path(emoji_data.__file__).resolve().parents[1] / "data" / "emoji"
    assert (root / "32px" / "train.parquet").is_file() and (root / "64px" / "train.parquet").is_file()
    text = (root / "LICENSE.md").read_text()
    assert "OFL-1.1" in text and "Apache" in text


@pytest.mark.skipif(not Path(emoji_data.FONT_PATH).exists(), reason="needs apt-get install fonts-noto-color-emoji")
def test_render_draws_colour_and_rejects_unknown():
    font = emoji_data._load_font()
    banana = emoji_data.render("\U0001F34C", font)
    assert banana is not None and banana.size[0] == banana.size[1]
    colours = banana.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 20  # a colour bitmap, not a monochrome outline
    assert emoji_data.render("", font) is None


def test_missing_font_is_a_clear_error(monkeypatch, tmp_path):
    from distill.errors import DataError

    monkeypatch.setattr(emoji_data, "FONT_PATH", str(tmp_path / "no.ttf"))
    with pytest.raises(DataError, match="fonts-noto-color-emoji"):
        emoji_data._load_font()
