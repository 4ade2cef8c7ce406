"""recipes/add.py (ADD and LADD) end to end on the tiny pipelines and, briefly, on the emoji teacher.

Runs use 8 emoji at 16 px (the tiny VAE's 8x8 latents), batches of 4 and a few steps each.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from distill import engine
from distill.config import from_dict, load_config
from distill.errors import ConfigError, TrainingStopped
from distill.export import export_run
from distill.info import LORA_WEIGHTS
from distill.runs import list_checkpoints
from distill.teacher import Teacher
from recipes import add
from recipes.add import AddRecipeConfig, AdversarialDistillation, main

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "recipes" / "configs" / "add").glob("*.yaml"))
EMOJI_TEACHER = Path(__file__).resolve().parents[2] / "checkpoints" / "emoji-sd"


def _cfg(tmp_path, teacher, kind="full", variant="add", **over) -> AddRecipeConfig:
    data = dict(
        recipe="add", run_name=f"t-{variant}-{kind}", teacher=str(teacher), output_dir=str(tmp_path / "runs"),
        max_train_steps=4, train_batch_size=4, learning_rate=1e-4, checkpointing_steps=2, report_to="none",
        data=dict(source="emoji:32", resolution=16, max_samples=8),
        student=dict(kind=kind, lora_rank=4),
        add=dict(variant=variant, wrong_prompt_weight=0.5),
        discriminator=dict(resolution=32, head_width=8, cmap_dim=8, r1_gamma=1.0),
        optim=dict(lr_warmup_steps=0),
        sample=dict(prompts=["dog face", "banana"], steps=[1, 2], every_steps=0, teacher_steps=None),
    )
    for key, value in over.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return from_dict(AddRecipeConfig, data)


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


# ------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_every_setting_has_a_comment(path):
    cfg = load_config(path, AddRecipeConfig, ["max_train_steps=7"])
    assert cfg.recipe == "add" and cfg.run_name == f"add-{path.stem}" and cfg.max_train_steps == 7
    assert cfg.student.kind == ("lora" if "lora" in path.stem else "full")
    assert cfg.add.variant == ("ladd" if "ladd" in path.stem else "add")
    assert cfg.resume_from_checkpoint is None  # a new run unless the user asks to go on with one
    assert cfg.discriminator.feature_network != "effnet-lite0"  # never the judge
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"^\s*[A-Za-z_]+:\s*\S", line):
            assert "#" in line, f"{path.name}:{number} has no comment: {line.strip()}"
    assert {p.stem for p in CONFIGS} == {"emoji_sd", "emoji_sd_lora", "emoji_sd_ladd", "emoji_sd3_ladd", "sd21",
                                         "sdxl_lora", "sd35_ladd_lora", "flux_ladd_lora"}


def test_recipe_refuses_configs_it_cannot_run(tiny_sd_path, tiny_unet2d_path, tmp_path):
    teacher = Teacher.from_pretrained(tiny_sd_path)
    with pytest.raises(ConfigError, match="trailing grid"):
        add.check(_cfg(tmp_path, tiny_sd_path, add=dict(student_timesteps=[999, 500, 20])), teacher)
    with pytest.raises(ConfigError, match="augment"):
        add.check(_cfg(tmp_path, tiny_sd_path, discriminator=dict(augment=["rotate"])), teacher)
    with pytest.raises(ConfigError, match="t_min"):
        add.check(_cfg(tmp_path, tiny_sd_path, add=dict(teacher_t_min=500, teacher_t_max=100)), teacher)
    with pytest.raises(ConfigError, match="unet2d"):
        add.check(_cfg(tmp_path, tiny_unet2d_path), Teacher.from_pretrained(tiny_unet2d_path))
    vp = teacher.schedule
    assert add.student_grid([999, 749, 499, 249], vp) == 4 and add.student_grid([999, 499], vp) == 2
    with pytest.raises(ConfigError, match="evenly spaced trailing grid"):
        add.student_grid([1000, 750, 500, 250], vp)  # a flow grid is not one the VP sampler visits
    with pytest.raises(ConfigError, match="student_timestep_weights"):
        add.check(_cfg(tmp_path, tiny_sd_path, add=dict(student_timestep_weights=[1, 1])), teacher)


def test_student_timestep_weights_follow_their_timesteps_whatever_the_order():
    a = add.AdversarialConfig(student_timesteps=[249, 999], student_timestep_weights=[1, 3])
    assert add.student_timestep_probs(a).tolist() == [0.75, 0.25]  # ordered as the grid: 999 first
    assert add.student_timestep_probs(add.AdversarialConfig()) is None  # uniform: ADD's draw


# ---------------------------------------------------------------------------------------------- runs
def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_one_add_iteration_moves_heads_and_student_but_never_the_feature_network(tiny_sd_path, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, tiny_sd_path, max_train_steps=2, checkpointing_steps=0)
    run = engine.start_run(cfg)
    method = AdversarialDistillation(cfg, run.device)
    backbone, heads, student = (_snapshot(m) for m in (method.backbone, method.discriminator, method.online.network))
    assert not any(p.requires_grad for p in method.backbone.parameters())
    assert all(id(p) not in {id(q) for g in opt.param_groups for q in g["params"]}
               for opt in method.optimizers.values() for p in method.backbone.parameters())
    report = engine.fit(run, method, engine.Loop.from_config(cfg))
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in backbone.items())
    assert any(not torch.equal(v, method.discriminator.state_dict()[k]) for k, v in heads.items())
    assert any(not torch.equal(v, method.online.network.state_dict()[k]) for k, v in student.items())
    assert {"g_adv", "g_distill", "d_real", "d_fake", "r1", "d_wrong_prompt", "d_acc_real", "d_acc_fake"} <= set(
        report["losses"])


def test_update_ratio_steps_the_student_every_second_iteration(tiny_sd_path, tmp_path):
    cfg = _cfg(tmp_path, tiny_sd_path, checkpointing_steps=0, add=dict(generator_every=2))
    run = engine.start_run(cfg)
    method = AdversarialDistillation(cfg, run.device)
    assert [method.optimizers_to_step(i) for i in range(3)] == [["student", "discriminator"], ["discriminator"],
                                                                ["student", "discriminator"]]
    engine.fit(run, method, engine.Loop.from_config(cfg))

    def steps(name):
        optimizer = method.optimizers[name].optimizer
        return max(s["step"] for s in optimizer.state.values())

    assert steps("student") == 2 and steps("discriminator") == 4


def test_full_add_run_exports_a_pipeline_that_samples_on_the_student_timesteps(tiny_sd_v_path, tmp_path):
    run = main(_cfg(tmp_path, tiny_sd_v_path, sample=dict(every_steps=2, teacher_steps=2)))
    report = _report(run)
    assert report["steps"] == 4 and all(math.isfinite(v["last_50"]) for v in report["losses"].values())
    assert [c.name for c in list_checkpoints(run)] == ["step-0000002", "step-0000004"]
    checkpoint = run / "checkpoints" / "step-0000004"  # the student and the heads, not the frozen network
    assert (checkpoint / "modules" / "student" / "unet" / "config.json").is_file()
    assert (checkpoint / "modules" / "discriminator" / "model.safetensors").is_file()
    assert not any("backbone" in p.name for p in (checkpoint / "modules").iterdir())
    assert {"optimizer.bin", "optimizer_1.bin"} <= {p.name for p in checkpoint.iterdir()}
    info = json.loads((run / "student" / "student.json").read_text())
    assert info["method"] == "add" and info["feature_network"] == "effnet-lite1"
    assert info["sampler"]["scheduler"] == "LCMScheduler" and info["sampler"]["guidance_scale"] == 1.0
    assert info["sampler"]["config"]["original_inference_steps"] == 4 and info["sampler"]["steps"] == [1, 2, 4]
    assert (run / "samples" / "final.png").is_file()

    pipe = DiffusionPipeline.from_pretrained(str(export_run(run, tmp_path / "export")))
    assert isinstance(pipe.scheduler, LCMScheduler)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]  # ADD's student timesteps
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["dog face"], num_inference_steps=1, guidance_scale=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(images).all()


def test_lora_ladd_run_exports_adapters_that_diffusers_loads(tiny_sd_path, tmp_path):
    run = main(_cfg(tmp_path, tiny_sd_path, kind="lora", variant="ladd",
                    discriminator=dict(teacher_blocks=["down_blocks.0", "mid_block"])))
    info = json.loads((run / "student" / "student.json").read_text())
    assert info["method"] == "ladd" and info["feature_network"] == f"teacher:{tiny_sd_path}"
    weights = load_file(str(run / "student" / LORA_WEIGHTS))
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)
    out = export_run(run, tmp_path / "export")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=4)
    pipe.load_lora_weights(str(out))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["banana"], num_inference_steps=2, guidance_scale=1.0, output_type="pt").images
    assert torch.isfinite(images).all()


def test_resumed_add_run_equals_the_uninterrupted_one(tiny_sd_path, tmp_path):
    first = main(_cfg(tmp_path, tiny_sd_path))
    resumed = main(_cfg(tmp_path, tiny_sd_path, max_train_steps=6, resume_from_checkpoint="latest",
                        allow_config_change=True))  # a longer budget, said explicitly
    assert resumed == first and _report(resumed)["steps_this_session"] == 2
    straight = main(_cfg(tmp_path / "other", tiny_sd_path, max_train_steps=6))
    for weights in ("student/unet/diffusion_pytorch_model.safetensors", "discriminator/model.safetensors"):
        a, b = (load_file(str(run / "checkpoints" / "step-0000006" / "modules" / weights)) for run in (resumed, straight))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="ladd"):  # a checkpoint of the other variant is not continued
        main(_cfg(tmp_path, tiny_sd_path, variant="ladd", run_name="t-add-full", max_train_steps=8,
                  resume_from_checkpoint="latest", allow_config_change=True))


def test_a_discriminator_that_wins_outright_stops_the_run_with_the_last_checkpoint(tiny_sd_path, tmp_path):
    with pytest.raises(TrainingStopped, match=r"step 3: the discriminator has won.*step-0000002"):
        main(_cfg(tmp_path, tiny_sd_path, add=dict(d_win_accuracy=0.0, d_win_patience=3)))


@pytest.mark.slow
def test_add_on_the_emoji_teacher_trains_and_says_what_its_heads_saw(tmp_path):
    run = main(_cfg(tmp_path, EMOJI_TEACHER, max_train_steps=3, checkpointing_steps=0,
                    data=dict(resolution=32, max_samples=16), discriminator=dict(resolution=64)))
    report = _report(run)
    assert report["steps"] == 3 and all(math.isfinite(v["last_50"]) for v in report["losses"].values())
    assert json.loads((run / "student" / "student.json").read_text())["feature_network"] == "effnet-lite1"


def test_the_judge_as_discriminator_is_refused_before_a_run_folder_exists(tiny_sd_path, tmp_path):
    with pytest.raises(ConfigError, match="judge"):
        main(_cfg(tmp_path, tiny_sd_path, discriminator=dict(feature_network="effnet-lite0")))
    assert not (tmp_path / "runs").exists()
