"""recipes/lcm.py end to end on the tiny pipelines, and the engine plumbing it runs on.

Runs use 8 emoji resized to 16 px (the tiny VAE's 8x8 latents), batches of 4 and a few steps each.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from distill.config import from_dict, load_config
from distill.errors import ConfigError
from distill.export import export_run
from distill.runs import list_checkpoints, read_state
from distill.info import LORA_WEIGHTS
from distill.teacher import Teacher
from recipes import lcm
from recipes.lcm import LcmConfig, main

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "recipes" / "configs" / "lcm").glob("*.yaml"))


def _cfg(tmp_path, teacher, kind, **over) -> LcmConfig:
    data = dict(
        recipe="lcm", run_name=f"t-{kind}", teacher=str(teacher), output_dir=str(tmp_path / "runs"),
        max_train_steps=4, train_batch_size=4, learning_rate=1e-4, checkpointing_steps=2,
        data=dict(source="emoji:32", resolution=16, max_samples=8),
        student=dict(kind=kind, lora_rank=4, time_cond_proj_dim=32),
        lcd=dict(w_min=1.0, w_max=3.0), optim=dict(lr_warmup_steps=0),
        sample=dict(prompts=["dog face", "banana"], steps=[1, 2], every_steps=2, teacher_steps=None),
    )
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(LcmConfig, data)


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def _generate(pipe, steps=2, guidance_scale=1.0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(["dog face"], num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


# ------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_every_setting_has_a_comment(path):
    cfg = load_config(path, LcmConfig, ["max_train_steps=7"])
    assert cfg.recipe == "lcm" and cfg.run_name == f"lcm-{path.stem}" and cfg.max_train_steps == 7
    assert cfg.student.kind == ("lora" if path.stem.endswith("lora") else "full")
    assert 0 <= cfg.lcd.w_min <= cfg.lcd.w_max
    assert cfg.resume_from_checkpoint is None  # a new run unless the user asks to go on with one
    flow = path.stem in ("sd35_lora", "flux_lora")  # 42 flow intervals: the 1/2/4/8-step sampler on the grid
    assert cfg.lcd.num_ddim_timesteps == (10 if path.stem.startswith("emoji") else 43 if flow else 50)  # LCM: 50
    if "sd3" in path.stem or flow:
        assert cfg.student.time_cond_proj_dim is None  # a transformer student has no guidance input
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"^\s*[A-Za-z_]+:\s*\S", line):  # a key with a value (section headers have none)
            assert "#" in line, f"{path.name}:{number} has no comment: {line.strip()}"
    assert {p.stem for p in CONFIGS} == {"emoji_sd", "emoji_sd_lora", "emoji_sd3_lora", "sd15", "sd15_lora",
                                         "sdxl_lora", "sd35_lora", "flux_lora"}


# ---------------------------------------------------------------------------------------------- runs
def test_full_run_on_tiny_sd_v_exports_a_pipeline(tiny_sd_v_path, tmp_path):
    run = main(_cfg(tmp_path, tiny_sd_v_path, "full", gradient_accumulation_steps=2))
    report = _report(run)
    assert report["steps"] == 4 and math.isfinite(report["loss_last_50"])  # 4 optimizer steps of 2 micro-batches
    # Throughput and memory for the table: 2 micro-batches of 4 per step; the teacher alone is ~MBs.
    assert report["samples_per_second"] == pytest.approx(8 * report["steps_per_second"], rel=0.02, abs=0.05)
    assert report["peak_memory_kind"] == "process_peak_rss" and report["peak_memory_mb"] > 100
    # the loss of each interval, named by its start timestep on the solver's grid (N = 50 of T = 1000: 19, 39, ...)
    intervals = [k for k in report["losses"] if k.startswith("interval/t")]
    assert intervals and all(int(k.removeprefix("interval/t")) % 20 == 19 for k in intervals)
    assert all(math.isfinite(report["losses"][k]["first_50"]) for k in intervals)
    assert (run / "student" / "unet" / "config.json").is_file() and (run / "config.yaml").is_file()
    assert [c.name for c in list_checkpoints(run)] == ["step-0000002", "step-0000004"]
    checkpoint = run / "checkpoints" / "step-0000004"  # every named module, and the student that ships
    for folder in ("modules/student/unet", "modules/target/unet", "student/unet"):
        assert (checkpoint / folder / "config.json").is_file(), folder
    assert {p.name for p in (run / "samples").iterdir()} == {"step-0000002.png", "step-0000004.png", "final.png"}
    assert any((run / "logs").rglob("events.out.tfevents*"))  # tensorboard
    info = json.loads((run / "student" / "student.json").read_text())
    assert info["kind"] == "full" and info["sampler"]["guidance_scale"] == 3.0 and info["prediction_type"] == "v_prediction"
    assert info["sampler"]["scheduler"] == "LCMScheduler" and info["sampler"]["config"]["original_inference_steps"] == 50

    pipe = DiffusionPipeline.from_pretrained(str(export_run(run, tmp_path / "export")))
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 32
    assert torch.isfinite(_generate(pipe, guidance_scale=3.0)).all()


@pytest.mark.parametrize("fixture, pipeline_cls", [("tiny_sd_path", StableDiffusionPipeline),
                                                   ("tiny_sdxl_path", StableDiffusionXLPipeline)])
def test_lora_run_exports_adapters_that_diffusers_loads(request, tmp_path, fixture, pipeline_cls):
    teacher_path = request.getfixturevalue(fixture)
    cache = fixture == "tiny_sd_path"  # SDXL goes through the per-batch encoding path (DataLoader)
    run = main(_cfg(tmp_path, teacher_path, "lora", data=dict(cache=cache),
                    sample=dict(every_steps=0, teacher_steps=2)))
    assert math.isfinite(_report(run)["loss_last_50"])
    assert (run / "samples" / "final.png").is_file()
    out = export_run(run, tmp_path / "export")
    with safe_open(str(out / LORA_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all("lora" in k for k in keys)
    weights = load_file(str(out / LORA_WEIGHTS))
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # the training moved the adapters
    pipe = pipeline_cls.from_pretrained(str(teacher_path))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(out))
    assert torch.isfinite(_generate(pipe)).all()


def test_resume_continues_the_step_count_and_repeats_the_uninterrupted_run(tiny_sd_path, tmp_path):
    first = main(_cfg(tmp_path, tiny_sd_path, "full", sample=dict(every_steps=0)))
    resumed = main(_cfg(tmp_path, tiny_sd_path, "full", max_train_steps=6, resume_from_checkpoint="latest",
                        allow_config_change=True, sample=dict(every_steps=0)))  # a longer budget, said explicitly
    assert resumed == first  # same run folder
    assert _report(resumed)["steps"] == 6 and _report(resumed)["steps_this_session"] == 2
    assert read_state(list_checkpoints(resumed)[-1])["step"] == 6
    straight = main(_cfg(tmp_path / "other", tiny_sd_path, "full", max_train_steps=6, sample=dict(every_steps=0)))
    for name in ("target", "student"):  # the EMA target and the online student, with optimizer state restored
        weights = f"step-0000006/modules/{name}/unet/diffusion_pytorch_model.safetensors"
        a, b = (load_file(str(run / "checkpoints" / weights)) for run in (resumed, straight))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)  # bit for bit on CPU


def test_lora_resume_loads_the_adapters(tiny_sd_path, tmp_path):
    first = main(_cfg(tmp_path, tiny_sd_path, "lora", max_train_steps=2, sample=dict(every_steps=0)))
    before = load_file(str(first / "student" / LORA_WEIGHTS))
    resumed = main(_cfg(tmp_path, tiny_sd_path, "lora", max_train_steps=2, resume_from_checkpoint=str(first),
                        sample=dict(every_steps=0)))
    assert resumed == first and _report(resumed)["steps_this_session"] == 0  # nothing left to do
    after = load_file(str(resumed / "student" / LORA_WEIGHTS))
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


def test_lora_with_adapter_ema_resumes_both_weight_sets_and_ships_the_average(tiny_sd_path, tmp_path):
    lora = dict(lora_rank=4, ema_decay=0.5)
    first = main(_cfg(tmp_path, tiny_sd_path, "lora", student=lora, sample=dict(every_steps=0)))
    resumed = main(_cfg(tmp_path, tiny_sd_path, "lora", student=lora, max_train_steps=6,
                        resume_from_checkpoint="latest", allow_config_change=True, sample=dict(every_steps=0)))
    straight = main(_cfg(tmp_path / "other", tiny_sd_path, "lora", student=lora, max_train_steps=6,
                         sample=dict(every_steps=0)))
    assert resumed == first and _report(resumed)["steps_this_session"] == 2
    for name in (f"student/{LORA_WEIGHTS}", f"modules/student/{LORA_WEIGHTS}", "modules/ema/model.safetensors"):
        a = load_file(str(resumed / "checkpoints" / "step-0000006" / name))  # the average (shipped), the online
        b = load_file(str(straight / "checkpoints" / "step-0000006" / name))  # adapters and the EMA's own state
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    shipped = load_file(str(straight / "student" / LORA_WEIGHTS))
    online = load_file(str(straight / "checkpoints" / "step-0000006" / "modules" / "student" / LORA_WEIGHTS))
    assert any(not torch.equal(shipped[k], online[k]) for k in shipped)  # the average, not the last step
    assert not (straight / "student" / "online").exists()  # the final student is only what ships


def test_resuming_a_checkpoint_of_another_student_is_a_config_error(tiny_sd_path, tiny_sd_bert_path, tmp_path):
    run = main(_cfg(tmp_path, tiny_sd_path, "lora", max_train_steps=1, sample=dict(every_steps=0)))
    config = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"different training settings .*teacher: "):  # the engine's refusal
        main(_cfg(tmp_path, tiny_sd_bert_path, "lora", resume_from_checkpoint="latest", sample=dict(every_steps=0)))
    # allowed explicitly, a change the checkpoint cannot take is still refused, by the recipe, naming it
    forced = dict(resume_from_checkpoint="latest", allow_config_change=True, sample=dict(every_steps=0))
    with pytest.raises(ConfigError, match="student of"):
        main(_cfg(tmp_path, tiny_sd_bert_path, "lora", **forced))
    assert (run / "config.yaml").read_text() == config  # the failed resume left the run as it was
    with pytest.raises(ConfigError, match="num_ddim_timesteps=50"):
        main(_cfg(tmp_path, tiny_sd_path, "lora", lcd=dict(num_ddim_timesteps=10), **forced))
    with pytest.raises(ConfigError, match="with an EMA of the adapters"):
        main(_cfg(tmp_path, tiny_sd_path, "lora", student=dict(ema_decay=None), **forced))
    with pytest.raises(ConfigError, match="lora_rank"):
        main(_cfg(tmp_path, tiny_sd_path, "lora", student=dict(lora_rank=8), **forced))


def test_time_budget_ends_the_run_cleanly(tiny_sd_path, tmp_path):
    run = main(_cfg(tmp_path, tiny_sd_path, "lora", max_train_steps=10_000, max_train_minutes=0.02,
                    checkpointing_steps=0, sample=dict(every_steps=0)))
    steps = _report(run)["steps"]
    assert 0 < steps < 10_000
    assert read_state(list_checkpoints(run)[-1])["step"] == steps  # a final checkpoint
    assert (run / "student" / LORA_WEIGHTS).is_file()


def test_loss_goes_down_on_the_bert_teacher(tiny_sd_bert_path, tmp_path):
    """A smoke check that the gradient points the right way: 60 steps, lr 1e-3, on 8 cached emoji.

    The per-step loss depends strongly on the intervals drawn, so compare the mean of the first and last
    three tenths of the run (measured: 0.28 -> 0.10); 0.6 leaves room for other CPUs' float rounding.
    """
    run = main(_cfg(tmp_path, tiny_sd_bert_path, "full", max_train_steps=60, train_batch_size=8,
                    learning_rate=1e-3, checkpointing_steps=0, sample=dict(every_steps=0)))
    tenths = _report(run)["loss_by_tenth"]
    assert sum(tenths[-3:]) < 0.6 * sum(tenths[:3])


EMOJI_TEACHER = Path(__file__).resolve().parents[2] / "checkpoints" / "emoji-sd"


def test_loss_goes_down_on_the_emoji_teacher(tmp_path):
    """LCM-LoRA on the embedded teacher with N = 1 interval (t = 999 -> 0): the target is then the teacher's
    guided DDIM step to t = 0, where f = z (no target network), so the loss is a plain regression onto the
    guided teacher and must fall (measured: first three tenths 0.94 on average, last three 0.73, ratio 0.79).
    With N = 50 the loss may rise at first instead: the targets sharpen as the student learns.
    """
    run = main(_cfg(tmp_path, EMOJI_TEACHER, "lora", max_train_steps=80, train_batch_size=8, learning_rate=3e-3,
                    checkpointing_steps=0, data=dict(resolution=32, max_samples=8),
                    student=dict(lora_rank=8), lcd=dict(num_ddim_timesteps=1, w_min=2.0, w_max=2.0),
                    sample=dict(every_steps=0, steps=[1])))
    tenths = _report(run)["loss_by_tenth"]
    assert sum(tenths[-3:]) < 0.85 * sum(tenths[:3]), tenths


def test_recipe_refuses_configs_it_cannot_run(tiny_sd_path, tiny_unet2d_path, tmp_path):
    teacher = Teacher.from_pretrained(tiny_sd_path)
    with pytest.raises(ConfigError, match="w_min"):
        lcm.check(_cfg(tmp_path, tiny_sd_path, "full", lcd=dict(w_min=3.0, w_max=1.0)), teacher)
    with pytest.raises(ConfigError, match="sample.steps"):
        lcm.check(_cfg(tmp_path, tiny_sd_path, "full", sample=dict(steps=[80])), teacher)
    with pytest.raises(ConfigError, match="SD, SDXL, SD3 or FLUX"):
        lcm.check(_cfg(tmp_path, tiny_unet2d_path, "full"), Teacher.from_pretrained(tiny_unet2d_path))
    with pytest.raises(ConfigError, match="needs student.ema_decay"):
        lcm.check(_cfg(tmp_path, tiny_sd_path, "full", student=dict(ema_decay=None)), teacher)
    with pytest.raises(ConfigError, match=r"ema_decay=1.0 must be in \[0, 1\)"):
        lcm.check(_cfg(tmp_path, tiny_sd_path, "lora", student=dict(ema_decay=1.0)), teacher)
    lcm.check(_cfg(tmp_path, tiny_sd_path, "lora", student=dict(ema_decay=None)), teacher)  # LCM-LoRA's own target


def test_a_pinned_sampler_schedule_ships_in_student_json_and_bad_pins_are_refused(tiny_sd_path, tmp_path):
    from distill.consistency import DDIMSolver
    from distill.info import StudentInfo

    teacher = Teacher.from_pretrained(tiny_sd_path)
    grid = [int(t) for t in DDIMSolver(teacher.schedule, 10).timesteps.tolist()]  # t_{n+k}: 99 ... 999 on T = 1000
    for pin, words in [({2: [grid[-1]]}, "maps a step count"), ({2: [grid[0], grid[-1]]}, "must descend"),
                       ({2: [grid[-1], grid[4] + 1]}, "points of the student's grid")]:
        with pytest.raises(ConfigError, match=words):
            lcm.check(_cfg(tmp_path, tiny_sd_path, "lora", lcd=dict(num_ddim_timesteps=10),
                           sample=dict(timesteps=pin)), teacher)
    pinned = [grid[-1], grid[1]]  # 999, 199: not LCMScheduler's own 2-step 999, 499
    three = [grid[-1], grid[4], grid[0]]  # a step count outside the default 1/2/4/8 still ships
    run = main(_cfg(tmp_path, tiny_sd_path, "lora", lcd=dict(num_ddim_timesteps=10),
                    sample=dict(timesteps={2: pinned, 3: three}, every_steps=0, teacher_steps=None)))
    sampler = StudentInfo.load(run / "student").sampler
    assert sampler.timesteps == {"2": pinned, "3": three} and sampler.pinned(2) == {"timesteps": pinned}
    assert 3 in sampler.steps
    assert sampler.pinned(1) == {}  # step counts it does not name keep the scheduler's own spacing
