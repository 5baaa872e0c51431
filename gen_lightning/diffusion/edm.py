"""EDM (Karras et al. 2022): the preconditioned denoiser, its training loss and its ODE samplers.

Noisy data is y = x0 + sigma n (variance exploding, no alpha). The denoiser D(y; sigma) = c_skip y + c_out F(c_in y;
c_noise) (eq. 7) wraps a raw network F with the table 1 coefficients, chosen so that F's input and training target both
have unit variance at every sigma (appendix B.6) when the data has standard deviation sigma_data:

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)    c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in = 1 / sqrt(sigma^2 + sigma_data^2)              c_noise = ln(sigma) / 4

Training draws ln sigma ~ N(P_mean, P_std^2) and weights || D - x0 ||^2 by lambda = 1 / c_out^2 (eq. 8, table 1), which
is exactly the unit-weight MSE of F against its target. Sampling: Heun (Algorithm 1) or Euler on Karras sigmas (eq. 5).
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gen_lightning.diffusion.karras import karras_sigmas
from gen_lightning.diffusion.noise import channel_offsets
from gen_lightning.diffusion.ode_samplers import ODESampler
from gen_lightning.diffusion.utils import append_dims

SIGMA_DATA = 0.5  # EDM's choice for images in [-1, 1]
# Our networks embed the time label with sinusoids laid out for DDPM's 0..999 (layers.timestep_embedding); table 1's
# ln(sigma)/4 spans only ~[-1.6, 1.1] over EDM's sigmas, so the label is scaled up (NVlabs' VPPrecond feeds (M-1) t
# for the same reason).
NOISE_LABEL_SCALE = 1000.0


def edm_coefficients(
    sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of table 1, elementwise in sigma."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def effective_sigma(sigma: torch.Tensor, offset_noise: float) -> torch.Tensor:
    """The noise's standard deviation per pixel when offset noise (one N(0, offset^2) value per sample and channel)
    is added to sigma n in training: sqrt(sigma^2 + offset^2). The coefficients and the loss weight use it, as DIAMOND
    does, so the network's input and target keep unit variance. Sampling passes the plain sigma: the offset is a
    training augmentation, never added to x_T."""
    return (sigma**2 + offset_noise**2).sqrt() if offset_noise else sigma


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2 (table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise * noise_label_scale, **cond) around a raw network F with the
    `net(x, t, **cond)` signature (UNet, DiT). Called as model(x, sigma [N], **cond) it returns the x0 estimate, so
    samplers, EMA and FSDP wrapping see one module (as NVlabs/edm's EDMPrecond)."""

    def __init__(
        self,
        inner: nn.Module,
        sigma_data: float = SIGMA_DATA,
        noise_label_scale: float = NOISE_LABEL_SCALE,
        offset_noise: float = 0.0,
    ) -> None:
        super().__init__()
        _check_sigma_data(sigma_data)
        self.inner, self.sigma_data, self.noise_label_scale = inner, sigma_data, noise_label_scale
        self.offset_noise = offset_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # the skip connection in float32 under bf16 autocast
        sigma = torch.as_tensor(sigma, device=x.device).to(dtype).reshape(-1).expand(x.shape[0])
        sigma = effective_sigma(sigma, self.offset_noise)
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in edm_coefficients(sigma, self.sigma_data))
        raw = self.inner((c_in * x.to(dtype)).to(x.dtype), c_noise.flatten() * self.noise_label_scale, **cond)
        return c_skip * x.to(dtype) + c_out * raw.to(dtype)


class EDMLoss:
    """lambda(sigma) || D(x0 + sigma n; sigma) - x0 ||^2 with ln sigma ~ N(P_mean, P_std^2) (NVlabs' EDMLoss),
    averaged over pixels then the batch. `model` is the preconditioned denoiser (EDMPrecond). Called as DiffusionLoss
    and FlowMatchingLoss are (the conditioning as `extra_args`, optional per-pixel weights), so a model swaps the three
    without changing its training step."""

    def __init__(
        self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = SIGMA_DATA, offset_noise: float = 0.0
    ) -> None:
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        _check_sigma_data(sigma_data)
        self.p_mean, self.p_std, self.sigma_data, self.offset_noise = p_mean, p_std, sigma_data, offset_noise

    def per_sample(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        sigma: torch.Tensor,
        noise: torch.Tensor,
        pixel_weight: torch.Tensor | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """The loss of each sample for given sigma [N] and noise; the input is x0 + sigma noise (offset noise comes
        inside `noise`, divided by sigma) and the weight uses effective_sigma. pixel_weight (broadcastable to x0, mean 1
        per sample) multiplies the squared error before the mean over pixels."""
        dtype = torch.promote_types(x0.dtype, torch.float32)  # reduce in >= float32 under bf16 autocast
        noisy = x0 + append_dims(sigma.to(x0.dtype), x0.ndim) * noise
        squared = (model(noisy, sigma, **(extra_args or {})).to(dtype) - x0.to(dtype)).pow(2)
        if pixel_weight is not None:
            squared = squared * pixel_weight.to(dtype)
        weight = edm_loss_weight(effective_sigma(sigma.to(dtype), self.offset_noise), self.sigma_data)
        return weight * squared.reshape(x0.shape[0], -1).mean(dim=1)

    def __call__(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        pixel_weight: torch.Tensor | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Scalar loss with ln sigma ~ N(P_mean, P_std^2) and n ~ N(0, I), drawn in that order from `generator`."""
        gen_device = generator.device if generator is not None else x0.device
        log_sigma = self.p_mean + self.p_std * torch.randn(x0.shape[0], generator=generator, device=gen_device)
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype)
        # DIAMOND's x0 + offset + sigma n, written as x0 + sigma (n + offset / sigma) for per_sample.
        offsets = channel_offsets(x0.shape, self.offset_noise, generator, gen_device, x0.dtype)
        sigma = log_sigma.exp()
        noise = noise + offsets / append_dims(sigma.to(x0.dtype), x0.ndim)
        return self.per_sample(model, x0, sigma.to(x0.device), noise.to(x0.device), pixel_weight, extra_args).mean()


def _check_sigma_data(sigma_data: float) -> None:
    if not sigma_data > 0:
        raise ValueError(f"sigma_data (the data's standard deviation) must be > 0, got {sigma_data}")


class _EDMSampler(ODESampler):
    """dx/dsigma = (x - D(x; sigma)) / sigma on Karras sigmas from sigma_max to sigma_min, then D's estimate; x starts
    at sigma_max z (EDM Algorithm 1 line 1), and the network gets sigma itself as its time."""

    objective = "edm"

    def __init__(self, order: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        super().__init__(order)
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        karras_sigmas(1, sigma_min, sigma_max, rho)  # validates the range
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.init_noise_sigma = sigma_max

    def noise_grid(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas = karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho)
        return sigmas, sigmas[:-1]

    def slope(self, model_output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return (x - model_output) / sigma


class EDMEulerSampler(_EDMSampler):
    """Euler on EDM's ODE (k-diffusion `sample_euler`): n evaluations for n steps."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        super().__init__(1, sigma_min, sigma_max, rho)


class EDMHeunSampler(_EDMSampler):
    """EDM Algorithm 1 (deterministic Heun; k-diffusion `sample_heun`): 2n - 1 evaluations, the last step Euler."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        super().__init__(2, sigma_min, sigma_max, rho)


def edm_noise_label_to_sigma(label: torch.Tensor, noise_label_scale: float = NOISE_LABEL_SCALE) -> torch.Tensor:
    """Inverse of the label EDMPrecond gives its inner network: sigma = exp(4 label / scale)."""
    return torch.exp(4 * label / noise_label_scale)
