"""Euler and Heun probability-flow ODE samplers (Karras et al. 2022, Algorithm 1; k-diffusion `sample_euler`,
`sample_heun`) as diffusers-style scheduler objects: `set_timesteps(n)`, then one `step()` per network evaluation.

The base class integrates dy/ds = f(y, s) from the first noise level s_0 down to s_n = 0 over a grid set by the
subclass: VP schedules here (y = x_t / sqrt(ab), s = sigma, f = (y - x0) / sigma), rectified flow and EDM in their own
modules. The caller's x is always what the network takes (for VP: x_t itself, so the loop is the DDIM one and every
sampler starts from the same x_T ~ N(0, I)); the conversion to y and back happens inside `step`.

Heun evaluates the network twice per step: at s_i, and at the Euler guess for s_{i+1}, then averages the two slopes
(EDM Algorithm 1, the trapezoidal rule). The step into s = 0 stays an Euler step (the slope there divides by
zero; its local error is O(h^2), so the method stays 2nd order), which makes 2n - 1 network evaluations for n steps:
`timesteps` lists them in order (t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}), as diffusers' HeunDiscreteScheduler does.
"""

import math
from typing import Any

import torch

from gen_lightning.diffusion.karras import KARRAS, vp_noise_levels
from gen_lightning.diffusion.parameterization import check_prediction_type, to_x0_and_eps
from gen_lightning.diffusion.schedule import NoiseSchedule


class ODESampler:
    """Euler (order=1) or Heun (order=2) steps over the subclass's decreasing noise grid `sigmas` ([n+1], last 0)."""

    objective = ""  # set by each subclass: the training objective whose network output it reads
    init_noise_sigma = 1.0  # x_T = init_noise_sigma * N(0, I)

    def __init__(self, order: int) -> None:
        if order not in (1, 2):
            raise ValueError(f"order must be 1 (Euler) or 2 (Heun), got {order}")
        self.order = order
        self.sigmas = torch.zeros(1, dtype=torch.float64)
        self.timesteps = torch.zeros(0)
        self._evaluation = 0  # step() refuses to run before set_timesteps()

    # The ODE, defined by the subclass.
    def noise_grid(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise levels [n+1] decreasing to 0, the network's timestep at each of the first n)."""
        raise NotImplementedError

    def to_ode(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The ODE's variable y from the network's input x at noise level sigma."""
        return x

    def from_ode(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        return y

    def slope(self, model_output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """dy/dsigma at (x, sigma) from the network's output there."""
        raise NotImplementedError

    # Stepping.
    def set_timesteps(self, num_steps: int) -> None:
        sigmas, times = self.noise_grid(num_steps)
        if len(sigmas) != num_steps + 1 or float(sigmas[-1]) != 0 or not bool((sigmas[:-1] > sigmas[1:]).all()):
            raise ValueError("the noise grid must decrease strictly and end at 0")
        self.sigmas, self.num_steps = sigmas, num_steps
        if self.order == 2:  # second evaluation of step i at sigma_{i+1}, for every step but the last
            times = torch.cat([times[:1], times[1:].repeat_interleave(2)])
        self.timesteps = times
        self._evaluation = 0  # index into timesteps of the next step() call
        self._level = 0  # index into sigmas of the current point
        self._first_stage: tuple[torch.Tensor, torch.Tensor] | None = None  # Heun: (y_i, slope at y_i)

    @property
    def num_evaluations(self) -> int:
        """Network evaluations for the current set_timesteps (n for Euler, 2n - 1 for Heun)."""
        return len(self.timesteps)

    def step(
        self, model_output: torch.Tensor, t: float, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Advance by one network evaluation; returns the next network input (after the last: the sample), in
        float32 at least.

        `t` must be the current entry of `timesteps` (checked, to catch a loop out of step); generator is unused (the
        ODE is deterministic) and accepted so every sampler is called alike."""
        if self._evaluation >= len(self.timesteps):
            raise RuntimeError("no steps left: call set_timesteps() before sampling again")
        expected = float(self.timesteps[self._evaluation])
        if not math.isclose(float(t), expected, rel_tol=1e-5, abs_tol=1e-4):
            raise ValueError(f"step {self._evaluation} expects timestep {expected}, got {float(t)}")
        self._evaluation += 1
        dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 inputs: keep the update itself in float32
        x, model_output = x.to(dtype), model_output.to(dtype)
        sigma, sigma_next = (float(s) for s in self.sigmas[self._level : self._level + 2])
        if self._first_stage is None:
            y = self.to_ode(x, sigma)
            slope = self.slope(model_output, x, sigma)
            y_next = y + (sigma_next - sigma) * slope
            if self.order == 2 and sigma_next > 0:
                self._first_stage = (y, slope)
                return self.from_ode(y_next, sigma_next)  # the Euler guess, where the network is evaluated next
        else:
            y, first_slope = self._first_stage
            self._first_stage = None
            slope = (first_slope + self.slope(model_output, x, sigma_next)) / 2
            y_next = y + (sigma_next - sigma) * slope
        self._level += 1
        return self.from_ode(y_next, sigma_next)


class _VPSampler(ODESampler):
    """The VP schedule's PF-ODE in EDM form: y = x_t / sqrt(ab) = x_t sqrt(1 + sigma^2), dy/dsigma = (y - x0) / sigma.

    Starting point: x_T ~ N(0, I) as for DDIM, i.e. y = sqrt(1 + sigma_max^2) z; k-diffusion and diffusers start from
    y = sigma_max z, the same to 1/(2 sigma_max^2) (2e-5 for the linear schedule). clip_sample clamps the predicted x0
    (as DDIM's); off by default, as in diffusers' Euler/Heun."""

    objective = "vp"

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        order: int = 1,
        timestep_spacing: str = KARRAS,
        rho: float = 7.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        clip_sample: float | None = None,
    ) -> None:
        super().__init__(order)
        check_prediction_type(prediction_type)
        if prediction_type == "epsilon" and schedule.terminal_alpha_bar == 0:
            raise ValueError("prediction_type='epsilon' has no x0 at alpha_bar = 0 (zero terminal SNR); use 'v'")
        if clip_sample is not None and clip_sample <= 0:
            raise ValueError(f"clip_sample must be > 0 or None, got {clip_sample}")
        self.schedule, self.prediction_type, self.clip_sample = schedule, prediction_type, clip_sample
        self.timestep_spacing, self.rho = timestep_spacing, rho
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        vp_noise_levels(schedule, 1, timestep_spacing, rho, sigma_min, sigma_max)  # validate the arguments now

    def noise_grid(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        return vp_noise_levels(
            self.schedule, num_steps, self.timestep_spacing, self.rho, self.sigma_min, self.sigma_max
        )

    def to_ode(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x * math.sqrt(1 + sigma**2)

    def from_ode(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        return y / math.sqrt(1 + sigma**2)

    def denoised(self, model_output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x0 predicted from x_t at noise level sigma (alpha_bar = 1 / (1 + sigma^2)), clipped if asked."""
        x0, _ = to_x0_and_eps(self.prediction_type, model_output, x, 1 / (1 + sigma**2))
        return x0 if self.clip_sample is None else x0.clamp(-self.clip_sample, self.clip_sample)

    def slope(self, model_output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return (self.to_ode(x, sigma) - self.denoised(model_output, x, sigma)) / sigma


class EulerSampler(_VPSampler):
    """Euler on the VP schedule's PF-ODE (k-diffusion `sample_euler`; diffusers' EulerDiscreteScheduler), n network
    evaluations for n steps. timestep_spacing="karras" (default): EDM's sigmas at fractional timesteps; or a DDIM
    spacing (integer timesteps)."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon", **kwargs: Any) -> None:
        super().__init__(schedule, prediction_type, order=1, **kwargs)


class HeunSampler(_VPSampler):
    """Heun on the VP schedule's PF-ODE (EDM Algorithm 1; k-diffusion `sample_heun`; diffusers'
    HeunDiscreteScheduler), 2n - 1 network evaluations for n steps."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon", **kwargs: Any) -> None:
        super().__init__(schedule, prediction_type, order=2, **kwargs)
