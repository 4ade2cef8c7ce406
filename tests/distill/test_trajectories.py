"""distill.trajectories: the teacher's guided ODE solves, checked against diffusers' own DDIMScheduler loop."""

import pytest
import torch
from diffusers import DDIMScheduler

from distill.trajectories import solve_trajectories
from distill.teacher import Teacher


@pytest.fixture(scope="module")
def teacher(tiny_sd_v_path):
    return Teacher.from_pretrained(tiny_sd_v_path)


def _inputs(teacher, m=3):
    g = torch.Generator().manual_seed(0)
    cond = teacher.encode_prompt(["dog face", "banana", "flag: France"][:m], 16)
    return cond, torch.randn((m, *teacher.latent_shape(16)), generator=g), torch.tensor([1.0, 3.0, 2.0])[:m]


def test_the_solve_is_diffusers_trailing_ddim_with_guidance_and_records_its_states(teacher):
    cond, noise, guidance = _inputs(teacher)
    record = teacher.schedule.grid(5)  # 199, 399, ..., 999: on the 10-step grid
    traj = solve_trajectories(teacher, cond, noise, guidance, record, solve_steps=10)
    scheduler = DDIMScheduler.from_config(teacher.pipe.scheduler.config, timestep_spacing="trailing",
                                           clip_sample=False)  # SD: no clipping of x0
    scheduler.set_timesteps(10)
    z, states = noise.clone(), {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            states[int(t)] = z.clone()
            out = teacher.guided(z, t.expand(len(z)), cond, guidance)
            step = scheduler.step(out, t, z)
            z, x0 = step.prev_sample, step.pred_original_sample
    assert traj.timesteps.tolist() == [999, 799, 599, 399, 199]
    for k, t in enumerate(traj.timesteps.tolist()):
        torch.testing.assert_close(traj.z[:, k], states[t], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(traj.x0, x0, rtol=1e-4, atol=1e-5)  # the end: the last step's x0


def test_draw_returns_matching_rows_and_off_grid_times_are_refused(teacher):
    cond, noise, guidance = _inputs(teacher)
    traj = solve_trajectories(teacher, cond, noise, guidance, teacher.schedule.grid(2), solve_steps=4)
    z_t, t, x0, c, w = traj.draw(6, torch.Generator().manual_seed(1))
    assert z_t.shape == (6, *noise.shape[1:]) and t.shape == (6,) and len(c) == 6 and w.shape == (6,)
    for i in range(6):
        row = int((traj.x0 == x0[i]).flatten(1).all(1).nonzero())
        k = traj.timesteps.tolist().index(int(t[i]))
        assert torch.equal(traj.z[row, k], z_t[i]) and w[i] == guidance[row]
    with pytest.raises(ValueError, match="not on the 4-step solver grid"):
        solve_trajectories(teacher, cond, noise, guidance, torch.tensor([500]), solve_steps=4)
