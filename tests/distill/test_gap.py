"""The consistency gap (`distill.gap`) on the tiny v-prediction SD teacher: zero for a student that is exactly the
teacher's ODE map, positive otherwise; the ODE solve is diffusers' DDIM step for step."""

import pytest
import torch

from distill.consistency import boundary_scalings
from distill.gap import consistency_gap, ode_grid, ode_steps, student_one_step, teacher_ode_solution
from distill.teacher import Teacher

W = 3.0  # the teacher guidance a student imitates


@pytest.fixture(scope="module")
def toy(tiny_sd_v_path):
    teacher = Teacher.from_pretrained(tiny_sd_v_path)
    cond = teacher.encode_prompt(["grinning face", "red heart", "dog face"])
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn((3, *teacher.latent_shape()), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    return teacher, cond, z0, eps


class OdeStudent:
    """A 'student' whose network output is the x0 that makes f(z_t, t) = c_skip z_t + c_out x0 the teacher's ODE
    solution: its one-step map is exactly Phi (`perturb` moves it off by that much noise)."""

    dtype = torch.float32

    def __init__(self, teacher, steps, perturb=0.0):
        self.teacher, self.steps, self.perturb = teacher, steps, perturb
        self.schedule = teacher.schedule

    def guided(self, z_t, t, cond, guidance_scale, timestep_cond=None):
        target = teacher_ode_solution(self.teacher, z_t, t[0], cond, W, self.steps)
        target = target + self.perturb * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
        c_skip, c_out = (c.reshape(-1, 1, 1, 1) for c in boundary_scalings(t))
        return (target - c_skip * z_t) / c_out

    def to_x0_eps(self, out, z_t, t):  # its network predicts x0 ("sample")
        return out, None


@pytest.mark.parametrize("t", [999, 259, 40])
def test_the_gap_is_zero_for_the_ode_map_and_positive_otherwise(toy, t):
    teacher, cond, z0, eps = toy
    z_t = teacher.add_noise(z0, eps, torch.tensor([t] * 3))
    phi = teacher_ode_solution(teacher, z_t, t, cond, W, ode_steps(t, teacher.schedule.t_max))
    exact = consistency_gap(student_one_step(OdeStudent(teacher, ode_steps(t, 999)), z_t, t, cond), phi)
    assert exact.shape == (3,) and exact.max() < 1e-6
    off = consistency_gap(student_one_step(OdeStudent(teacher, ode_steps(t, 999), 0.01), z_t, t, cond), phi)
    assert (off > 1e-3).all() and off.mean() == pytest.approx(0.01, rel=0.2)  # RMS of N(0, 0.01^2) noise
    untrained = consistency_gap(student_one_step(teacher, z_t, t, cond, W), phi)  # the teacher's own one step
    assert (untrained > 1e-4).all()


def test_one_ode_step_is_the_teachers_own_x0_and_more_follow_diffusers_ddim(toy):
    from diffusers import DDIMScheduler

    teacher, cond, z0, eps = toy
    z_t = teacher.add_noise(z0, eps, torch.tensor([800] * 3))
    one = teacher_ode_solution(teacher, z_t, 800, cond, W, 1)
    x0, _ = teacher.to_x0_eps(teacher.guided(z_t, torch.tensor([800] * 3), cond, W), z_t, torch.tensor([800] * 3))
    torch.testing.assert_close(one, x0)
    # Four steps 800 -> 600 -> 400 -> 200 -> x0 are DDIM's with a stride of 200 (5 steps over 1000 timesteps).
    ddim = DDIMScheduler.from_config(teacher.scheduler.config, clip_sample=False, thresholding=False)
    ddim.set_timesteps(5)
    z = z_t
    for t in (800, 600, 400, 200):
        step = ddim.step(teacher.guided(z, torch.tensor([t] * 3), cond, W), t, z, eta=0.0)
        z = step.prev_sample
    torch.testing.assert_close(teacher_ode_solution(teacher, z_t, 800, cond, W, 4), step.pred_original_sample,
                               atol=1e-5, rtol=1e-5)


def test_the_grid_and_its_steps():
    assert ode_grid(800, 4).tolist() == [800, 600, 400, 200] and ode_grid(5, 1).tolist() == [5]
    assert ode_grid(torch.tensor(1.0), 4).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25])  # flow sigma
    assert [ode_steps(t, 999) for t in (999, 759, 499, 259, 3)] == [50, 38, 25, 13, 1]
    with pytest.raises(ValueError, match="at least 1 step"):
        ode_grid(999, 0)
