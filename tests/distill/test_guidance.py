"""distill.guidance: classifier-free guidance in diffusers' convention."""

import torch

from distill.guidance import cfg, is_unguided


def _outs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)


def test_scale_one_is_conditional_and_zero_is_unconditional():
    cond, uncond = _outs()
    torch.testing.assert_close(cfg(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg(cond, uncond, 0.0), uncond)


def test_float_scale_matches_formula_and_lcm_omega():
    cond, uncond = _outs()
    w = 7.5
    torch.testing.assert_close(cfg(cond, uncond, w), uncond + w * (cond - uncond))
    omega = w - 1  # LCM's parameterisation
    torch.testing.assert_close(cfg(cond, uncond, w), cond + omega * (cond - uncond))


def test_per_sample_scale_tensor():
    cond, uncond = _outs()
    w = torch.tensor([1.0, 3.0, 8.0])
    out = cfg(cond, uncond, w)
    for i in range(3):
        torch.testing.assert_close(out[i], cfg(cond[i], uncond[i], w[i].item()))
    assert not torch.allclose(out[2], cond[2])


def test_is_unguided():
    assert is_unguided(1.0) and is_unguided(torch.ones(4))
    assert not is_unguided(1.5) and not is_unguided(torch.tensor([1.0, 2.0]))
