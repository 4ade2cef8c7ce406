"""`distill sample` and `distill export` from the command line, on a tiny teacher."""

from click.testing import CliRunner
from PIL import Image

import cli


def test_sample_a_plain_teacher_pipeline(tiny_sd_path, tmp_path):
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(cli.main, ["sample", str(tiny_sd_path), "--prompt", "a", "--prompt", "b",
                                           "--steps", "1,2,3", "--guidance-scale", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    grid = Image.open(out)
    assert grid.width > grid.height  # three step columns, two prompt rows


def test_sample_bad_steps_and_missing_source(tiny_sd_path, tmp_path):
    bad = CliRunner().invoke(cli.main, ["sample", str(tiny_sd_path), "--prompt", "a", "--steps", "two"])
    assert bad.exit_code == 2 and "--steps" in bad.output
    missing = CliRunner().invoke(cli.main, ["sample", str(tmp_path / "nope"), "--prompt", "a"])
    assert missing.exit_code == 2 and "nope" in missing.output and "Traceback" not in missing.output


def test_export_of_a_missing_run_is_one_sentence(tmp_path):
    result = CliRunner().invoke(cli.main, ["export", str(tmp_path / "norun"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "norun" in result.output


def test_sample_a_plain_sd3_pipeline_saved_without_t5(tiny_sd3_path, tmp_path):
    """model_index.json holds text_encoder_3: [null, null]; diffusers refuses such a folder unless given None."""
    import json

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(tmp_path / "no-t5")
    assert json.loads((tmp_path / "no-t5" / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(cli.main, ["sample", str(tmp_path / "no-t5"), "--prompt", "a", "--steps", "2",
                                           "--guidance-scale", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).width > 0
