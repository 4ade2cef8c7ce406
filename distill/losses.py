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


# ---------------------------------------------------------------------------------------------- adversarial
# Logits are [B, H]: one per sample per discriminator head. Each loss returns [B], the mean over heads.

def hinge_real(logits: Tensor) -> Tensor:
    """Discriminator hinge on real samples: mean_h max(0, 1 - D_h(x)). logits [B, H] -> [B].

    Lim & Ye 2017 (arXiv:1705.02894), as ADD (Sauer et al. 2023, arXiv:2311.17042) and StyleGAN-T use it.
    """
    return (1 - logits.float()).relu().mean(dim=1)


def hinge_fake(logits: Tensor) -> Tensor:
    """Discriminator hinge on generated samples: mean_h max(0, 1 + D_h(x_hat)). logits [B, H] -> [B]."""
    return (1 + logits.float()).relu().mean(dim=1)


def hinge_generator(logits: Tensor) -> Tensor:
    """Generator's adversarial loss under the hinge discriminator: -mean_h D_h(x_hat). logits [B, H] -> [B].

    ADD's L_adv^G (Sauer et al. 2023, eq. 3).
    """
    return -logits.float().mean(dim=1)


def r1_penalty(grads: list[Tensor]) -> Tensor:
    """R1 (Mescheder et al. 2018, arXiv:1801.04406): ||grad_x D(x)||^2 on real x, per sample.

    grads: the gradients of the summed real logits with respect to each input the heads read ([B, ...] each, from
    `torch.autograd.grad(..., create_graph=True)`); returns [B], the squared norms summed over inputs. The recipe
    multiplies by gamma / 2.
    """
    return sum(g.float().pow(2).flatten(1).sum(dim=1) for g in grads)


def add_distillation(x0_student: Tensor, x0_teacher: Tensor, c_t: Tensor) -> Tensor:
    """ADD's distillation loss c(t) d(x_hat_theta, sg(x_hat_psi)) with d the squared L2 (mean over elements).

    x0_student: the student's x0 [B, ...] (gradient flows); x0_teacher: the frozen teacher's x0 prediction at the
    student sample re-noised to t [B, ...] (detached here); c_t: the weight c(t) [B] (ADD: alpha_t, "exponential
    weighting"). Returns [B]. Sauer et al. 2023, eq. 4-5.
    """
    return c_t.float() * l2(x0_student, x0_teacher.detach())
