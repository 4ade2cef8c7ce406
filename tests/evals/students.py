"""Students for eval tests, made as distill's own runs and exports make them: a LoRA run folder and a full LCM
pipeline export (with a randomised guidance input, so its sampler draws noise at every step) on a tiny teacher."""

import torch


def lora_run(root, teacher_path):
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
    student_info(teacher, teacher_path, "lora", 1.0).save(root / "lora_run" / "student")
    return root / "lora_run"


def flow_lora_run(root, teacher_path):
    """The LCM-LoRA run folder of a flow teacher (the tiny SD3): N = 10 flow sigmas, FlowMatchLCMScheduler pinned."""
    from distill.consistency import lcm_sampler
    from distill.student import LoraStudent
    from distill.teacher import Teacher

    teacher = Teacher.from_pretrained(teacher_path)
    student = LoraStudent(teacher, rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in teacher.network.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    student.save_weights(root / "flow_run" / "student")
    info = student_info(teacher, teacher_path, "lora", 1.0)
    info.sampler = lcm_sampler(10, 10.0, teacher.prediction_type, 1.0, schedule=teacher.schedule)
    info.network, info.details["num_ddim_timesteps"] = "transformer", 10
    info.save(root / "flow_run" / "student")
    return root / "flow_run"


def student_info(teacher, teacher_path, kind, guidance_scale):
    from distill.consistency import lcm_sampler
    from distill.info import StudentInfo

    return StudentInfo(kind=kind, teacher=str(teacher_path), teacher_kind=teacher.kind,
                       pipeline_class=type(teacher.pipe).__name__, prediction_type=teacher.prediction_type,
                       sampler=lcm_sampler(50, 10.0, teacher.prediction_type, guidance_scale),
                       teacher_guidance_scale=3.0, step=3,
                       details=dict(num_ddim_timesteps=50, timestep_scaling=10.0, w_min=1.0, w_max=3.0))


def full_export(root, teacher_path):
    """A pipeline folder with an LCMScheduler and a UNet with a (randomised) guidance input, as `distill export` does."""
    from distill.student import build_full_network
    from distill.teacher import Teacher

    teacher = Teacher.from_pretrained(teacher_path)
    unet = build_full_network(teacher.unet).eval()
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    info = student_info(teacher, teacher_path, "full", 3.0)
    pipe = teacher.pipe
    pipe.unet, pipe.scheduler = unet, info.sampler.build(pipe.scheduler.config)
    pipe.save_pretrained(str(root / "full"), safe_serialization=True)
    info.save(root / "full")
    return root / "full"
