"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) as a diffusers-style scheduler object.

It integrates the VP PF-ODE in exponential-integrator form, in the data prediction x0 and lambda = log(alpha / sigma)
(half the log-SNR). A step from s to t, of size h = lambda_t - lambda_s, is

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D,

with D = x0(s) for the first step (this is DDIM) and, from the second step on, the multistep 2nd-order estimate
D = (1 + 1/(2r)) x0(s) - 1/(2r) x0(s_prev), r = h_prev / h (Algorithm 2, "midpoint" in diffusers). Here alpha and
sigma are the VP coefficients sqrt(ab) and sqrt(1 - ab). The last step, into sigma = 0, returns the data prediction
(first order: diffusers' final_sigmas_type="zero" with lower_order_final). One network evaluation per step.
"""

import math

import torch

from gen_lightning.diffusion.karras import vp_noise_levels
from gen_lightning.diffusion.parameterization import check_prediction_type, to_x0_and_eps
from gen_lightning.diffusion.schedule import NoiseSchedule


class DPMSolverSampler:
    """DPM-Solver++(2M) on a discrete VP schedule; x is the network's input x_t throughout (x_T ~ N(0, I)).

    timestep_spacing: a DDIM spacing ("trailing" by default, integer timesteps: diffusers'
    DPMSolverMultistepScheduler with the same spacing) or "karras" (EDM's sigmas at fractional timesteps, k-diffusion's
    "DPM++ 2M Karras"; diffusers rounds those timesteps to integers unless the schedule is cosine).
    """

    objective = "vp"
    init_noise_sigma = 1.0

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "trailing",
        clip_sample: float | None = None,
        rho: float = 7.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> None:
        check_prediction_type(prediction_type)
        if prediction_type == "epsilon" and schedule.terminal_alpha_bar == 0:
            raise ValueError("prediction_type='epsilon' has no x0 at alpha_bar = 0 (zero terminal SNR); use 'v'")
        if clip_sample is not None and clip_sample <= 0:
            raise ValueError(f"clip_sample must be > 0 or None, got {clip_sample}")
        self.schedule, self.prediction_type, self.clip_sample = schedule, prediction_type, clip_sample
        self.timestep_spacing, self.rho = timestep_spacing, rho
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        vp_noise_levels(schedule, 1, timestep_spacing, rho, sigma_min, sigma_max)  # validate the arguments now
        self.set_timesteps(1)

    def set_timesteps(self, num_steps: int) -> None:
        # sigmas are EDM's (sigma_VE = sigma_VP / alpha_VP), so lambda = -log sigma and alpha = 1 / sqrt(1 + sigma^2).
        self.sigmas, self.timesteps = vp_noise_levels(
            self.schedule, num_steps, self.timestep_spacing, self.rho, self.sigma_min, self.sigma_max
        )
        self.num_steps = num_steps
        self._index = 0
        self._previous: tuple[torch.Tensor, float] | None = None  # (x0 of the last step, its h)

    @property
    def num_evaluations(self) -> int:
        return len(self.timesteps)

    def step(
        self, model_output: torch.Tensor, t: float, x_t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One step from the current timestep to the next; `t` must be the current entry of `timesteps` (checked)."""
        if self._index >= len(self.timesteps):
            raise RuntimeError("no steps left: call set_timesteps() before sampling again")
        expected = float(self.timesteps[self._index])
        if not math.isclose(float(t), expected, rel_tol=1e-5, abs_tol=1e-4):
            raise ValueError(f"step {self._index} expects timestep {expected}, got {float(t)}")
        sigma, sigma_next = (float(s) for s in self.sigmas[self._index : self._index + 2])
        self._index += 1
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x_t, model_output = x_t.to(dtype), model_output.to(dtype)
        x0, _ = to_x0_and_eps(self.prediction_type, model_output, x_t, 1 / (1 + sigma**2))
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        if sigma_next == 0:
            return x0
        alpha_next = 1 / math.sqrt(1 + sigma_next**2)
        h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda
        ratio = sigma_next * alpha_next / (sigma / math.sqrt(1 + sigma**2))  # sigma_VP(next) / sigma_VP(now)
        estimate = x0
        if self._previous is not None:
            previous_x0, h_previous = self._previous
            r = h_previous / h
            estimate = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
        self._previous = (x0, h)
        return ratio * x_t - alpha_next * math.expm1(-h) * estimate
