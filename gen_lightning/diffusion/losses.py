"""Denoising training loss (Ho et al. 2020) with optional Min-SNR-gamma weighting (Hang et al. 2023)."""

from collections.abc import Callable, Mapping
from typing import Any

import torch

from gen_lightning.diffusion.forward import q_sample
from gen_lightning.diffusion.noise import training_noise
from gen_lightning.diffusion.parameterization import check_prediction_type, training_target
from gen_lightning.diffusion.schedule import NoiseSchedule

WEIGHTINGS = ("uniform", "min_snr")


def min_snr_weight(snr: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight for an MSE on the given target.

    The paper's weight is min(snr, gamma) on the x0-MSE; an eps-MSE already equals snr * x0-MSE and a v-MSE equals
    (snr + 1) * x0-MSE, so those targets divide by snr and snr + 1 respectively.
    """
    check_prediction_type(prediction_type)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v":
        return clipped / (snr + 1)
    # min(snr, g) / snr written as min(1, g / snr) so snr = 0 (zero terminal SNR) gives its limit 1, not 0/0.
    return (gamma / snr).clamp(max=1.0)


class DiffusionLoss:
    """E_{t, eps} w(t) || model(x_t, t, **extra_args) - target ||^2, averaged over pixels then over the batch. The
    model's conditioning comes as `extra_args` (k-diffusion's Denoiser.loss(input, noise, sigma, **kwargs))."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.weighting = weighting
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise

    def weight(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-sample loss weight on t's device."""
        if self.weighting == "uniform":
            return torch.ones(t.shape, device=t.device, dtype=dtype)
        return min_snr_weight(self.schedule.snr(t, dtype), self.prediction_type, self.min_snr_gamma)

    def per_sample(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        pixel_weight: torch.Tensor | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Weighted loss of each sample for given t and noise (for logging per-t losses or custom t sampling).

        pixel_weight: optional per-pixel weights broadcastable to x0 (e.g. [N, 1, H, W]) that multiply the squared
        error before the mean over pixels; keep their mean at 1 per sample to leave the loss scale unchanged."""
        x_t = q_sample(self.schedule, x0, t, noise)
        target = training_target(self.prediction_type, x0, noise, self.schedule.alpha_bar(t, dtype=x0.dtype))
        # At least float32 for the reduction so bf16 autocast outputs do not lose the small squared errors.
        dtype = torch.promote_types(x0.dtype, torch.float32)
        squared = (model(x_t, t, **(extra_args or {})).to(dtype) - target.to(dtype)).pow(2)
        if pixel_weight is not None:
            squared = squared * pixel_weight.to(dtype)
        err = squared.reshape(x0.shape[0], -1).mean(dim=1)
        return self.weight(t, dtype) * err

    def __call__(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        pixel_weight: torch.Tensor | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Scalar loss with t ~ U{0..T-1} and eps ~ N(0, I) (plus the offset noise); `generator` makes both
        reproducible (any device)."""
        gen_device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=generator, device=gen_device)
        noise = training_noise(x0.shape, self.offset_noise, generator, gen_device, x0.dtype)
        return self.per_sample(model, x0, t.to(x0.device), noise.to(x0.device), pixel_weight, extra_args).mean()
