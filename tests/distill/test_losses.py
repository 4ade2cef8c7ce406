"""distill.losses: formulas, per-sample shapes, and the limits that make pseudo-Huber worth having."""

import pytest
import torch
import torch.nn.functional as F

from distill.losses import LOSSES, l2, pseudo_huber


def _pair(seed=0, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_l2_is_per_sample_mse():
    a, b = _pair()
    out = l2(a, b)
    assert out.shape == (3,) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.mse_loss(a, b, reduction="none").mean(dim=(1, 2, 3)))


def test_pseudo_huber_formula_and_shape():
    a, b = _pair()
    c = 0.001
    out = pseudo_huber(a, b, c)
    expected = torch.stack([(torch.sqrt((x - y) ** 2 + c**2) - c).mean() for x, y in zip(a, b)])
    assert out.shape == (3,)
    torch.testing.assert_close(out, expected)
    # Each sample only sees its own elements: changing sample 1 leaves samples 0 and 2 alone.
    b2 = b.clone()
    b2[1] += 5
    changed = pseudo_huber(a, b2, c)
    torch.testing.assert_close(changed[[0, 2]], out[[0, 2]])
    assert changed[1] > out[1]


def test_pseudo_huber_limits():
    zero = torch.zeros(2, 5)
    small = torch.full((2, 5), 1e-5)
    large = torch.full((2, 5), 3.0)
    c = 0.01
    # |d| << c: quadratic, d^2 / (2c).
    torch.testing.assert_close(pseudo_huber(small, zero, c), torch.full((2,), 1e-10 / (2 * c)), rtol=1e-3, atol=0)
    # |d| >> c: linear, |d| - c, so an outlier costs 3, not 9.
    torch.testing.assert_close(pseudo_huber(large, zero, c), torch.full((2,), 3.0 - c), rtol=1e-4, atol=0)
    assert torch.all(pseudo_huber(zero, zero, c) == 0)


def test_pseudo_huber_gradient_is_finite_at_zero_difference():
    a = torch.zeros(2, 3, requires_grad=True)
    pseudo_huber(a, torch.zeros(2, 3)).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.all(a.grad == 0)


def test_losses_reject_mismatched_shapes_and_bad_c():
    a, b = _pair()
    with pytest.raises(ValueError, match="same shape"):
        l2(a, b[:2])
    with pytest.raises(ValueError, match="positive"):
        pseudo_huber(a, b, 0.0)
    assert set(LOSSES) == {"l2", "huber"}
