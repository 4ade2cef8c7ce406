"""Distances between a student's prediction and its target, per sample.

Every loss takes two tensors of the same shape [B, ...] and returns [B]: the mean over all
non-batch elements. Reduction over the batch (mean, weighting) is the recipe's business.
"""

from __future__ import annotations

from torch import Tensor


def _check(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"Prediction {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape.")


def l2(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample: mean_i (pred_i - target_i)^2.

    pred, target: [B, ...]; returns float32 [B]. LCM's `loss_type="l2"` (Luo et al. 2023, arXiv:2310.04378).
    """
    _check(pred, target)
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def pseudo_huber(pred: Tensor, target: Tensor, c: float = 0.001) -> Tensor:
    """Pseudo-Huber distance per sample: mean_i ( sqrt((pred_i - target_i)^2 + c^2) - c ).

    Quadratic for |pred_i - target_i| << c, linear (|d| - c) beyond, so large errors at high t do not
    dominate. Applied element-wise with c = 0.001, as diffusers' LCM distillation scripts do
    (`loss_type="huber"`); Song & Dhariwal 2023 (improved consistency training, arXiv:2310.14189)
    apply it to the whole-sample norm instead. pred, target: [B, ...]; returns float32 [B].
    """
    _check(pred, target)
    if c <= 0:
        raise ValueError(f"The pseudo-Huber constant c must be positive, got {c}.")
    squared = (pred.float() - target.float()).pow(2)
    # sqrt(d^2 + c^2) - c written as d^2 / (sqrt(d^2 + c^2) + c): no cancellation when |d| << c.
    return (squared / ((squared + c * c).sqrt() + c)).flatten(1).mean(dim=1)


LOSSES = {"l2": l2, "huber": pseudo_huber}
