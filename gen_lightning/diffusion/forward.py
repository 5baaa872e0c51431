"""The forward (noising) process q and its posterior, in closed form."""

import torch

from gen_lightning.diffusion.schedule import NoiseSchedule
from gen_lightning.diffusion.utils import append_dims


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I), reparameterised with the given noise; t is [N] int."""
    ab = append_dims(schedule.alpha_bar(t.to(x0.device), dtype=x0.dtype), x0.ndim)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def q_posterior_mean_variance(
    schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x0) (Ho et al. eq. 6-7); variance is [N, 1, ...] and 0 at t=0."""
    t, dtype, ndim = t.to(x_t.device), x_t.dtype, x_t.ndim
    ab = append_dims(schedule.alpha_bar(t, dtype), ndim)
    ab_prev = append_dims(schedule.alpha_bar_prev(t, dtype), ndim)
    beta = append_dims(schedule.beta(t, dtype), ndim)
    mean = (beta * ab_prev.sqrt() / (1 - ab)) * x0 + ((1 - ab_prev) * (1 - beta).sqrt() / (1 - ab)) * x_t
    variance = beta * (1 - ab_prev) / (1 - ab)
    return mean, variance
