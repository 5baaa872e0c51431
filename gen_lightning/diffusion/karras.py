"""Noise levels of a discrete variance-preserving schedule seen as the sigmas of Karras et al. 2022 (EDM).

A VP sample x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, divided by sqrt(ab), is x0 + sigma eps with
sigma = sqrt((1 - ab) / ab): the "variance exploding" form the EDM/k-diffusion ODE samplers integrate, where
dx/dsigma = (x - x0) / sigma (EDM eq. 1 with sigma(t) = t and the score of eq. 3). The samplers pick noise levels on
this sigma axis; a level between two training steps is evaluated at a fractional timestep, interpolated in log sigma
(k-diffusion's DiscreteSchedule, diffusers' `_sigma_to_t`).
"""

import torch

from gen_lightning.diffusion.samplers import TIMESTEP_SPACINGS, spaced_timesteps
from gen_lightning.diffusion.schedule import NoiseSchedule

# A zero-terminal-SNR schedule has sigma = inf at its last step; like diffusers (rescale_betas_zero_snr) the samplers
# read that alpha_bar as 2**-24 instead (sigma ~ 4096), so the first step has a finite size; or as a quarter of the
# previous alpha_bar where that is smaller, so sigma still increases with t (log-sigma interpolation needs it).
TERMINAL_ALPHA_BAR = 2.0**-24
KARRAS = "karras"
# The highest noise level the Karras grid starts from by default: EDM's sampler starts at min(80, the network's
# sigma_max), and so does this. A cosine schedule clipped at beta 0.999 reaches sigma ~2e4 at its last step; from
# there Heun drew noise at 3, 5 and 9 NFE on the demo model (FID ~420), from 80 it scores 312 and 197 at 5 and 9
# (3 NFE is still noise; bench/RESULTS.md "Few steps"). At 80, x_T's signal is 1/80 of its noise.
DEFAULT_SIGMA_MAX = 80.0
NOISE_SPACINGS = (KARRAS, *TIMESTEP_SPACINGS)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..n-1,
    then a final 0 (k-diffusion's get_sigmas_karras). rho = 7 spends more steps at low noise; float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def vp_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """sigma[t] = sqrt((1 - ab[t]) / ab[t]) for t = 0..T-1 (strictly increasing), float64."""
    alpha_bar = schedule.alphas_cumprod.clone()
    if alpha_bar[-1] == 0:
        alpha_bar[-1] = min(TERMINAL_ALPHA_BAR, float(alpha_bar[-2]) / 4)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_timestep(sigma: torch.Tensor, schedule_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep whose noise level is sigma: linear interpolation of log sigma between the two training
    steps around it, clamped to [0, T-1] (diffusers' `_sigma_to_t`, k-diffusion's `sigma_to_t`)."""
    log_table = schedule_sigmas.log()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-10).log()
    low = (torch.searchsorted(log_table, log_sigma, right=True) - 1).clamp(0, len(log_table) - 2)
    weight = (log_sigma - log_table[low]) / (log_table[low + 1] - log_table[low])
    return low + weight.clamp(0, 1)


def timestep_to_sigma(timestep: torch.Tensor, schedule_sigmas: torch.Tensor) -> torch.Tensor:
    """The noise level of a (fractional) timestep: the inverse of sigma_to_timestep, log sigma interpolated linearly
    between the training steps around it; float64."""
    t = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, len(schedule_sigmas) - 1)
    low = t.floor().long().clamp(max=len(schedule_sigmas) - 2)
    log_table = schedule_sigmas.to(t.device).log()
    return torch.lerp(log_table[low], log_table[low + 1], t - low).exp()


def vp_noise_levels(
    schedule: NoiseSchedule,
    num_steps: int,
    spacing: str = KARRAS,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [n+1] ending at 0, the network's timesteps [n]) for n steps of an ODE sampler.

    spacing="karras": EDM eq. 5 between sigma_min and sigma_max (default: the schedule's sigma at t=0, and its sigma
    at t=T-1 capped at DEFAULT_SIGMA_MAX; diffusers and k-diffusion do not cap), at fractional timesteps (float64).
    Otherwise a timestep spacing of `spaced_timesteps` (as the project's DDIM), at integer timesteps (int64).
    """
    if spacing not in NOISE_SPACINGS:
        raise ValueError(f"unknown noise spacing {spacing!r}; valid: {', '.join(NOISE_SPACINGS)}")
    table = vp_sigmas(schedule)
    if spacing == KARRAS:
        lo = float(table[0]) if sigma_min is None else sigma_min
        hi = min(float(table[-1]), DEFAULT_SIGMA_MAX) if sigma_max is None else sigma_max
        sigmas = karras_sigmas(num_steps, lo, hi, rho)
        return sigmas, sigma_to_timestep(sigmas[:-1], table)
    if sigma_min is not None or sigma_max is not None:
        raise ValueError("sigma_min/sigma_max apply to spacing='karras' only")
    timesteps = spaced_timesteps(schedule.num_timesteps, num_steps, spacing)
    return torch.cat([table[timesteps], torch.zeros(1, dtype=torch.float64)]), timesteps
