"""Distribution metrics on features computed once (see `evals.features.features`).

FD and KID are torchmetrics' own computations, fed the features through a pass-through
module; precision/recall, diversity and the collapse rate are written here (torchmetrics has none of them).
Name FD by its network: "FD-EffNet" for the offline default, "FID" only with InceptionV3.
FD is strongly biased at small N on 1280-d features: compare models at equal N, and report
KID (unbiased) beside it.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class PrecomputedFeatures(nn.Module):
    """Identity 'feature network' so torchmetrics' FID/KID accept features instead of images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID).

    FD = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)), with unbiased covariances S.
    real: (N, D), fake: (M, D) features of the same network (N, M >= 2). Computed by torchmetrics'
    `FrechetInceptionDistance` in float64, so it equals what that metric gives when it runs
    the feature network itself on the images.
    """
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]))
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    return float(metric.compute())


def kid(
    real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018), returned as (mean, std) x 1000.

    Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over
    `subsets` random subsets of `subset_size` from each side (clipped to min(N, M)).
    real: (N, D), fake: (M, D). Seeded, so the same inputs give the same number.
    """
    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "saves all features in buffer": we chose that
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # torchmetrics draws its subsets from the global generator
        mean, std = metric.compute()
    return 1000 * float(mean), 1000 * float(std)


def _knn_radii(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row: (N,)."""
    radii = [torch.cdist(block, feats).kthvalue(k + 1, dim=1).values for block in feats.split(chunk)]
    return torch.cat(radii)  # k + 1: each row's nearest is itself, at distance 0


def _inside_fraction(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int) -> float:
    """Fraction of queries within radius_i of some manifold point i."""
    inside = [(torch.cdist(block, manifold) <= radii[None]).any(dim=1) for block in queries.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), k-NN manifold estimate.

    manifold(X) = union over x in X of the ball B(x, d_k(x)), d_k = distance to x's k-th nearest
    neighbour in X (itself excluded). precision = mean_{f in fake} [f in manifold(real)];
    recall = mean_{r in real} [r in manifold(fake)]. real: (N, D), fake: (M, D); pairwise
    distances in float64, `chunk` rows at a time (memory chunk x max(N, M)).
    """
    real, fake = real.double(), fake.double()
    precision = _inside_fraction(real, _knn_radii(real, k, chunk), fake, chunk)
    recall = _inside_fraction(fake, _knn_radii(fake, k, chunk), real, chunk)
    return precision, recall


def pairwise_spread(groups: torch.Tensor) -> torch.Tensor:
    """Mean pairwise feature distance among the K samples of each prompt: (P, K, D) -> (P,) float64.

    spread_p = 2 / (K (K - 1)) * sum_{i<j} ||f_{p,i} - f_{p,j}||_2, K >= 2. 0 when a prompt's samples are
    identical. `diversity` is its mean over prompts; `collapse_rate` thresholds it.
    """
    num = groups.shape[1]
    if groups.dim() != 3 or num < 2:
        raise ValueError(f"pairwise_spread needs (P, K, D) features with K >= 2, got shape {tuple(groups.shape)}")
    dist = torch.cdist(groups.double(), groups.double())  # (P, K, K), symmetric, zero diagonal
    return dist.sum(dim=(1, 2)) / (num * (num - 1))


def diversity(groups: torch.Tensor) -> float:
    """Mean pairwise feature distance among the K samples of each prompt, averaged over prompts.

    diversity = mean_p spread_p = mean_p [ 2 / (K (K - 1)) * sum_{i<j} ||f_{p,i} - f_{p,j}|| ] (`pairwise_spread`).
    groups: (P, K, D), K >= 2. 0 when every prompt's samples are identical (mode collapse); in the spirit of the
    LPIPS diversity of Zhu et al. 2017 (BicycleGAN), on the feature network's space.
    """
    return float(pairwise_spread(groups).mean())


def collapse_rate(groups: torch.Tensor, tau: float) -> float:
    """Fraction of prompts whose K samples are near-duplicates of each other, in [0, 1].

    collapse_rate = mean_p [ spread_p < tau ], spread_p from `pairwise_spread`. groups: (P, K, D), K >= 2; tau in
    the feature network's distance units, calibrated for one network, resolution and K
    (`evals.calibrate.collapse_tau`): real emoji and their skin-tone variants score near 0, noisy copies of one
    image near 1.
    """
    return float((pairwise_spread(groups) < tau).double().mean())


def distribution_metrics(
    real: torch.Tensor, fake: torch.Tensor, fd_name: str = "FD-EffNet", kid_subsets: int = 50,
    kid_subset_size: int = 1000, k: int = 3, seed: int = 0,
) -> dict[str, float]:
    """FD, KID x 1000 (mean, std), precision and recall of one fake feature set against the real one."""
    kid_mean, kid_std = kid(real, fake, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(real, fake, k)
    return {fd_name: frechet_distance(real, fake), "KIDx1000": kid_mean, "KIDx1000_std": kid_std,
            "precision": precision, "recall": recall}


COLLAPSE_VS_TEACHER = 0.5  # a prompt collapsed "vs the teacher" when its spread is under half the teacher's there


def collapse_vs_teacher(spreads: torch.Tensor, teacher_spreads: torch.Tensor, ratio: float = COLLAPSE_VS_TEACHER) -> float:
    """Share of prompts whose samples vary less than `ratio` x the teacher's on the same prompt, in [0, 1].

    rate = mean_p [ spread_p < ratio * spread_p(teacher) ], spreads from `pairwise_spread` on the same P prompts and
    seeds. The absolute `collapse_rate` cannot tell a prompt the teacher itself answers with one image (one emoji per
    caption) from a collapsed student; paired per prompt, the teacher scores 0 by construction and a student that
    answers every seed with one image scores 1. spreads, teacher_spreads: (P,).
    """
    if spreads.shape != teacher_spreads.shape:
        raise ValueError(f"Spreads {tuple(spreads.shape)} and the teacher's {tuple(teacher_spreads.shape)} must match.")
    return float((spreads < ratio * teacher_spreads).double().mean())
