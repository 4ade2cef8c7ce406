"""Hybrid cascades: the spec parser, and student-draft -> re-noise -> teacher refine as diffusers' img2img does it."""

from types import SimpleNamespace

import pytest
import torch

from distill.errors import ConfigError
from evals import models
from tests.evals.students import full_export
from evals.cascade import CascadeCandidate, CascadeCond, CascadeSpec, parse_cascade, refine_timesteps

PROMPTS = ["grinning face", "red heart", "dog face"]


# ------------------------------------------------------------------------------------------------ parser
@pytest.mark.parametrize("text, spec", [
    ("runs/lcm@4+teacher@2:0.5", CascadeSpec("runs/lcm", 4, 2, 0.5, None)),
    ("runs/lcm@1+teacher@3:1:7.5", CascadeSpec("runs/lcm", 1, 3, 1.0, 7.5)),
    ("exports/a@b+c@2+teacher@1:0", CascadeSpec("exports/a@b+c", 2, 1, 0.0, None)),  # '@', '+' in the path
    (" s@8+teacher@10:.25:1 ", CascadeSpec("s", 8, 10, 0.25, 1.0)),
])
def test_parse_good_specs(text, spec):
    parsed = parse_cascade(text)
    assert parsed == spec
    assert parse_cascade(str(parsed)) == parsed  # the canonical string round-trips


@pytest.mark.parametrize("text, words", [
    ("runs/lcm@4", "not of the form"),
    ("runs/lcm@4+teacher@2", "not of the form"),
    ("runs/lcm@4+student@2:0.5", "not of the form"),
    ("@4+teacher@2:0.5", "not of the form"),
    ("runs/lcm@4+teacher@2:0.5:7:1", "not of the form"),
    ("runs/lcm@x+teacher@2:0.5", "student steps k"),
    ("runs/lcm@0+teacher@2:0.5", "student steps k"),
    ("runs/lcm@4+teacher@0:0.5", "teacher steps m"),
    ("runs/lcm@4+teacher@2.5:0.5", "teacher steps m"),
    ("runs/lcm@4+teacher@2:abc", "strength s"),
    ("runs/lcm@4+teacher@2:nan", "strength s"),
    ("runs/lcm@4+teacher@2:1.5", "outside [0, 1]"),
    ("runs/lcm@4+teacher@2:-0.1", "outside [0, 1]"),
    ("runs/lcm@4+teacher@2:0.5:", "guidance g"),
    ("runs/lcm@4+teacher@2:0.5:inf", "guidance g"),
    ("runs/lcm@4+teacher@2:0.5:0.5", "below 1"),
])
def test_parse_bad_specs_name_the_expected_form(text, words):
    with pytest.raises(ConfigError) as err:
        parse_cascade(text)
    message = str(err.value)
    assert words in message and "STUDENT@k+teacher@m:s" in message
    assert "\n" not in message and message.endswith(".")


# ------------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def loaded(tiny_sd_v_path, tmp_path_factory):
    """(student, the teacher's few-step baseline at CFG 3) on the tiny v-prediction SD."""
    full = full_export(tmp_path_factory.mktemp("cascade"), tiny_sd_v_path)
    student = models.load_student(str(full), str(tiny_sd_v_path), "cpu", torch.float32)
    _, baseline = models.load_teacher(str(tiny_sd_v_path), "cpu", torch.float32, 3.0, None)
    return student, baseline


def _cascade(loaded, k, m, s, g=None):
    student, baseline = loaded
    return CascadeCandidate.build(CascadeSpec(student.source, k, m, s, g), student, baseline)


def _run(cand, steps, indices=range(len(PROMPTS)), seed=5):
    gens = models.sample_generators(seed, indices)
    prompts = [PROMPTS[i] for i in indices]
    return cand.denoise(steps, cand.encode(prompts), models.initial_noise(cand, gens), gens) if isinstance(
        cand, CascadeCandidate) else models.denoise(cand, steps, models.encode(cand, prompts),
                                                    models.initial_noise(cand, gens), gens)


def test_strength_zero_is_the_student_alone_exactly(loaded):
    student, _ = loaded
    cascade = _cascade(loaded, 2, 3, 0.0)
    z = _run(cascade, 2)
    assert torch.equal(z, _run(student, 2))
    assert torch.equal(models.decode(cascade, z), models.decode(student, z))  # the teacher's VAE is the student's
    assert cascade.nfe(2) == student.nfe(2) == 2 and not cascade.cfg


@pytest.mark.parametrize("m, s", [(2, 0.5), (2, 1.0)])
def test_cascade_is_img2img_on_the_students_draft(loaded, tiny_sd_v_path, m, s):
    """The teacher's img2img pipeline (DDIM trailing, CFG 4), fed the student's draft latents and the generators
    as the student leaves them, gives the cascade's latents: same timesteps, re-noising, noise order and CFG."""
    from diffusers import StableDiffusionImg2ImgPipeline

    student, _ = loaded
    cascade = _cascade(loaded, 3, m, s, 4.0)
    assert cascade.guidance_scale == cascade.teacher.guidance_scale == 4.0 and cascade.cfg
    gens = models.sample_generators(5, range(len(PROMPTS)))
    draft = models.denoise(student, 3, models.encode(student, PROMPTS), models.initial_noise(student, gens), gens)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_sd_v_path))
    pipe.scheduler = cascade.teacher.scheduler()
    pipe.set_progress_bar_config(disable=True)
    n = cascade.spec.schedule_steps
    assert int(n * s) == m  # here the pipeline's strength runs exactly m steps
    expected = pipe(PROMPTS, image=draft, strength=s, num_inference_steps=n, guidance_scale=4.0, generator=gens,
                    output_type="latent").images
    ours = _run(cascade, 3)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert (ours - draft).abs().max() > 1e-2  # the refine really changed the draft


def test_distance_from_the_draft_grows_with_strength(loaded):
    draft = _run(loaded[0], 2)
    distance = [(_run(_cascade(loaded, 2, 2, s), 2) - draft).pow(2).mean().sqrt().item() for s in (0.25, 0.5, 1.0)]
    assert 0 < distance[0] < distance[1] < distance[2], distance


def test_each_sample_is_the_same_alone_or_in_a_batch(loaded):
    """The LCM student draws noise at every step and the re-noising draws after it, all from the sample's stream."""
    cascade = _cascade(loaded, 3, 2, 0.5)
    batch = _run(cascade, 3)
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(_run(cascade, 3, [i]), batch[i:i + 1], atol=1e-5, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-2


@pytest.mark.parametrize("m, s", [(1, 1.0), (2, 0.5), (3, 0.75), (2, 0.25), (4, 0.4), (3, 0.6), (1, 0.3), (2, 0.3)])
def test_refine_runs_the_last_m_of_round_m_over_s_timesteps_as_img2img(loaded, m, s):
    from diffusers import StableDiffusionImg2ImgPipeline

    teacher = _cascade(loaded, 1, m, s).teacher
    ours = refine_timesteps(CascadeSpec("x", 1, m, s), teacher.scheduler())
    n = round(m / s)
    assert _cascade(loaded, 1, m, s).spec.schedule_steps == n  # (2, 0.3): N = 7, not int(6.67) = 6
    full = teacher.scheduler()
    full.set_timesteps(n)
    assert len(ours) == m and torch.equal(ours, full.timesteps[-m:])
    if int(n * s) == m:  # (1, 0.3): img2img would run int(3 * 0.3) = 0 steps; the cascade runs the m asked for
        piped = SimpleNamespace(scheduler=teacher.scheduler())
        piped.scheduler.set_timesteps(n)
        timesteps, count = StableDiffusionImg2ImgPipeline.get_timesteps(piped, n, s, "cpu")
        assert count == m and torch.equal(ours, timesteps)
    if s == 1.0:
        assert ours[0] == teacher.scheduler().config.num_train_timesteps - 1  # trailing: the draft is fully re-noised


def test_nfe_label_and_what_the_report_sees(loaded):
    student, baseline = loaded
    cascade = _cascade(loaded, 4, 2, 0.5)
    assert cascade.nfe(4) == student.nfe(4) + 2 * 2 == 8  # the teacher's CFG doubles its refine
    assert _cascade(loaded, 4, 2, 0.5, 1.0).nfe(4) == 4 + 2  # g = 1: no CFG
    assert cascade.label(4) == f"{student.name}@4+teacher@2:0.5" == cascade.name
    assert (cascade.role, cascade.kind, cascade.model, cascade.steps) == ("cascade", "cascade", baseline.model, 4)
    assert cascade.scheduler_name == "LCMScheduler + DDIMScheduler (trailing)"
    assert cascade.guidance_input and cascade.metadata["teacher_schedule_steps"] == 4
    with pytest.raises(ValueError):
        cascade.nfe(3)
    with pytest.raises(ConfigError):
        _cascade(loaded, 4, 2, 0.001)  # round(2 / 0.001) = 2000 teacher steps: more than its 1000 timesteps


def test_conds_shared_only_when_the_text_encoders_are(loaded, tiny_sd_bert_path):
    """An export of the teacher shares its text encoder (one encoding); a pipeline with another one does not."""
    cascade = _cascade(loaded, 2, 2, 0.5)
    cond = cascade.encode(PROMPTS)
    assert cascade.shared_text_encoder and cond.student is cond.teacher
    one = cascade.denoise(2, cond.teacher, *_noise(cascade))  # a plain Cond is used for both
    assert torch.equal(one, cascade.denoise(2, cond, *_noise(cascade)))

    other = models.load_student(str(tiny_sd_bert_path), "unused", "cpu", torch.float32)
    mixed = CascadeCandidate.build(CascadeSpec(other.source, 2, 2, 0.5), other, loaded[1])
    cond = mixed.encode(PROMPTS)
    assert not mixed.shared_text_encoder and isinstance(cond, CascadeCond)
    assert not torch.equal(cond.student.encoder_hidden_states, cond.teacher.encoder_hidden_states)
    with pytest.raises(ValueError):
        mixed.denoise(2, cond.teacher, *_noise(mixed))


def _noise(cand):
    gens = models.sample_generators(5, range(len(PROMPTS)))
    return models.initial_noise(cand, gens), gens
