"""DDPM and DDIM samplers as diffusers-style scheduler objects (no model inside), and the one sampling loop that drives
every sampler (these, DPM-Solver++, Euler/Heun, flow and EDM).

A sampler walks a descending subset of the training timesteps; the step after the last one goes to alpha_bar = 1
(diffusers' set_alpha_to_one), so the final output is the predicted clean sample. Step coefficients are computed in
float64 from the schedule and applied in the dtype of x_t.
"""

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch

from gen_lightning.diffusion.parameterization import check_prediction_type, eps_from_x0, to_x0_and_eps
from gen_lightning.diffusion.schedule import NoiseSchedule

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "trailing") -> torch.Tensor:
    """Descending int64 timesteps as diffusers defines the spacings (Lin et al. 2023, table 2; steps_offset=0).

    leading:  0, k, 2k, ... with k = T // n       (never reaches T-1: SD's default, biased away from pure noise)
    trailing: round(T - i T/n) - 1, i = 0..n-1   (always starts at T-1)
    linspace: round(linspace(0, T-1, n))          (both ends; for n=1 only t=0)
    """
    T, n = num_train_timesteps, num_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_steps must be in 1..{T}, got {n}")
    if spacing == "leading":
        ts = torch.arange(n, dtype=torch.int64) * (T // n)
    elif spacing == "trailing":
        ts = torch.round(torch.arange(1, n + 1, dtype=torch.float64) * T / n).long() - 1
    elif spacing == "linspace":
        # numpy.linspace's arithmetic (k * step, last point exactly the end) so half-way roundings match diffusers.
        ts = torch.zeros(1, dtype=torch.float64)
        if n > 1:
            ts = torch.arange(n, dtype=torch.float64) * ((T - 1) / (n - 1))
            ts[-1] = T - 1
        ts = torch.round(ts).long()
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")
    return ts.flip(0)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the generator's device so a CPU generator gives the same numbers whatever device x lives on.
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def clipped_x0_and_eps(
    prediction_type: str,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    clip_sample: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A prediction read as (x0, eps), x0 clipped to ±clip_sample (None: not clipped). alpha_bar: a float or per-sample
    [N] tensor (the distillation losses step every sample from its own timestep)."""
    x0, eps = to_x0_and_eps(prediction_type, model_output, x_t, alpha_bar)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
        # Keep eps consistent with the clipped x0 and x_t, so the DDIM update stays on the same posterior as DDPM.
        eps = eps_from_x0(x_t, x0, alpha_bar)
    return x0, eps


class _DiscreteSampler:
    """Timestep bookkeeping and prediction handling shared by DDPM and DDIM."""

    objective = "vp"
    init_noise_sigma = 1.0  # x_T ~ N(0, I) for variance-preserving schedules

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        clip_sample: float | None = 1.0,
        timestep_spacing: str = "trailing",
    ) -> None:
        check_prediction_type(prediction_type)
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")
        if clip_sample is not None and clip_sample <= 0:
            raise ValueError(f"clip_sample must be > 0 or None, got {clip_sample}")
        if prediction_type == "epsilon" and schedule.terminal_alpha_bar == 0:
            raise ValueError(
                "prediction_type='epsilon' cannot be sampled from a schedule with alpha_bar[T-1] == 0 "
                "(zero_terminal_snr): x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) divides by zero; "
                "use prediction_type='v' or 'sample'"
            )
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.timestep_spacing = timestep_spacing
        self.set_timesteps(schedule.num_timesteps)

    def set_timesteps(self, num_steps: int) -> None:
        self.timesteps = spaced_timesteps(self.schedule.num_timesteps, num_steps, self.timestep_spacing)
        self.num_steps = num_steps
        ts = self.timesteps.tolist()
        self._prev = dict(zip(ts, [*ts[1:], -1], strict=True))

    def previous_timestep(self, t: int) -> int:
        """The timestep the step from t lands on; -1 after the last one (clean data)."""
        try:
            return self._prev[int(t)]
        except KeyError:
            raise ValueError(f"timestep {int(t)} is not in the current timesteps (call set_timesteps first)") from None

    def _alpha_bars(self, t: int) -> tuple[float, float]:
        prev = self.previous_timestep(t)
        ab = self.schedule.alphas_cumprod
        return float(ab[int(t)]), (float(ab[prev]) if prev >= 0 else 1.0)

    def _x0_and_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, ab_t: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return clipped_x0_and_eps(self.prediction_type, model_output, x_t, ab_t, self.clip_sample)


class DDIMSampler(_DiscreteSampler):
    """Song et al. 2021, eq. 12; eta=0 is deterministic DDIM, eta=1 with all steps is DDPM's ancestral sampler."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        eta: float = 0.0,
        clip_sample: float | None = 1.0,
        timestep_spacing: str = "trailing",
    ) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta
        super().__init__(schedule, prediction_type, clip_sample, timestep_spacing)

    def variance(self, t: int) -> float:
        """sigma_t^2 = eta^2 (1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev) for the step from t."""
        ab_t, ab_prev = self._alpha_bars(t)
        return self.eta**2 * (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)

    def step(
        self, model_output: torch.Tensor, t: int, x_t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        ab_t, ab_prev = self._alpha_bars(t)
        x0, eps = self._x0_and_eps(model_output, x_t, ab_t)
        var = self.variance(t)
        x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - var, 0.0)) * eps
        if var > 0:
            x_prev = x_prev + math.sqrt(var) * _randn_like(x_t, generator)
        return x_prev


class DDPMSampler(_DiscreteSampler):
    """Ho et al. 2020 ancestral sampling with the posterior variance ("fixed_small").

    Fewer steps than T use improved-DDPM respacing: for kept steps s_i the betas are 1 - ab[s_i] / ab[s_{i-1}], which
    is the same as using q(x_{prev} | x_t, x0) between two kept steps, so it is computed from the alpha_bars directly.
    """

    def _posterior(self, t: int) -> tuple[float, float, float]:
        """(coefficient of x0, coefficient of x_t, variance) of q(x_prev | x_t, x0) on the respaced chain."""
        ab_t, ab_prev = self._alpha_bars(t)
        alpha = ab_t / ab_prev
        beta = 1 - alpha
        return (
            beta * math.sqrt(ab_prev) / (1 - ab_t),
            (1 - ab_prev) * math.sqrt(alpha) / (1 - ab_t),
            beta * (1 - ab_prev) / (1 - ab_t),
        )

    def variance(self, t: int) -> float:
        return self._posterior(t)[2]

    def step(
        self, model_output: torch.Tensor, t: int, x_t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        ab_t, _ = self._alpha_bars(t)
        x0, _ = self._x0_and_eps(model_output, x_t, ab_t)
        c_x0, c_xt, var = self._posterior(t)
        x_prev = c_x0 * x0 + c_xt * x_t
        if var > 0:
            x_prev = x_prev + math.sqrt(var) * _randn_like(x_t, generator)
        return x_prev


class Sampler(Protocol):
    """What the sampling loop drives: a diffusers-style scheduler object with no model inside. `timesteps` lists the
    network's time input for each evaluation (integer or fractional); `objective` names the training objective whose
    network output `step` reads ("vp", "flow" or "edm"), so a model can refuse a sampler of another."""

    objective: str
    init_noise_sigma: float
    timesteps: torch.Tensor

    def set_timesteps(self, num_steps: int) -> None: ...

    def step(
        self, model_output: torch.Tensor, t: Any, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


def gaussian_noise(
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x_T ~ N(0, I) of `shape` on `device` (default: the generator's), drawn on the generator's device so a seed gives
    the same noise whatever device the model lives on."""
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return _randn_like(torch.empty(shape, device=device, dtype=dtype), generator)


@torch.no_grad()  # as a decorator on a generator, grad mode is set around each step (two loops in lockstep stay apart)
def sample_steps(
    model: Callable[..., torch.Tensor],
    sampler: Sampler,
    noise: torch.Tensor,
    num_steps: int,
    extra_args: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[float | int, torch.Tensor]]:
    """The one sampling loop, one network evaluation at a time: yields (t, x after the step at t), starting from
    x = noise * init_noise_sigma (noise: standard normal, e.g. `gaussian_noise`). For progress, previews, or running
    two samplers in lockstep (bench/unet_vs_diffusers.py).

    The model is called as `model(x, t, **extra_args)` (k-diffusion's convention: conditioning, the guidance weight and
    the unconditional context travel as keyword arguments, never inside a closure), with t as [N]: int64 for integer
    timesteps, float32 for fractional ones (float64 if the noise is). `generator` feeds stochastic samplers (DDPM)."""
    sampler.set_timesteps(num_steps)
    extra_args = extra_args or {}
    fractional = sampler.timesteps.is_floating_point()
    time_dtype = torch.promote_types(noise.dtype, torch.float32) if fractional else torch.int64
    x = noise * sampler.init_noise_sigma
    for t in sampler.timesteps.tolist():
        t_batch = torch.full((x.shape[0],), t, dtype=time_dtype, device=x.device)
        x = sampler.step(model(x, t_batch, **extra_args), t, x, generator=generator)
        yield t, x


def sample_loop(*args: Any, **kwargs: Any) -> torch.Tensor:
    """`sample_steps` (same arguments) run to the end (without gradients): the sample."""
    ((_, x_0),) = deque(sample_steps(*args, **kwargs), maxlen=1)
    return x_0
