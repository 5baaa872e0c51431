"""Rectified flow (Liu et al. 2022; flow matching, Lipman et al. 2023) as trained by SD3 (Esser et al. 2024).

The path from data to noise is the straight line x_t = (1 - t) x0 + t eps, t in [0, 1]; its velocity dx_t/dt = eps - x0
is the network's regression target, and sampling integrates dx/dt = v(x, t) from t = 1 (pure noise) to t = 0. Training
times come from a uniform or a logit-normal law (SD3 §3.1: t = sigmoid(u), u ~ N(m, s), which favours the middle of
the path), optionally pushed towards noise by the resolution shift t -> shift t / (1 + (shift - 1) t) (SD3 §5.3.2:
shift = sqrt(pixels / base pixels), since more pixels keep more of the signal at the same t).

The network sees t * time_scale (1000 by default, as diffusers' FlowMatchEulerDiscreteScheduler), so a sinusoidal
time embedding laid out for DDPM's 0..999 fits unchanged.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from gen_lightning.diffusion.noise import training_noise
from gen_lightning.diffusion.ode_samplers import ODESampler
from gen_lightning.diffusion.utils import append_dims

TIME_SAMPLINGS = ("uniform", "logit_normal")
FLOW_TIME_SCALE = 1000.0


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps for per-sample t [N] in [0, 1]."""
    t = append_dims(t.to(x0.dtype), x0.ndim)
    return (1 - t) * x0 + t * noise


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The path's velocity d x_t / dt = eps - x0: the training target (constant along each straight path)."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - t v (from x_t = x0 + t (eps - x0)); with the ideal v = E[eps - x0 | x_t] this is E[x0 | x_t]."""
    return x_t - append_dims(t.to(x_t.dtype), x_t.ndim) * velocity


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift, shift t / (1 + (shift - 1) t): keeps 0 and 1, moves the rest towards noise if shift > 1."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_pixels: int, base_num_pixels: int) -> float:
    """SD3 §5.3.2: the shift for a resolution with num_pixels (or tokens) trained at base_num_pixels, sqrt(m / n)."""
    return math.sqrt(num_pixels / base_num_pixels)


def sample_flow_time(
    n: int,
    sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n training times in [0, 1] (float32, drawn on the generator's device, returned on `device`)."""
    if sampling not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time sampling {sampling!r}; valid: {', '.join(TIME_SAMPLINGS)}")
    draw_device = generator.device if generator is not None else device
    if sampling == "uniform":
        t = torch.rand(n, generator=generator, device=draw_device)
    else:
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=draw_device))
    return shift_time(t, shift).to(device) if shift != 1 else t.to(device)


class FlowMatchingLoss:
    """E_{t, eps} || model(x_t, t * time_scale, **extra_args) - (eps - x0) ||^2, averaged over pixels then the batch.
    Called as DiffusionLoss is (the conditioning as `extra_args`, optional per-pixel weights), so a model swaps the
    two without changing its training step."""

    def __init__(
        self,
        time_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        time_scale: float = FLOW_TIME_SCALE,
        offset_noise: float = 0.0,
    ) -> None:
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {time_sampling!r}; valid: {', '.join(TIME_SAMPLINGS)}")
        shift_time(torch.zeros(1), shift)  # validates shift
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, logit_mean, logit_std
        self.shift, self.time_scale, self.offset_noise = shift, time_scale, offset_noise

    def per_sample(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        pixel_weight: torch.Tensor | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """The loss of each sample for given t [N] in [0, 1] and noise; pixel_weight (broadcastable to x0, mean 1 per
        sample) multiplies the squared error before the mean over pixels."""
        x_t = flow_interpolate(x0, noise, t)
        dtype = torch.promote_types(x0.dtype, torch.float32)  # reduce in >= float32 under bf16 autocast
        prediction = model(x_t, t * self.time_scale, **(extra_args or {})).to(dtype)
        squared = (prediction - flow_velocity(x0, noise).to(dtype)).pow(2)
        if pixel_weight is not None:
            squared = squared * pixel_weight.to(dtype)
        return squared.reshape(x0.shape[0], -1).mean(dim=1)

    def __call__(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        pixel_weight: torch.Tensor | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Scalar loss with t from the configured law and eps ~ N(0, I) (plus the offset noise); `generator` makes
        both reproducible."""
        t = sample_flow_time(
            x0.shape[0], self.time_sampling, self.logit_mean, self.logit_std, self.shift, generator, x0.device
        )
        gen_device = generator.device if generator is not None else x0.device
        noise = training_noise(x0.shape, self.offset_noise, generator, gen_device, x0.dtype).to(x0.device)
        return self.per_sample(model, x0, t, noise, pixel_weight, extra_args).mean()


class _FlowSampler(ODESampler):
    """dx/dt = v(x, t) from t = 1 to 0 on n equal steps in t, shifted like training (SD3); x_1 = x_T ~ N(0, I).

    Unlike diffusers' FlowMatchEulerDiscreteScheduler (whose grid stops at t = 1/1000 before the last step), the grid
    is exactly 1, 1 - 1/n, ..., 0 before the shift, so a straight path is integrated exactly by one Euler step."""

    objective = "flow"

    def __init__(self, order: int, shift: float = 1.0, time_scale: float = FLOW_TIME_SCALE) -> None:
        super().__init__(order)
        shift_time(torch.zeros(1), shift)  # validates shift
        self.shift, self.time_scale = shift, time_scale

    def noise_grid(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        times = shift_time(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), self.shift)
        return times, times[:-1] * self.time_scale

    def slope(self, model_output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return model_output  # the network predicts dx/dt itself


class FlowEulerSampler(_FlowSampler):
    """Euler on the flow ODE: n network evaluations for n steps."""

    def __init__(self, shift: float = 1.0, time_scale: float = FLOW_TIME_SCALE) -> None:
        super().__init__(1, shift, time_scale)


class FlowHeunSampler(_FlowSampler):
    """Heun on the flow ODE (diffusers' FlowMatchHeunDiscreteScheduler): 2n - 1 evaluations, the last step Euler."""

    def __init__(self, shift: float = 1.0, time_scale: float = FLOW_TIME_SCALE) -> None:
        super().__init__(2, shift, time_scale)
