"""Bad input through the real CLI: one sentence naming the thing, exit 2, no traceback, nothing lost."""

import pytest
from click.testing import CliRunner

import cli


def train(*args):
    return CliRunner().invoke(cli.main, ["train", *args])


@pytest.fixture
def out(tmp_path):
    return f"output_dir={tmp_path / 'runs'}"


def test_missing_teacher_path(tmp_path, out):
    result = train("lcm/emoji_sd_lora", f"teacher={tmp_path / 'no-teacher'}", out)
    assert result.exit_code == 2, result.output
    assert "no-teacher" in result.output and "Traceback" not in result.output


def test_corrupt_teacher_folder(tmp_path, out):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_text("{not json")
    result = train("lcm/emoji_sd_lora", f"teacher={folder}", out)
    assert result.exit_code == 2 and "broken" in result.output and "Traceback" not in result.output


def test_unsupported_pipeline_class(tmp_path, out):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    result = train("lcm/emoji_sd_lora", f"teacher={folder}", out)
    assert result.exit_code == 2 and "KandinskyPipeline" in result.output


def test_missing_dataset_and_caption_column(tiny_sd_bert_path, tmp_path, out):
    missing = train("lcm/emoji_sd_lora", f"teacher={tiny_sd_bert_path}", f"data.source={tmp_path / 'nodata'}", out)
    assert missing.exit_code == 2 and "nodata" in missing.output and "Traceback" not in missing.output
    column = train("lcm/emoji_sd_lora", f"teacher={tiny_sd_bert_path}", "data.caption_column=text", out)
    assert column.exit_code == 2 and "'text'" in column.output and "caption" in column.output


def test_a_failed_run_keeps_earlier_runs(tiny_sd_bert_path, tmp_path, out):
    earlier = tmp_path / "runs" / "001-lcm-emoji_sd_lora"
    earlier.mkdir(parents=True)
    (earlier / "keep.txt").write_text("mine")
    result = train("lcm/emoji_sd_lora", f"teacher={tmp_path / 'nope'}", out)
    assert result.exit_code == 2
    assert (earlier / "keep.txt").read_text() == "mine"


def test_unknown_or_missing_tracker_is_named_before_any_model_loads(tmp_path, out):
    result = train("lcm/emoji_sd_lora", "--report-to", "nonsense", f"teacher={tmp_path / 'no-teacher'}", out)
    assert result.exit_code == 2 and "report_to=nonsense" in result.output and "tensorboard" in result.output
    assert "no-teacher" not in result.output  # refused before the teacher was even looked at
    assert not (tmp_path / "runs").exists()  # and before a run folder was made
