"""What the network predicts (epsilon, v or x0) and the conversions between them.

With x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (ab = alpha_bar), the v target of Salimans & Ho 2022 is
v = sqrt(ab) eps - sqrt(1 - ab) x0; (x_t, v) is a rotation of (x0, eps), so every form converts to every other.
alpha_bar may be a Python float, a per-sample [N] tensor, or a tensor that already broadcasts against x.
"""

import math
from typing import Literal, get_args

import torch

from gen_lightning.diffusion.utils import append_dims

PredictionType = Literal["epsilon", "v", "sample"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)

AlphaBar = torch.Tensor | float


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def _coefs(alpha_bar: AlphaBar, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(sqrt(ab), sqrt(1 - ab)) shaped to broadcast against `like` and in its dtype (so float32 data stays float32)."""
    if not isinstance(alpha_bar, torch.Tensor):
        return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    ab = alpha_bar.to(like.device)
    if ab.ndim == 1 and like.ndim > 1:
        ab = append_dims(ab, like.ndim)
    return ab.sqrt().to(like.dtype), (1 - ab).clamp(min=0).sqrt().to(like.dtype)


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    a, s = _coefs(alpha_bar, x0)
    return a * eps - s * x0


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    a, s = _coefs(alpha_bar, x_t)
    return (x_t - s * eps) / a


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    a, s = _coefs(alpha_bar, x_t)
    return (x_t - a * x0) / s


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    a, s = _coefs(alpha_bar, x_t)
    return a * x_t - s * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    a, s = _coefs(alpha_bar, x_t)
    return s * x_t + a * v


def v_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    a, s = _coefs(alpha_bar, x_t)
    return (eps - s * x_t) / a


def training_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: AlphaBar) -> torch.Tensor:
    """What the network should output for x_t = q_sample(x0, noise)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return v_from_x0_eps(x0, noise, alpha_bar)


def to_x0_and_eps(
    prediction_type: str, model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: AlphaBar
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a prediction of any type as (x0, eps). epsilon at alpha_bar = 0 has no x0 (division by zero)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, model_output, alpha_bar), model_output
    if prediction_type == "sample":
        return model_output, eps_from_x0(x_t, model_output, alpha_bar)
    return x0_from_v(x_t, model_output, alpha_bar), eps_from_v(x_t, model_output, alpha_bar)
