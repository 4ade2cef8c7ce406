"""The eval stage: its sampling loop is the pipeline's, its metrics move the right way, `distill eval` runs end to end."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

import cli
from evals import models
from evals.calibrate import add_noise, blur, duplicate_rows
from evals.emoji import load_emoji
from evals.measure import Measure, quality
from tests.evals.students import full_export, lora_run

PROMPTS = ["grinning face", "red heart", "dog face"]


@pytest.fixture(scope="module")
def students(tiny_sd_v_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    return lora_run(root, tiny_sd_v_path), full_export(root, tiny_sd_v_path)


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
                   "--diversity-prompts", 2, "--diversity-samples", 2, "--baseline", "none", "--no-control",
                   "--judges", "effnet-lite1", "--out", out)
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
    assert report["floor"]["fd"] > 0 and report["recommendations"][0]["kind"] == "warning"  # small N, said first
    assert any(r["kind"] == "latency_budget" for r in report["recommendations"])
    assert "report:" in result.output and "FD-EffNet" in result.output
    assert all(r["judges"]["effnet-lite1"]["independent"] for r in report["rows"])  # no student named a network
    assert report["rows"][0]["quality"]["collapse_vs_teacher"] == 0.0  # the teacher paired with itself
    assert all(0 <= r["quality"]["collapse_vs_teacher"] <= 1 and "spreads" not in r for r in report["rows"])
    assert "## Second judges" in (out / "report.md").read_text() and "FD-EffNet-L1 ↓" in (out / "report.md").read_text()


def test_prompt_file_without_real_images_compares_with_the_teacher(tiny_sd_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n# comment\na dog\n")
    out = tmp_path / "report"
    result = _eval("--teacher", tiny_sd_path, "--prompts", prompts, "--reference", "none", "--alignment", "none",
                   "--steps", "1", "--teacher-steps", 2, "-n", 6, "--guidance-scale", 2, "--latency-runs", 1,
                   "--latency-warmup", 0, "--diversity-prompts", 2, "--diversity-samples", 2, "--judges",
                   "effnet-lite1", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["floor"] is None and report["rows"][0]["quality"]["fd"] == pytest.approx(0, abs=1e-2)
    assert report["rows"][0]["judges"]["effnet-lite1"]["fd"] == pytest.approx(0, abs=1e-2)  # its own reference too
    assert report["rows"][1]["judges"]["effnet-lite1"]["fd"] > 1
    assert "cycled" in report["protocol"]["prompts"] and "align_top1" not in report["rows"][1]["quality"]
    assert report["rows"][1]["vs_teacher"]["fd_ratio"] is None or report["rows"][0]["quality"]["fd"] > 1e-6


@pytest.mark.parametrize("args, words", [
    (["--student", "/no/such/run"], ["/no/such/run", "does not exist"]),
    (["--dtype", "fp16"], ["fp16", "CUDA"]),
    (["--steps", "0,2"], ["--steps", "1,2,4,8"]),
    (["-n", "5000"], ["5000", "reference"]),
    (["--baseline", "LCMScheduler:grid=50@1", "--steps", "1"], ["grid=", "flow-matching", "drop grid="]),  # a VP teacher
])
def test_mistakes_end_in_one_sentence(tiny_sd_path, tmp_path, args, words):
    result = _eval("--teacher", tiny_sd_path, "--out", tmp_path / "r", *args)
    assert result.exit_code == 2, result.output
    assert all(w in result.output for w in words) and "Traceback" not in result.output


def test_the_sweep_picks_the_best_sampler_per_step_count_and_students_are_judged_against_it(
        tiny_sd_v_path, students, tmp_path):
    out = tmp_path / "report"
    lora = students[0]
    result = _eval("--teacher", tiny_sd_v_path, "--student", lora, "--steps", "1,2", "--teacher-steps", 3,
                   "-n", 16, "--batch-size", 8, "--latency-runs", 1, "--latency-warmup", 0, "--diversity-prompts", 2,
                   "--diversity-samples", 2, "--baseline", "DDIMScheduler:timestep_spacing=trailing@1,3",
                   "--baseline", "LCMScheduler@1", "--sweep-samples", 16, "--cascade", f"{lora}@1+teacher@1:0.5",
                   "--out", out)
    assert result.exit_code == 0, result.output
    from evals.schema import validate

    report = json.loads((out / "report.json").read_text())
    assert validate(report) == []
    sweep = [e for e in report["sweep"] if e["kind"] == "baseline"]
    assert len(sweep) == 3 * 2  # three (sampler, guidance) candidates x two step counts
    rows = {r["label"]: r for r in report["rows"]}
    for k in (1, 2):
        entries = [e for e in sweep if e["steps"] == k]
        best = min(entries, key=lambda e: (e["fd"], e["nfe"]))
        assert [e["label"] for e in entries if e["best"]] == [best["label"]]
        row = rows[best["label"]]  # the best, re-run at full N (here the same N): the same images, the same FD
        assert row["baseline"] and row["screen"]["fd"] == pytest.approx(best["fd"], rel=1e-6)
        student = rows[f"lora_run@{k}"]
        assert student["vs_baseline"]["label"] == best["label"]
        assert student["vs_baseline"]["fd_ratio"] == pytest.approx(student["quality"]["fd"] / row["quality"]["fd"])
        control = [e for e in report["sweep"] if e["kind"] == "control" and e["steps"] == k]
        assert len(control) == 1 and student["vs_control"]["label"] == control[0]["label"]
        # the control (the teacher, LCMScheduler, no CFG) is the sweep's LCM row: screened once, its scores reused
        lcm = next(e for e in sweep if e["label"] == f"teacher[LCM,no-cfg]@{k}")
        assert control[0]["same_as"] == lcm["label"] and control[0]["fd"] == lcm["fd"]
    cascade = next(r for r in report["rows"] if r["role"] == "cascade")
    assert cascade["nfe"] == 1 + 2  # the student's step, then one teacher step with CFG


def test_a_lora_made_elsewhere_is_evaluated_with_the_sampler_given(tiny_sd_v_path, students, tmp_path):
    import shutil

    bare = tmp_path / "published-lora"  # only the weights file, as a published LCM-LoRA comes
    bare.mkdir()
    shutil.copy(students[0] / "student" / "pytorch_lora_weights.safetensors", bare)
    out = tmp_path / "report"
    result = _eval("--teacher", tiny_sd_v_path, "--student", bare, "--student-sampler", "LCMScheduler@1",
                   "--steps", "2", "--teacher-steps", 3, "-n", 8, "--batch-size", 8, "--latency-runs", 1,
                   "--latency-warmup", 0, "--diversity-prompts", 2, "--diversity-samples", 2, "--baseline", "none",
                   "--guidance-scale", 3, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    row = next(r for r in report["rows"] if r["role"] == "student")
    assert (row["label"], row["scheduler"], row["guidance_scale"], row["kind"]) == (
        "published-lora@2", "LCMScheduler", 1.0, "lora")
    model = next(m for m in report["models"] if m["name"] == "published-lora")
    assert model["metadata"]["adapter_mb"] > 0 and "made elsewhere" in model["description"]
    assert row["vs_control"]["label"] == "control[published-lora]@2"  # the untrained teacher, sampled the same way


def test_a_student_is_evaluated_only_at_step_counts_its_sampler_has(tiny_sd_v_path, students, tmp_path):
    """An ADD student samples on a grid of 4 timesteps (LCMScheduler with original_inference_steps=4): at 8 steps
    diffusers would raise mid-run. Here a grid of 2, asked for 1 and 4 steps: only 1 is run, its control too."""
    import shutil

    add_run = tmp_path / "add_run"
    shutil.copytree(students[0], add_run)
    info_path = add_run / "student" / "student.json"
    info = json.loads(info_path.read_text())
    info["sampler"]["config"]["original_inference_steps"] = 2
    info.update(method="add", feature_network="effnet-lite1")
    info_path.write_text(json.dumps(info))
    out = tmp_path / "report"
    result = _eval("--teacher", tiny_sd_v_path, "--student", add_run, "--steps", "1,4", "--teacher-steps", 3,
                   "-n", 8, "--batch-size", 8, "--latency-runs", 1, "--latency-warmup", 0, "--diversity-prompts", 2,
                   "--diversity-samples", 2, "--baseline", "none", "--out", out)
    assert result.exit_code == 0, result.output
    assert "no schedule for [4] steps" in result.output
    report = json.loads((out / "report.json").read_text())
    assert [r["label"] for r in report["rows"] if r["role"] == "student"] == ["add_run@1"]
    assert [e["steps"] for e in report["sweep"] if e["kind"] == "control"] == [1]
    md = (out / "report.md").read_text()
    assert "its discriminator read effnet-lite1" in md  # which network it saw
    assert report["rows"][-1]["method"] == "add" and "LCM `add_run`" not in md  # named by the recipe that made it
    from evals.recommend import _who
    assert _who(report["rows"][-1]) == "ADD-LoRA `add_run` at 1 step"


def test_flow_teacher_loop_is_the_sd3_pipelines_own_and_its_sweep_is_the_flow_one(tiny_sd3_path):
    from diffusers import StableDiffusion3Pipeline

    from evals.baselines import DEFAULT_BASELINES, FLOW_BASELINES, defaults_for, sweep_candidates

    usual, baseline = models.load_teacher(str(tiny_sd3_path), "cpu", torch.float32, 3.0, None)
    assert baseline.scheduler_cls.__name__ == "FlowMatchEulerDiscreteScheduler"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path))
    pipe.set_progress_bar_config(disable=True)
    gens = models.sample_generators(5, range(len(PROMPTS)))
    theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=gens, height=16, width=16,
                  output_type="latent").images
    gens = models.sample_generators(5, range(len(PROMPTS)))
    ours = models.denoise(usual, 3, models.encode(usual, PROMPTS), models.initial_noise(usual, gens), gens)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    specs = defaults_for("flow", list(DEFAULT_BASELINES))
    assert specs == list(FLOW_BASELINES) and defaults_for("vp", list(DEFAULT_BASELINES)) == list(DEFAULT_BASELINES)
    for cand in sweep_candidates(usual.model, usual.source, specs):  # every flow sampler runs on the flow teacher
        gens = models.sample_generators(5, range(1))
        z = models.denoise(cand, 2, models.encode(cand, PROMPTS[:1]), models.initial_noise(cand, gens), gens)
        assert torch.isfinite(z).all(), cand.name


def test_distill_eval_end_to_end_on_a_flow_teacher_its_sweep_its_consistency_student_and_the_gap(tiny_sd3_path,
                                                                                                  tmp_path):
    from distill.config import from_dict
    from recipes.lcm import LcmConfig, main

    run = main(from_dict(LcmConfig, dict(
        recipe="lcm", run_name="flow", teacher=str(tiny_sd3_path), output_dir=str(tmp_path / "runs"),
        max_train_steps=2, train_batch_size=4, checkpointing_steps=2, report_to="none",
        data=dict(source="emoji:32", resolution=16, max_samples=8),
        student=dict(kind="lora", lora_rank=4, time_cond_proj_dim=None, lora_target_modules=["to_q", "to_k", "to_v"]),
        lcd=dict(w_min=2.0, w_max=2.0), optim=dict(lr_warmup_steps=0),
        sample=dict(prompts=["dog face"], steps=[1], every_steps=0, teacher_steps=None))))
    out = tmp_path / "report"
    result = _eval("--teacher", tiny_sd3_path, "--student", run, "--steps", "1,2", "--teacher-steps", 3, "-n", 8,
                   "--batch-size", 8, "--latency-runs", 1, "--latency-warmup", 0, "--diversity-prompts", 2,
                   "--diversity-samples", 2, "--sweep-samples", 0, "--consistency-gap", 4, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    from evals.schema import validate

    assert validate(report) == []
    sweep = {e["scheduler"].split(" ")[0] for e in report["sweep"] if e["kind"] == "baseline"}  # "X (spacing)"
    assert {"FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
            "FlowMatchLCMScheduler"} <= sweep  # the flow samplers, not DDIM
    rows = {r["label"]: r for r in report["rows"]}
    assert {"teacher@3", "001-flow@1", "001-flow@2"} <= set(rows)
    assert all(math.isfinite(r["quality"]["fd"]) for r in rows.values())
    gap = report["consistency_gap"]["students"]["001-flow"]
    # sigma x 1000 of the student's pinned 1-, 2- and 4-step sigmas: indices 0 / 0, 25 / 0, 12, 25, 37 of its N = 50
    # grid at the tiny SD3's shift 3 (not FlowMatchLCMScheduler's own spacing, whose last step sits at sigma_min)
    assert [r["t"] for r in gap] == [1000, 903, 743, 496]
    assert all(math.isfinite(r["student_gap"]) for r in gap)
    # near sigma = 0 one Euler step is the ODE solution at the solver's spacing: the control's gap is 0 there
    assert all((r["teacher_one_step_gap"] > 0) == (r["ode_steps"] > 1) for r in gap)


def test_the_flow_sweeps_grid_row_visits_a_consistency_students_sigmas_not_the_schedulers_own(tiny_sd3_path):
    from distill.consistency import lcm_sampler
    from distill.errors import ConfigError
    from evals.baselines import grid_sigmas, sweep_candidates

    usual, _ = models.load_teacher(str(tiny_sd3_path), "cpu", torch.float32, 3.0, None)
    own, pinned = sweep_candidates(usual.model, usual.source, ["FlowMatchLCMScheduler@1",
                                                               "FlowMatchLCMScheduler:grid=50@1"])
    assert pinned.name == "teacher[FlowLCM-grid=50,no-cfg]" and own.sigmas is None
    student = lcm_sampler(50, 10.0, "flow_prediction", 1.0, [1, 2, 4], schedule=usual.model.schedule)
    for k in (1, 2, 4):  # what a student of the 50-point grid is sampled at, hence its control row too
        assert pinned.pinned(k) == student.pinned(k)
    visited = []
    for cand in (own, pinned):
        scheduler = cand.scheduler()
        scheduler.set_timesteps(**(cand.pinned(2) or {"num_inference_steps": 2}))
        visited.append(scheduler.sigmas[:2].tolist())
    assert visited[0][1] < 0.01 < visited[1][1]  # own spacing: the second step sits at sigma_min and does nothing
    with pytest.raises(ConfigError, match="grid=N"):
        grid_sigmas(usual.model.schedule, "fifty", "FlowMatchLCMScheduler:grid=fifty@1")


def test_a_grid_baseline_refuses_more_steps_than_its_grid_before_any_work():
    from distill.errors import ConfigError
    from evals.settings import EvalSettings

    EvalSettings(teacher="t", out="o", steps=[1, 2, 4], baselines=["FlowMatchLCMScheduler:grid=4@1"]).check()
    with pytest.raises(ConfigError, match="grid of N = 4 sigmas and cannot take 8 steps"):
        EvalSettings(teacher="t", out="o", steps=[1, 8], baselines=["FlowMatchLCMScheduler:grid=4@1"]).check()
    with pytest.raises(ConfigError, match="grid=N takes a whole number"):
        EvalSettings(teacher="t", out="o", steps=[1], baselines=["FlowMatchLCMScheduler:grid=fifty@1"]).check()


def test_two_ways_of_sampling_share_a_key_only_when_they_draw_the_same_images(tiny_sd_v_path):
    from evals.baselines import control_candidate, sampling_key, sweep_candidates

    usual, _ = models.load_teacher(str(tiny_sd_v_path), "cpu", torch.float32, 3.0, None)
    lcm, lcm_cfg, ddim = sweep_candidates(usual.model, usual.source, ["LCMScheduler@1,2",
                                                                      "DDIMScheduler:timestep_spacing=trailing@1"])
    grid10 = models.teacher_candidate(usual.model, usual.source, "LCMScheduler", {"original_inference_steps": 10},
                                      1.0, "student", "an LCM student's sampler: a 10-point grid")
    control = control_candidate(usual.model, usual.source, grid10)
    assert sampling_key(control, 2) == sampling_key(lcm, 2)  # 999, 499 on both grids
    assert sampling_key(control, 4) != sampling_key(lcm, 4)  # 999, 799, 499, 299 against 999, 759, 499, 259
    assert sampling_key(lcm, 2) != sampling_key(lcm_cfg, 2) != sampling_key(ddim, 2)  # guidance, scheduler
    samples = [(models.decode(c, models.denoise(c, 2, models.encode(c, PROMPTS), models.initial_noise(c, g), g)))
               for c in (control, lcm) for g in [models.sample_generators(0, range(len(PROMPTS)))]]
    torch.testing.assert_close(samples[0], samples[1], atol=0, rtol=0)
