"""The eval stage: its sampling loop is the pipeline's, its metrics move the right way, `distill eval` runs end to end."""

import json

import pytest
import torch
from click.testing import CliRunner

import cli
from evals import models
from evals.calibrate import add_noise, blur, duplicate_rows
from evals.emoji import load_emoji
from evals.measure import Measure, quality

PROMPTS = ["grinning face", "red heart", "dog face"]


def _lora_run(root, teacher_path):
    from distill.student import LoraStudent
    from distill.teacher import Teacher

    teacher = Teacher.from_pretrained(teacher_path)
    student = LoraStudent(teacher, rank=4)
    with torch.no_grad():  # B starts at zero: randomise it so the LoRA changes the images
        g = torch.Generator().manual_seed(0)
        for name, p in teacher.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    student.save_weights(root / "lora_run" / "student")
    _info(teacher, teacher_path, "lora", 1.0).save(root / "lora_run" / "student")
    return root / "lora_run"


def _info(teacher, teacher_path, kind, guidance_scale):
    from distill.consistency import lcm_sampler
    from distill.info import StudentInfo

    return StudentInfo(kind=kind, teacher=str(teacher_path), teacher_kind=teacher.kind,
                       pipeline_class=type(teacher.pipe).__name__, prediction_type=teacher.prediction_type,
                       sampler=lcm_sampler(50, 10.0, teacher.prediction_type, guidance_scale),
                       teacher_guidance_scale=3.0, step=3,
                       details=dict(num_ddim_timesteps=50, timestep_scaling=10.0, w_min=1.0, w_max=3.0))


def _full_export(root, teacher_path):
    """A pipeline folder with an LCMScheduler and a UNet with a (randomised) guidance input, as `distill export` does."""
    from distill.student import build_full_network
    from distill.teacher import Teacher

    teacher = Teacher.from_pretrained(teacher_path)
    unet = build_full_network(teacher.unet).eval()
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    info = _info(teacher, teacher_path, "full", 3.0)
    pipe = teacher.pipe
    pipe.unet, pipe.scheduler = unet, info.sampler.build(pipe.scheduler.config)
    pipe.save_pretrained(str(root / "full"), safe_serialization=True)
    info.save(root / "full")
    return root / "full"


@pytest.fixture(scope="module")
def students(tiny_sd_v_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    return _lora_run(root, tiny_sd_v_path), _full_export(root, tiny_sd_v_path)


def _ours(cand, steps, seed=5):
    gens = models.sample_generators(seed, range(len(PROMPTS)))
    z = models.denoise(cand, steps, models.encode(cand, PROMPTS), models.initial_noise(cand, gens), gens)
    return (models.decode(cand, z) + 1) / 2


def _pipeline(pipe, steps, guidance, seed=5):
    pipe.set_progress_bar_config(disable=True)
    gens = models.sample_generators(seed, range(len(PROMPTS)))
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt").images


def test_teacher_loop_is_the_pipelines_own_with_cfg(tiny_sd_v_path):
    from diffusers import StableDiffusionPipeline

    usual, baseline = models.load_teacher(str(tiny_sd_v_path), "cpu", torch.float32, 3.0, None)
    assert baseline.scheduler_name == "DDIMScheduler (trailing)" and usual.cfg and usual.nfe(4) == 8
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_v_path))
    torch.testing.assert_close(_ours(usual, 3), _pipeline(pipe, 3, 3.0), atol=1e-5, rtol=0)  # its own PNDM
    pipe.scheduler = baseline.scheduler()
    torch.testing.assert_close(_ours(baseline, 2), _pipeline(pipe, 2, 3.0), atol=1e-5, rtol=0)


def test_students_sample_as_plain_diffusers_does(tiny_sd_v_path, students):
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline

    lora_run, full = students
    lora = models.load_student(str(lora_run), str(tiny_sd_v_path), "cpu", torch.float32)
    assert (lora.kind, lora.cfg, lora.nfe(2), lora.name) == ("lora", False, 2, "lora_run")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_v_path))
    pipe.load_lora_weights(str(lora_run / "student"))  # unfused, as a user loads it
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50, timestep_scaling=10.0)
    ours = _ours(lora, 2)
    torch.testing.assert_close(ours, _pipeline(pipe, 2, 1.0), atol=1e-4, rtol=0)  # fused: summation order only
    bare = StableDiffusionPipeline.from_pretrained(str(tiny_sd_v_path))
    bare.scheduler = pipe.scheduler
    assert (ours - _pipeline(bare, 2, 1.0)).abs().max() > 1e-3  # the LoRA is really in the weights

    student = models.load_student(str(full), str(tiny_sd_v_path), "cpu", torch.float32)
    assert (student.kind, student.guidance_input, student.cfg, student.nfe(4)) == ("full", True, False, 4)
    reference = DiffusionPipeline.from_pretrained(str(full))
    torch.testing.assert_close(_ours(student, 2), _pipeline(reference, 2, 3.0), atol=1e-5, rtol=0)
    # Same seeds, same starting noise in every model.
    gens = lambda: models.sample_generators(5, range(3))  # noqa: E731
    assert torch.equal(models.initial_noise(student, gens()), models.initial_noise(lora, gens()))


@pytest.fixture(scope="module")
def measure():
    return Measure("effnet-lite0", "emoji-align", "cpu")


def test_metrics_move_the_right_way_under_known_degradations(measure):
    """Through the run's own feature net and metric code: 48 real emoji against 48 others, and degraded copies."""
    real = load_emoji(32)
    rows = torch.randperm(len(real.captions), generator=torch.Generator().manual_seed(0))
    ref_rows, fake_rows = rows[:48], rows[48:96]
    ref, fake = measure.features(real.images[ref_rows]), real.images[fake_rows]
    captions = [real.captions[i] for i in fake_rows]
    sets = {"real": fake, "noise": add_noise(fake), "blur": blur(fake), "duplicates": fake[duplicate_rows(48, 12)]}
    feats = {k: measure.features(v) for k, v in sets.items()}
    q = {k: quality(measure, ref, f, kid_size=24, seed=0) for k, f in feats.items()}
    for bad in ("noise", "blur", "duplicates"):
        assert q["real"]["fd"] < q[bad]["fd"] and q["real"]["kid"] < q[bad]["kid"], bad
    assert q["duplicates"]["recall"] < q["real"]["recall"]
    from evals.metrics import diversity

    assert diversity(feats["duplicates"].view(12, 4, -1)) < 0.05 * diversity(feats["real"].view(12, 4, -1))
    align = {k: measure.alignment(measure.embed_images(sets[k], feats[k]), captions) for k in ("real", "noise")}
    assert align["real"]["align_top5"] > align["noise"]["align_top5"]
    assert align["real"]["align_cos"] > align["noise"]["align_cos"]
    # The reused-feature path gives what the scorer's own retrieval gives.
    assert (align["real"]["align_top1"], align["real"]["align_top5"]) == pytest.approx(
        measure.scorer.retrieval(sets["real"], captions))


def _eval(*args):
    return CliRunner().invoke(cli.main, ["eval", *map(str, args)])


def test_distill_eval_end_to_end_on_a_tiny_teacher_and_two_students(tiny_sd_v_path, students, tmp_path):
    out = tmp_path / "report"
    result = _eval("--teacher", tiny_sd_v_path, "--student", students[0], "--student", students[1], "--steps", "1,2",
                   "--teacher-steps", 3, "-n", 16, "--batch-size", 8, "--latency-runs", 2, "--latency-warmup", 1,
                   "--diversity-prompts", 2, "--diversity-samples", 2, "--out", out)
    assert result.exit_code == 0, result.output
    from evals.report import FILES
    from evals.schema import validate

    assert all((out / name).is_file() for name in FILES)
    report = json.loads((out / "report.json").read_text())
    assert validate(report) == []
    labels = [r["label"] for r in report["rows"]]
    assert labels == ["teacher@3", "teacher@1", "teacher@2", "lora_run@1", "lora_run@2", "full@1", "full@2"]
    assert [r["nfe"] for r in report["rows"]] == [6, 2, 4, 1, 2, 1, 2]  # CFG doubles the teacher's
    assert report["rows"][0]["guidance_scale"] == 3.0  # from the students' student.json
    p = report["protocol"]
    assert (p["n"], p["fd_name"], p["feature_resolution"], p["reference"]["floor_n"]) == (16, "FD-EffNet", 128, 16)
    assert report["floor"]["fd"] > 0 and report["recommendations"][0]["kind"] == "latency_budget"
    assert "report:" in result.output and "FD-EffNet" in result.output


def test_prompt_file_without_real_images_compares_with_the_teacher(tiny_sd_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n# comment\na dog\n")
    out = tmp_path / "report"
    result = _eval("--teacher", tiny_sd_path, "--prompts", prompts, "--reference", "none", "--alignment", "none",
                   "--steps", "1", "--teacher-steps", 2, "-n", 6, "--guidance-scale", 2, "--latency-runs", 1,
                   "--latency-warmup", 0, "--diversity-prompts", 2, "--diversity-samples", 2, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["floor"] is None and report["rows"][0]["quality"]["fd"] == pytest.approx(0, abs=1e-2)
    assert "cycled" in report["protocol"]["prompts"] and "align_top1" not in report["rows"][1]["quality"]
    assert report["rows"][1]["vs_teacher"]["fd_ratio"] is None or report["rows"][0]["quality"]["fd"] > 1e-6


@pytest.mark.parametrize("args, words", [
    (["--student", "/no/such/run"], ["/no/such/run", "does not exist"]),
    (["--dtype", "fp16"], ["fp16", "CUDA"]),
    (["--steps", "0,2"], ["--steps", "1,2,4,8"]),
    (["-n", "5000"], ["5000", "reference"]),
])
def test_mistakes_end_in_one_sentence(tiny_sd_path, tmp_path, args, words):
    result = _eval("--teacher", tiny_sd_path, "--out", tmp_path / "r", *args)
    assert result.exit_code == 2, result.output
    assert all(w in result.output for w in words) and "Traceback" not in result.output
