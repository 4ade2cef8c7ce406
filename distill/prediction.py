"""Diffusion parameterisation math: what a network's output means, and back.

A noisy sample is z_t = alpha_t * x0 + sigma_t * eps (eps ~ N(0, I)). For the DDPM family
(SD 1.x/2.x, SDXL, UNet2DModel) alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t), so
alpha_t^2 + sigma_t^2 = 1 (variance preserving). A network predicts one of:

- "epsilon":      eps                                  (Ho et al. 2020, DDPM)
- "v_prediction": v = alpha_t * eps - sigma_t * x0     (Salimans & Ho 2022, progressive distillation)
- "sample":       x0

- "flow_prediction": u = eps - x0                    (rectified flow: SD3, FLUX; Esser et al. 2024), where the
  schedule is z_t = (1 - s) x0 + s eps, i.e. alpha_t = 1 - s, sigma_t = s (not variance preserving).

Every function takes alpha_t and sigma_t from the caller (a `distill.schedule` object), never a schedule of its
own, so the same signatures serve every family.

Shapes: samples are [B, C, H, W] (any ndim >= 1 works); alpha_t and sigma_t broadcast against them,
typically [B, 1, 1, 1] from a schedule's `alpha_sigma`. All functions are linear in their tensor arguments.
"""

from __future__ import annotations

from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        valid = ", ".join(repr(p) for p in PREDICTION_TYPES)
        raise ValueError(f"Unknown prediction_type {prediction_type!r}: use one of {valid}.")


def to_x0_eps(
    model_output: Tensor, z_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """Turn a network output into the clean sample and the noise it implies: (x0, eps).

    With z_t = alpha_t x0 + sigma_t eps:
      epsilon:      eps = out;  x0 = (z_t - sigma_t eps) / alpha_t
      v_prediction: x0 = alpha_t z_t - sigma_t v;  eps = sigma_t z_t + alpha_t v   (needs alpha^2 + sigma^2 = 1)
      sample:       x0 = out;  eps = (z_t - alpha_t x0) / sigma_t
      flow_prediction: x0 = z_t - sigma_t u;  eps = z_t + alpha_t u   (needs alpha + sigma = 1)
    model_output, z_t: [B, ...]; alpha_t, sigma_t broadcastable (e.g. [B, 1, 1, 1]). Returns two [B, ...].
    "epsilon" divides by alpha_t and "sample" by sigma_t, so avoid t where those are ~0.
    """
    _check(prediction_type)
    if prediction_type == "epsilon":
        eps = model_output
        return (z_t - sigma_t * eps) / alpha_t, eps
    if prediction_type == "v_prediction":
        return alpha_t * z_t - sigma_t * model_output, sigma_t * z_t + alpha_t * model_output
    if prediction_type == "flow_prediction":
        return z_t - sigma_t * model_output, z_t + alpha_t * model_output
    x0 = model_output
    return x0, (z_t - alpha_t * x0) / sigma_t


def from_x0_eps(x0: Tensor, eps: Tensor, alpha_t: Tensor, sigma_t: Tensor, prediction_type: str) -> Tensor:
    """What a network of `prediction_type` should output for this (x0, eps): the inverse of `to_x0_eps`.

      epsilon: eps;   v_prediction: v = alpha_t eps - sigma_t x0;   sample: x0;   flow_prediction: eps - x0
    x0, eps: [B, ...]; alpha_t, sigma_t broadcastable. Returns [B, ...]. Used to build training targets.
    """
    _check(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha_t * eps - sigma_t * x0
    if prediction_type == "flow_prediction":
        return eps - x0
    return x0


def add_noise(x0: Tensor, eps: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """z_t = alpha_t x0 + sigma_t eps (shapes as in `from_x0_eps`)."""
    return alpha_t * x0 + sigma_t * eps
