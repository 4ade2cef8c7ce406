"""FD and KID agree with torchmetrics and the formulas; precision/recall, diversity and collapse by hand."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from evals.emoji import load_emoji
from evals.features import default_feature_net, features
from evals.metrics import collapse_rate, diversity, frechet_distance, kid, pairwise_spread, precision_recall


def test_fd_of_a_set_with_itself_is_zero():
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(x, x)) < 1e-3
    assert frechet_distance(x, x + 1) == pytest.approx(32.0, rel=1e-4)  # a pure mean shift: ||1||^2 = D


def test_fd_matches_the_closed_form():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 8, generator=gen), torch.randn(300, 8, generator=gen) * 1.5 + 0.3
    a64, b64 = a.double().numpy(), b.double().numpy()
    s_a, s_b = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    mean_term = ((a64.mean(0) - b64.mean(0)) ** 2).sum()
    expected = mean_term + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-4)


def test_fd_on_features_equals_torchmetrics_running_the_network():
    real = load_emoji(32).images
    a, b = real[:40], real[1000:1040]
    metric = FrechetInceptionDistance(feature=default_feature_net(), normalize=True)
    metric.update((a + 1) / 2, real=True)
    metric.update((b + 1) / 2, real=False)
    assert frechet_distance(features(a), features(b)) == pytest.approx(float(metric.compute()), rel=1e-3)


def _unbiased_cubic_mmd(x, y):
    k = lambda p, q: (p @ q.T / p.shape[1] + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1)) - 2 * kxy.mean())


def test_kid_is_the_unbiased_cubic_mmd_times_1000_and_seeded():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(60, 16, generator=gen, dtype=torch.float64)
    b = torch.randn(60, 16, generator=gen, dtype=torch.float64) + 0.5
    mean, std = kid(a, b, subsets=3, subset_size=500)  # clipped to 60: every subset is the whole set
    assert mean == pytest.approx(1000 * float(_unbiased_cubic_mmd(a, b)), rel=1e-4) and std < 1e-3
    assert kid(a, b, subsets=5, subset_size=30, seed=7) == kid(a, b, subsets=5, subset_size=30, seed=7)


def test_precision_recall_by_hand():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.1], [0.3], [5.0], [6.5]])
    # k=1: real balls radius 1 cover [-1, 4] -> 0.1, 0.3 in; fake radii 0.2, 0.2, 1.5, 1.5 cover only real 0.
    assert precision_recall(real, fake, k=1) == pytest.approx((0.5, 0.25))
    # k=3: real radii 3, 2, 2, 3 cover [-3, 6] -> 6.5 out; fake radii 6.4, 6.2, 4.9, 6.4 cover all real.
    assert precision_recall(real, fake, k=3) == pytest.approx((0.75, 1.0))
    assert precision_recall(real, fake, k=1, chunk=1) == pytest.approx((0.5, 0.25))


def test_diversity_by_hand():
    groups = torch.tensor([[[0.0], [1.0], [3.0]], [[2.0], [2.0], [2.0]]])
    assert diversity(groups) == pytest.approx((1 + 3 + 2) / 3 / 2)  # prompt 1: mean 2, prompt 2: 0
    with pytest.raises(ValueError):
        diversity(torch.zeros(2, 1, 4))


def test_pairwise_spread_by_hand():
    groups = torch.tensor([[[0.0], [1.0], [3.0]], [[2.0], [2.0], [2.0]]])
    assert pairwise_spread(groups).tolist() == pytest.approx([2.0, 0.0])  # pairs 1, 3, 2; then all equal
    square = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                           [[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [3.0, 4.0]]])
    # unit square: 4 sides of 1 and 2 diagonals of sqrt 2; two points 5 apart, each twice: 4 of 6 pairs at 5
    assert pairwise_spread(square).tolist() == pytest.approx([(4 + 2 * 2**0.5) / 6, 4 * 5 / 6])
    with pytest.raises(ValueError):
        pairwise_spread(torch.zeros(3, 1, 4))


def test_diversity_is_the_mean_of_pairwise_spread():
    groups = torch.randn(7, 5, 16, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 8.0).view(7, 1, 1)
    spread = pairwise_spread(groups)
    assert spread.shape == (7,) and spread.std() > 1  # prompts differ, so a wrong reduction would show
    assert diversity(groups) == pytest.approx(float(spread.mean()), rel=1e-12)


def test_collapse_rate_distinct_vs_repeated():
    gen = torch.Generator().manual_seed(0)
    distinct = torch.randn(50, 4, 64, generator=gen)  # spread ~ sqrt(2 * 64) = 11.3
    repeated = torch.randn(50, 1, 64, generator=gen).expand(50, 4, 64) + 0.01 * torch.randn(50, 4, 64, generator=gen)
    assert collapse_rate(distinct, tau=1.0) == 0.0
    assert collapse_rate(repeated, tau=1.0) == 1.0
    assert collapse_rate(torch.cat([distinct[:30], repeated[:10]]), tau=1.0) == pytest.approx(0.25)
    assert collapse_rate(torch.ones(5, 4, 8), tau=0.0) == 0.0  # strictly below tau: spread 0 is not below 0
    assert collapse_rate(distinct, tau=100.0) == 1.0
