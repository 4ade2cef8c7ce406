"""The sampler-schedule search (distill.tune) and pinned timesteps in a student's sampler spec."""

import json

import pytest
import torch

from distill.errors import ConfigError
from distill.info import SamplerSpec, StudentInfo
from distill.schedule import FlowSchedule
from distill.tune import flow_grid_and_start, grid_and_start, line, search


def test_a_line_moves_one_point_between_its_neighbours_keeping_the_top():
    assert line((0, 2, 5, 7), 3, 10) == [(0, 2, 5, 6), (0, 2, 5, 7), (0, 2, 5, 8), (0, 2, 5, 9)]
    assert line((0, 2, 5, 7), 1, 10) == [(0, 1, 5, 7), (0, 2, 5, 7), (0, 3, 5, 7), (0, 4, 5, 7)]
    assert line((0, 1, 2), 2, 3) == [(0, 1, 2)]  # packed against its neighbour and the grid's end


def test_search_finds_the_best_schedule_and_scores_each_one_once():
    target = (0, 6, 8, 9)

    def score(s):
        return sum(abs(a - b) for a, b in zip(s, target))

    best, history = search(score, (0, 2, 5, 7), 10, max_evals=100)
    assert best == target
    assert history[0] == {"schedule": (0, 2, 5, 7), "score": 9.0}
    assert len({h["schedule"] for h in history}) == len(history)  # nothing scored twice
    few, history = search(score, (0, 2, 5, 7), 10, max_evals=5)
    assert len(history) == 5 and score(few) < 9


def test_search_stays_put_when_no_move_beats_the_margin():
    best, history = search(lambda s: 1.0 + 0.01 * s[1], (0, 3), 10, margin=0.5)
    assert best == (0, 3) and len(history) == 9  # the start and the 8 other positions of its one free point


def test_grid_and_start_are_lcm_schedulers_own():
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(original_inference_steps=10)
    grid, start = grid_and_start(scheduler, 10, 4)
    assert grid == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert [grid[i] for i in start] == [999, 799, 499, 299]  # what LCMScheduler visits at 4 steps


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_a_flow_students_grid_and_start_are_its_sigmas_and_its_default_spacing(shift):
    schedule = FlowSchedule(shift=shift)
    grid, start = flow_grid_and_start(schedule, 10, 4)
    torch.testing.assert_close(torch.tensor(grid), schedule.grid(10).flip(0), atol=1e-6, rtol=0)  # descending
    assert grid[0] == 1.0 and start[0] == 0 and len(set(start)) == 4
    torch.testing.assert_close(torch.tensor([grid[i] for i in start]), schedule.consistency_times(4, 10),
                               atol=1e-6, rtol=0)


def test_pinned_timesteps_are_what_set_timesteps_is_given():
    from diffusers import LCMScheduler

    spec = SamplerSpec("LCMScheduler", config={"original_inference_steps": 10}, timesteps={"4": [999, 399, 199, 99]})
    assert spec.pinned(4) == {"timesteps": [999, 399, 199, 99]} and spec.pinned(2) == {}
    scheduler = spec.build(LCMScheduler().config)
    scheduler.set_timesteps(**spec.pinned(4))
    assert scheduler.timesteps.tolist() == [999, 399, 199, 99]
    assert SamplerSpec("FlowMatchLCMScheduler", sigmas={"1": [1.0]}).pinned(1) == {"sigmas": [1.0]}


def test_tune_sampler_pins_a_schedule_that_eval_and_sample_then_visit(tiny_sd_path, tmp_path):
    from evals.models import load_student
    from tests.evals.students import lora_run

    from distill.tune import tune_source

    run = lora_run(tmp_path, tiny_sd_path)
    torch.manual_seed(0)
    found = tune_source(run, [4], num_samples=8, max_evals=4, num_reference=32, log=lambda *_: None)
    row = found["4"]
    assert row["default"] == [999, 759, 499, 259] and row["evaluations"] == 4  # LCMScheduler's 4 of N = 50
    assert row["kid_tuned"] <= row["kid_default"]
    saved = json.loads((run / "student" / "student.json").read_text())
    assert saved["details"]["tuned_timesteps"]["4"] == row
    info = StudentInfo.load(run / "student")
    expected = row["tuned"] if row["tuned"] != row["default"] else None
    assert (info.sampler.timesteps or {}).get("4") == expected
    info.sampler.timesteps = {"4": [999, 499, 199, 59]}  # a pin we know, to check who honours it
    info.save(run / "student")
    student = load_student(str(run), str(tiny_sd_path), "cpu", torch.float32, False, None)
    scheduler = student.scheduler()
    scheduler.set_timesteps(**student.pinned(4))
    assert scheduler.timesteps.tolist() == [999, 499, 199, 59]


def test_tune_sampler_refuses_the_judge_and_one_step(tiny_sd_path, tmp_path):
    from tests.evals.students import lora_run

    from distill.tune import tune_source

    run = lora_run(tmp_path, tiny_sd_path)
    with pytest.raises(ConfigError, match="judge"):
        tune_source(run, [4], feature_net="effnet-lite0")
    with pytest.raises(ConfigError, match="one step has nothing to choose"):
        tune_source(run, [1, 4])


def test_tune_sampler_pins_a_flow_students_sigmas_that_its_pipeline_then_visits(tiny_sd3_path, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tests.evals.students import flow_lora_run

    from distill.tune import tune_source

    teacher_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3_path, subfolder="scheduler")
    schedule = FlowSchedule.from_scheduler(teacher_scheduler)
    assert schedule.shift != 1  # so that the visited sigmas differ from the ones the spec stores
    run = flow_lora_run(tmp_path, tiny_sd3_path)
    default = StudentInfo.load(run / "student").sampler.sigmas["4"]
    found = tune_source(run, [4], num_samples=8, max_evals=4, num_reference=32, log=lambda *_: None)
    row = found["4"]
    assert row["default"] == pytest.approx(schedule.shifted(torch.tensor(default)).tolist(), abs=1e-6)
    assert row["evaluations"] == 4 and row["kid_tuned"] <= row["kid_default"] and row["tuned"][0] == 1.0
    info = StudentInfo.load(run / "student")
    assert info.details["tuned_timesteps"]["4"] == row
    scheduler = info.sampler.build(teacher_scheduler.config)  # the shipped FlowMatchLCMScheduler, the teacher's shift
    scheduler.set_timesteps(**info.sampler.pinned(4))
    torch.testing.assert_close(scheduler.sigmas[:-1], torch.tensor(row["tuned"]), atol=1e-5, rtol=0)


def test_tune_sampler_refuses_a_flow_student_without_a_consistency_grid(tiny_sd3_path, tmp_path):
    """An ADD / LADD student also samples with pinned sigmas, but it was trained on its own few, not on a grid."""
    from tests.evals.students import flow_lora_run

    from distill.tune import tune_source

    run = flow_lora_run(tmp_path, tiny_sd3_path)
    info = StudentInfo.load(run / "student")
    info.method, info.details = "add", {}
    info.save(run / "student")
    with pytest.raises(ConfigError, match=r"FlowMatchLCMScheduler student \(add\).*pass an LCM run folder"):
        tune_source(run, [4])


def test_tune_samples_as_the_teacher_conditions_an_sd3_without_t5(tiny_sd3_path):
    """Without T5, the emoji SD3 was trained on CLIP's 77 token states; a plain pipeline call pads to 256 unless told,
    and the transformer attends over every padded token: tune-sampler once scored such off-distribution images."""
    from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline

    from distill.tune import pipeline_images

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)
    pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
    pin = {"sigmas": [1.0, 0.5]}
    got = pipeline_images(pipe, ["dog face", "banana"], pin, 1.0, seed=3)

    def plain(**extra):
        torch.manual_seed(3)
        return pipe(["dog face", "banana"], num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                    generator=torch.Generator().manual_seed(3), **pin, **extra).images * 2 - 1

    torch.testing.assert_close(got, plain(max_sequence_length=77))
    assert (got - plain()).abs().max() > 1e-3  # the padding the pipeline defaults to changes the images
