"""recipes/lcm.py on a flow-matching teacher (the tiny SD3): the Euler solver on the flow ODE, f = the network's own
x0 (no boundary scalings), FlowMatchLCMScheduler as the sampler, and students that plain diffusers loads."""

import json

import torch
from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline

from distill.config import from_dict
from distill.consistency import lcm_sampler
from distill.info import LORA_WEIGHTS, StudentInfo
from distill.sampling import lcm_sample, load_student_pipeline
from distill.student import LoraStudent
from distill.teacher import Teacher
from recipes.lcm import LcmConfig, main

SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


def _cfg(tmp_path, teacher, kind, **over) -> LcmConfig:
    data = dict(
        recipe="lcm", run_name=f"flow-{kind}", teacher=str(teacher), output_dir=str(tmp_path / "runs"),
        max_train_steps=3, train_batch_size=4, learning_rate=1e-3, checkpointing_steps=2, report_to="none",
        data=dict(source="emoji:32", resolution=16, max_samples=8),
        student=dict(kind=kind, lora_rank=4, time_cond_proj_dim=None, lora_target_modules=SD3_TARGETS),
        lcd=dict(w_min=2.0, w_max=2.0, num_ddim_timesteps=10), optim=dict(lr_warmup_steps=0),
        sample=dict(prompts=["dog face"], steps=[1, 2], every_steps=0, teacher_steps=None),
    )
    data.update(over)
    return from_dict(LcmConfig, data)


def test_a_flow_students_pinned_sigmas_lie_on_its_grid_and_the_pipeline_visits_them(tiny_sd3_path):
    schedule = Teacher.from_pretrained(tiny_sd3_path).schedule
    grid = schedule.grid(10)
    spec = lcm_sampler(10, 10.0, "flow_prediction", 1.0, schedule=schedule)
    assert spec.steps == [1, 2, 4, 8] and set(spec.sigmas) == {"1", "2", "4", "8"}
    for steps in (1, 2, 4, 8):
        times = schedule.consistency_times(steps, 10)
        assert torch.isclose(times[:, None], grid[None]).any(1).all()  # every sampling sigma was trained on
        assert times[-1] > grid[0] + 0.05  # no step wasted at sigma_min (FlowMatchLCMScheduler's own last sigma)
        scheduler = FlowMatchLCMScheduler(shift=schedule.shift)
        scheduler.set_timesteps(**spec.pinned(steps))
        torch.testing.assert_close(scheduler.sigmas[:-1], times, atol=1e-5, rtol=0)
    own = FlowMatchLCMScheduler(shift=schedule.shift)
    own.set_timesteps(2)
    assert own.sigmas[1] < 0.01  # why the sigmas are pinned: its own 2 steps end at sigma_min, a step that does nothing


def test_lora_run_on_a_flow_teacher_ships_a_lora_sd3_loads_and_samples_as_the_toolkit_does(tiny_sd3_path, tmp_path):
    run = main(_cfg(tmp_path, tiny_sd3_path, "lora"))
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 3 and all(torch.isfinite(torch.tensor(v["first_50"])) for v in report["losses"].values())
    # interval names are the transformer's timesteps (1000 sigma) of the N = 10 flow grid
    assert sorted(int(k.removeprefix("interval/t")) for k in report["losses"] if k.startswith("interval/t"))[-1] == 1000
    info = StudentInfo.load(run / "student")
    assert info.sampler.scheduler == "FlowMatchLCMScheduler" and info.network == "transformer"
    pipe, info = load_student_pipeline(run, device="cpu")  # plain diffusers: load_lora_weights + the spec's scheduler
    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.scheduler, FlowMatchLCMScheduler)
    # One step: SD3's pipeline draws the re-noising of later steps from torch's global generator, not the one given.
    got = pipe(["dog face"], num_inference_steps=1, guidance_scale=1.0, height=16, width=16, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    # the toolkit's sampler from the same weights: the same latents from the same seed
    teacher = Teacher.from_pretrained(tiny_sd3_path)
    student = LoraStudent(teacher, 4, target_modules=SD3_TARGETS)
    student.load_checkpoint(run / "student")
    assert (run / "student" / LORA_WEIGHTS).is_file()
    decoded = []
    teacher.decode_latents = lambda z: decoded.append(z) or z  # keep the latents the sampler ends with
    lcm_sample(student, teacher, teacher.encode_prompt(["dog face"], 16), 1, torch.Generator().manual_seed(0),
               resolution=16)
    torch.testing.assert_close(decoded[0], got, atol=1e-4, rtol=1e-4)


def test_full_run_on_a_flow_teacher_writes_a_transformer_student(tiny_sd3_path, tmp_path):
    run = main(_cfg(tmp_path, tiny_sd3_path, "full"))
    assert (run / "student" / "transformer" / "config.json").is_file()
    pipe, _ = load_student_pipeline(run, device="cpu")
    out = pipe(["banana"], num_inference_steps=1, guidance_scale=1.0, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(out)).all()


def test_flow_student_settings_a_flow_teacher_cannot_take_are_refused(tiny_sd3_path, tmp_path):
    import pytest

    from distill.errors import ConfigError
    from recipes import lcm

    teacher = Teacher.from_pretrained(tiny_sd3_path)
    assert lcm.nested(teacher.schedule, 10, 46) and not lcm.nested(teacher.schedule, 10, 50)  # 45 = 5 x 9 intervals
    with pytest.raises(ConfigError, match="time_cond_proj_dim=null"):
        lcm.check(_cfg(tmp_path, tiny_sd3_path, "full", student=dict(kind="full", time_cond_proj_dim=256)), teacher)
    with pytest.raises(ConfigError, match="anchor_solve_steps=50 does not put .* use e.g. 55"):
        lcm.check(_cfg(tmp_path, tiny_sd3_path, "lora", lcd=dict(w_min=2.0, w_max=2.0, num_ddim_timesteps=10,
                                                                  anchor_weight=1.0, anchor_solve_steps=50)), teacher)
    with pytest.raises(ConfigError, match=r"sample.timesteps\[2\] = \[999, 499\] must descend through points of the "
                                          r"student's grid \[9, .*, 1000\]"):  # the transformer's timesteps (shift 3)
        lcm.check(_cfg(tmp_path, tiny_sd3_path, "lora", sample=dict(timesteps={2: [999, 499]})), teacher)


def test_a_flow_students_pinned_timesteps_ship_as_the_grids_own_sigmas(tiny_sd3_path, tmp_path):
    schedule = Teacher.from_pretrained(tiny_sd3_path).schedule
    grid = schedule.grid(10).flip(0)  # descending sigmas, after the teacher's shift
    named = (grid * 1000).round().long().tolist()
    pin = [named[0], named[5], named[8]]
    run = main(_cfg(tmp_path, tiny_sd3_path, "lora", max_train_steps=1,
                    sample=dict(prompts=["dog face"], steps=[1, 3], every_steps=0, teacher_steps=None,
                                timesteps={3: pin})))
    sampler = StudentInfo.load(run / "student").sampler
    assert sampler.steps == [1, 2, 3, 4, 8] and sampler.timesteps is None
    scheduler = FlowMatchLCMScheduler(shift=schedule.shift)
    scheduler.set_timesteps(**sampler.pinned(3))  # the pipeline shifts the sigmas it gets: it visits the grid's own
    torch.testing.assert_close(scheduler.sigmas[:-1], grid[[0, 5, 8]], atol=1e-5, rtol=0)
    scheduler.set_timesteps(**sampler.pinned(4))  # counts not pinned keep the even spacing
    torch.testing.assert_close(scheduler.sigmas[:-1], schedule.consistency_times(4, 10), atol=1e-5, rtol=0)


def test_ladd_on_a_flow_teacher_reads_its_token_maps_and_ships_its_own_sigmas(tiny_sd3_path, tmp_path):
    """LADD's student on the tiny SD3: student times in the transformer's units, heads on the teacher's image-token
    maps; the student samples at its own sigmas, through plain diffusers as through the toolkit."""
    from diffusers import FlowMatchLCMScheduler

    from distill.config import from_dict
    from recipes.add import AddRecipeConfig
    from recipes.add import main as add_main

    cfg = from_dict(AddRecipeConfig, dict(
        recipe="add", run_name="flow-ladd", teacher=str(tiny_sd3_path), output_dir=str(tmp_path / "runs"),
        max_train_steps=2, train_batch_size=2, checkpointing_steps=2, report_to="none",
        data=dict(source="emoji:32", resolution=16, max_samples=4),
        student=dict(kind="lora", lora_rank=4, lora_target_modules=SD3_TARGETS),
        add=dict(variant="ladd", student_timesteps=[1000, 750, 500, 250], teacher_guidance_scale=2.0),
        sample=dict(prompts=["banana"], steps=[1, 2, 4], every_steps=0, teacher_steps=None)))
    run = add_main(cfg)
    info = StudentInfo.load(run / "student")
    assert info.sampler.scheduler == "FlowMatchLCMScheduler" and info.method == "ladd"
    assert list(info.sampler.sigmas) == ["1", "2", "4"] and info.sampler.sigmas["1"] == [1.0]  # before the shift
    info.sampler.check_steps([1, 2, 4], "the student")
    import pytest

    from distill.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot take 3 steps: .* pinned for 1, 2, 4 steps only; ask for those"):
        info.sampler.check_steps([3], "the student")  # fewer than its most steps, but not one it was made for
    pipe, info = load_student_pipeline(run, device="cpu")
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler)
    for steps, sigmas in {"2": [1.0, 0.5], "4": [1.0, 0.75, 0.5, 0.25]}.items():  # what the scheduler then visits
        pipe.scheduler.set_timesteps(sigmas=info.sampler.sigmas[steps])
        torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor(sigmas + [0.0]), atol=1e-5, rtol=0)
    assert (run / "samples" / "final.png").is_file()  # the plain-diffusers grid at the student's sigmas


def test_lora_run_on_a_flux_teacher_feeds_guidance_as_its_input_and_ships_a_lora_flux_loads(tiny_flux_path, tmp_path):
    from diffusers import FluxPipeline

    targets = SD3_TARGETS + ["proj_mlp", "proj_out"]
    run = main(_cfg(tmp_path, tiny_flux_path, "lora", student=dict(kind="lora", lora_rank=4, time_cond_proj_dim=None,
                                                                   lora_target_modules=targets),
                    sample=dict(prompts=["dog face"], steps=[1, 2], every_steps=0, teacher_steps=None,
                                guidance_scale=3.0)))
    info = StudentInfo.load(run / "student")
    assert info.sampler.scheduler == "FlowMatchLCMScheduler" and info.guidance_scale == 3.0
    pipe, _ = load_student_pipeline(run, device="cpu")
    assert isinstance(pipe, FluxPipeline) and any("lora" in n for n, _ in pipe.transformer.named_parameters())
    out = pipe(["dog face"], num_inference_steps=2, guidance_scale=3.0, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(out)).all()


def test_a_flow_students_export_card_loads_and_calls_it_as_its_sampler_needs(tiny_sd3_path, tmp_path):
    """The model card's code for an ADD-style flow student: the FlowMatchLCMScheduler, its pinned sigmas, and what
    the teacher's pipeline call needs (max_sequence_length)."""
    from distill.consistency import lcm_sampler
    from distill.export import model_card

    teacher = Teacher.from_pretrained(tiny_sd3_path)
    times = {k: teacher.schedule.from_model_time(torch.tensor(t)) for k, t in {1: [1000], 2: [1000, 500]}.items()}
    info = StudentInfo(kind="lora", teacher=str(tiny_sd3_path), teacher_kind="sd3",
                       pipeline_class="StableDiffusion3Pipeline", prediction_type="flow_prediction",
                       sampler=lcm_sampler(2, 10.0, "flow_prediction", 1.0, [1, 2], teacher.schedule, times),
                       teacher_guidance_scale=3.0, method="ladd", pipeline_kwargs=teacher.family.call_kwargs())
    card = model_card(info, tmp_path)
    assert "FlowMatchLCMScheduler.from_config(pipe.scheduler.config)" in card
    assert "max_sequence_length=256" in card and "sigmas=[1.0, 0.25]" in card  # 0.5 after the tiny SD3's shift 3
