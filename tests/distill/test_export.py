"""distill.export + distill.sampling: exported students load in plain diffusers and give the toolkit's images.

The key check: for the same seed and steps, the export loaded as a user would (teacher pipeline +
`load_lora_weights` + LCMScheduler, or the exported pipeline folder) gives the images the toolkit's own
sampler gives from the student in memory. Student weights are randomised first, so that a LoRA or a
guidance input that went missing in the export changes the images (each test checks that it would).
"""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open

from distill.errors import ConfigError, ModelError
from distill.consistency import lcm_sampler
from distill.export import export_run
from distill.images import label_margins
from distill.info import LORA_WEIGHTS, StudentInfo
from distill.runs import MARKER, student_folder
from distill.sampling import lcm_sample, load_student_pipeline, sample_grid
from distill.student import FullStudent, LoraStudent
from distill.teacher import Teacher

PROMPTS = ["a smiling face", "red heart"]
SEED = 7
ATOL = 1e-5  # images in [0, 1]; measured: identical, 4e-7 after fuse_lora (summation order)


def _info(teacher, path, kind, guidance_scale=1.0):
    return StudentInfo(kind=kind, teacher=str(path), teacher_kind=teacher.kind,
                       pipeline_class=type(teacher.pipe).__name__, prediction_type=teacher.prediction_type,
                       sampler=lcm_sampler(50, 10.0, teacher.prediction_type, guidance_scale),
                       teacher_guidance_scale=3.0, step=5,
                       details=dict(num_ddim_timesteps=50, timestep_scaling=10.0, w_min=1.0, w_max=3.0))


def _randomise(module, pattern, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if pattern in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _ours(student, teacher, steps, guidance_scale=1.0):
    cond = teacher.encode_prompt(PROMPTS)
    images = lcm_sample(student, teacher, cond, steps, torch.Generator().manual_seed(SEED), guidance_scale)
    return ((images + 1) / 2).clamp(0, 1)


def _theirs(pipe, steps, guidance_scale=1.0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
                generator=torch.Generator().manual_seed(SEED)).images


def _lora_run(tmp_path, teacher_path):
    teacher = Teacher.from_pretrained(teacher_path)
    student = LoraStudent(teacher, rank=4)
    _randomise(teacher.unet, "lora_B", 0.05)
    folder = tmp_path / "run" / "student"
    student.save_weights(folder)
    _info(teacher, teacher_path, "lora").save(folder)
    return student, tmp_path / "run"


@pytest.mark.parametrize("fixture, pipeline_cls", [("tiny_sd_path", StableDiffusionPipeline),
                                                   ("tiny_sdxl_path", StableDiffusionXLPipeline)])
def test_lora_export_gives_the_toolkit_images_in_plain_diffusers(request, tmp_path, fixture, pipeline_cls):
    teacher_path = request.getfixturevalue(fixture)
    student, run = _lora_run(tmp_path, teacher_path)
    teacher = student.teacher
    out = export_run(run, tmp_path / "export")
    with safe_open(str(out / LORA_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all("lora" in k for k in keys)
    info = json.loads((out / "student.json").read_text())
    assert info["kind"] == "lora" and info["teacher"] == str(teacher_path)
    card = (out / "README.md").read_text()
    assert "LCMScheduler" in card and f"base_model: {teacher_path}" in card and "original_inference_steps=50" in card

    ours = _ours(student, teacher, steps=2)
    pipe = pipeline_cls.from_pretrained(str(teacher_path))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50, timestep_scaling=10.0)
    bare = _theirs(pipe, 2)  # the teacher without adapters, for contrast
    pipe.load_lora_weights(str(out))
    theirs = _theirs(pipe, 2)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    assert (bare - ours).abs().max() > 50 * ATOL  # the adapters matter, so a lost one would show
    pipe.fuse_lora()
    torch.testing.assert_close(_theirs(pipe, 2), ours, atol=ATOL, rtol=0)


def test_full_export_is_a_pipeline_folder_with_the_toolkit_images(tiny_sd_v_path, tmp_path):
    teacher = Teacher.from_pretrained(tiny_sd_v_path)  # v-prediction: the conversion must survive the export
    student = FullStudent(teacher, time_cond_proj_dim=32)
    _randomise(student.network, "cond_proj", 0.5)
    folder = tmp_path / "run" / "student"
    student.save_weights(folder)
    _info(teacher, tiny_sd_v_path, "full", guidance_scale=3.0).save(folder)
    out = export_run(tmp_path / "run", tmp_path / "export")

    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    config = pipe.scheduler.config
    assert (config.original_inference_steps, config.timestep_scaling, config.prediction_type) == (
        50, 10.0, "v_prediction")
    assert pipe.unet.config.time_cond_proj_dim == 32
    for steps in (1, 3):
        ours = _ours(student, teacher, steps, guidance_scale=3.0)
        torch.testing.assert_close(_theirs(pipe, steps, guidance_scale=3.0), ours, atol=ATOL, rtol=0)
    other = _ours(student, teacher, 3, guidance_scale=1.0)
    assert (other - ours).abs().max() > 50 * ATOL  # the guidance input reaches the UNet


def test_export_from_a_checkpoint_and_the_errors(tiny_sd_path, tmp_path):
    _, run = _lora_run(tmp_path, tiny_sd_path)
    ckpt = run / "checkpoints" / "step-0000005"
    (ckpt / "student").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"step": 5}')
    (ckpt / MARKER).write_text("step 5\n")  # a complete checkpoint, as distill.runs marks one
    for name in (LORA_WEIGHTS, "student.json"):
        (ckpt / "student" / name).write_bytes((run / "student" / name).read_bytes())
    assert student_folder(run) == run / "student"
    assert student_folder(run, 5) == student_folder(run, "step-0000005") == student_folder(run, ckpt) == ckpt / "student"
    assert (export_run(run, tmp_path / "from_ckpt", checkpoint=5) / LORA_WEIGHTS).is_file()
    (run / "best").mkdir()  # the quality probe's best student, beside student/
    for name in (LORA_WEIGHTS, "student.json"):
        (run / "best" / name).write_bytes((run / "student" / name).read_bytes())
    assert student_folder(run, "best") == student_folder(run / "best") == run / "best"
    assert (export_run(run / "best", tmp_path / "from_best") / LORA_WEIGHTS).is_file()

    with pytest.raises(ModelError, match="does not exist"):
        export_run(tmp_path / "nowhere", tmp_path / "x")
    with pytest.raises(ModelError, match="available: step-0000005"):
        export_run(run, tmp_path / "x", checkpoint=9)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ModelError, match="holds no student"):
        export_run(empty, tmp_path / "x")
    with pytest.raises(ConfigError, match="not empty"):
        export_run(run, tmp_path / "from_ckpt")
    (run / "student" / LORA_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="corrupt"):
        export_run(run, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # no half-written export is left behind


def test_full_export_of_a_corrupt_unet_is_a_model_error(tiny_sd_path, tmp_path):
    teacher = Teacher.from_pretrained(tiny_sd_path)
    folder = tmp_path / "run" / "student"
    FullStudent(teacher, 32).save_weights(folder)
    _info(teacher, tiny_sd_path, "full").save(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="corrupt"):
        export_run(tmp_path / "run", tmp_path / "x")


def test_sample_grid_from_run_and_exports(tiny_sd_path, tmp_path):
    _, run = _lora_run(tmp_path, tiny_sd_path)
    out = export_run(run, tmp_path / "export")
    tile = 16 * 8 + 2  # 16 px images are shown 8x, with 2 px padding
    left, top = label_margins((PROMPTS, ["student@1", "student@2", "teacher@3"]))  # prompts left, model@steps on top
    assert left > 0 and top > 0
    for source in (run, out):
        path = sample_grid(source, PROMPTS, [1, 2], SEED, tmp_path / f"{source.name}.png", teacher_steps=3)
        image = Image.open(path)
        assert image.size == (left + 3 * tile + 2, top + 2 * tile + 2)  # 2 prompts x (2 student + 1 teacher)
        gray = np.asarray(image.convert("L"))
        assert gray[top:, :left].min() < 128 and gray[:top, left:].min() < 128  # prompts left, columns' names on top
    pipe, info = load_student_pipeline(out)
    assert isinstance(pipe.scheduler, LCMScheduler) and info.kind == "lora"
    with pytest.raises(ConfigError, match="prompt"):
        sample_grid(out, [], 1, SEED, tmp_path / "none.png")
    with pytest.raises(ModelError, match="does not exist"):
        sample_grid(tmp_path / "missing", PROMPTS, 1, SEED, tmp_path / "none.png")


def test_student_json_written_before_students_carried_their_sampler_still_loads(tiny_sd_path, tmp_path):
    old = {"kind": "lora", "teacher": str(tiny_sd_path), "teacher_kind": "sd", "prediction_type": "epsilon",
           "num_ddim_timesteps": 10, "timestep_scaling": 10.0, "w_min": 2.0, "w_max": 2.0, "guidance_scale": 1.0,
           "teacher_guidance_scale": 3.0, "step": 381, "scheduler": "LCMScheduler"}
    (tmp_path / "student.json").write_text(json.dumps(old))
    info = StudentInfo.load(tmp_path)
    assert info.sampler.scheduler == "LCMScheduler" and info.sampler.config["original_inference_steps"] == 10
    assert info.pipeline_class == "StableDiffusionPipeline" and info.details["w_min"] == 2.0 and info.step == 381
