"""Distillation losses for few-step sampling of a VP diffusion model (pure math: the networks are arguments).

Progressive distillation (Salimans & Ho 2022, Algorithm 2). A student sampled with N DDIM steps learns to land, in
one step, where two DDIM steps of its teacher land. Both walk trailing-spaced grids of the T training timesteps, and
the N-step grid is every other point of the 2N-step grid, so each student step covers exactly two teacher steps. From
z_t the teacher's two steps reach z_s; the x0 with which one DDIM step from t lands exactly on z_s is the target
    x̃ = (z_s − (σ_s/σ_t) z_t) / (α_s − (σ_s/σ_t) α_t),    α = sqrt(alpha_bar), σ = sqrt(1 − alpha_bar)
(at the last step s is the data: σ_s = 0 and x̃ = z_s). The loss is the student's x0 error weighted by max(SNR_t, 1),
the paper's "truncated SNR" weighting, which keeps the weight finite at pure noise where x0 ≈ 0·v.

Consistency distillation (Song et al. 2023; LCM for latents, Luo et al. 2023). The student f(x, t) = c_skip(t) x +
c_out(t) x0(x, t) maps every point of a teacher ODE trajectory to the trajectory's start. It learns from pairs of
neighbouring points on an N-point grid: z_t, and z_s reached from z_t by one DDIM step of the teacher, with the
target f_target(z_s, s) from a slowly moving copy of the student (its EMA). c_skip(s) → 1 and c_out(s) → 0 as s → 0
pin f to the identity at the data end; sampled by `ConsistencySampler` (one network evaluation per step, re-noised
between steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from gen_lightning.diffusion.parameterization import check_prediction_type, to_x0_and_eps
from gen_lightning.diffusion.samplers import _DiscreteSampler, _randn_like, clipped_x0_and_eps, spaced_timesteps
from gen_lightning.diffusion.schedule import NoiseSchedule
from gen_lightning.diffusion.utils import append_dims

Network = Callable[..., torch.Tensor]


def step_grid(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """An N-step sampling grid in ascending order with the data first: [-1, t_1, ..., t_N] (trailing spacing:
    t_N = T − 1). A step of the sampler goes from grid[i] to grid[i − 1]."""
    return torch.cat([torch.tensor([-1]), spaced_timesteps(num_train_timesteps, num_steps, "trailing").flip(0)])


def alpha_bar_at(schedule: NoiseSchedule, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """alpha_bar[t] per sample, with 1 for t = −1 (the data)."""
    return torch.where(t >= 0, schedule.alpha_bar(t.clamp(min=0), dtype), torch.ones((), dtype=dtype, device=t.device))


def ddim_to(
    prediction_type: str,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    ab_t: torch.Tensor,
    ab_to: torch.Tensor,
    clip_sample: float | None,
) -> torch.Tensor:
    """One deterministic DDIM step per sample, from alpha_bar ab_t to ab_to ([N] each), as DDIMSampler takes it."""
    x0, eps = clipped_x0_and_eps(prediction_type, model_output, x_t, ab_t, clip_sample)
    ab_to = append_dims(ab_to, x_t.ndim)
    return ab_to.sqrt() * x0 + (1 - ab_to).sqrt() * eps


def progressive_target(x_t: torch.Tensor, ab_t: torch.Tensor, x_s: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
    """The x0 with which one DDIM step from (x_t, ab_t) lands on x_s at ab_s (module docstring)."""
    ab_t, ab_s = append_dims(ab_t, x_t.ndim), append_dims(ab_s, x_t.ndim)
    ratio = (1 - ab_s).sqrt() / (1 - ab_t).sqrt()
    return (x_s - ratio * x_t) / (ab_s.sqrt() - ratio * ab_t.sqrt())


def _noised(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, alpha_bar_t) for per-sample timesteps t >= 0."""
    ab_t = alpha_bar_at(schedule, t, x0.dtype)
    noise = _randn_like(x0, generator)
    a = append_dims(ab_t, x0.ndim)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, ab_t


def _random_steps(count: int, num_steps: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(1, num_steps + 1, (count,), generator=generator, device=gen_device).to(device)


class ProgressiveDistillationLoss:
    """E_{x0, i, eps} max(SNR_t, 1) ||x0_student(z_t, t) − x̃||² for a student of `student_steps` DDIM steps and a
    teacher of twice as many (module docstring). `clip_sample`: the teacher's DDIM clipping (the sampler's)."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str, clip_sample: float | None = 1.0) -> None:
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.clip_sample = clip_sample

    def teacher_step(
        self,
        teacher: Network,
        x: torch.Tensor,
        t: torch.Tensor,
        ab_t: torch.Tensor,
        ab_to: torch.Tensor,
        extra_args: Mapping[str, Any],
    ) -> torch.Tensor:
        return ddim_to(self.prediction_type, teacher(x, t, **extra_args), x, ab_t, ab_to, self.clip_sample)

    def targets(
        self,
        teacher: Network,
        x0: torch.Tensor,
        student_steps: int,
        generator: torch.Generator | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_t, t, alpha_bar_t, x̃) per sample: a random step of the student's grid, z_t drawn from x0, and the x0
        with which one DDIM step lands where two of the teacher's do."""
        extra_args = extra_args or {}
        grid = step_grid(self.schedule.num_timesteps, 2 * student_steps).to(x0.device)
        i = _random_steps(x0.shape[0], student_steps, generator, x0.device)
        t, mid, s = grid[2 * i], grid[2 * i - 1], grid[2 * i - 2]
        x_t, ab_t = _noised(self.schedule, x0, t, generator)
        ab_mid, ab_s = alpha_bar_at(self.schedule, mid, x0.dtype), alpha_bar_at(self.schedule, s, x0.dtype)
        with torch.no_grad():
            x_mid = self.teacher_step(teacher, x_t, t, ab_t, ab_mid, extra_args)
            x_s = self.teacher_step(teacher, x_mid, mid, ab_mid, ab_s, extra_args)
            return x_t, t, ab_t, progressive_target(x_t, ab_t, x_s, ab_s)

    def __call__(
        self,
        student: Network,
        teacher: Network,
        x0: torch.Tensor,
        student_steps: int,
        generator: torch.Generator | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        x_t, t, ab_t, target = self.targets(teacher, x0, student_steps, generator, extra_args)
        x0_student, _ = to_x0_and_eps(self.prediction_type, student(x_t, t, **(extra_args or {})), x_t, ab_t)
        weight = (ab_t / (1 - ab_t)).clamp(min=1.0)
        return (weight * (x0_student.float() - target.float()).pow(2).flatten(1).mean(dim=1)).mean()


def consistency_scalings(
    t: torch.Tensor, sigma_data: float = 0.5, time_scale: float = 10.0
) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out) of a consistency function at integer timesteps t (−1: the data). LCM's boundary condition with
    u = (t + 1) · time_scale: c_skip = σ_d² / (u² + σ_d²), c_out = u / sqrt(u² + σ_d²). f is the identity on the data
    (u = 0) and, from the first timestep on, nearly the network's x0 prediction (c_skip < 3e-3 at t = 0)."""
    u = (t + 1).float() * time_scale
    return sigma_data**2 / (u**2 + sigma_data**2), u / (u**2 + sigma_data**2).sqrt()


def consistency_output(
    prediction_type: str, model_output: torch.Tensor, x_t: torch.Tensor, ab_t: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """f(x_t, t) = c_skip x_t + c_out x0(x_t, t) per sample."""
    x0, _ = to_x0_and_eps(prediction_type, model_output, x_t, ab_t)
    c_skip, c_out = (append_dims(c.to(x_t.dtype), x_t.ndim) for c in consistency_scalings(t))
    return c_skip * x_t + c_out * x0


class ConsistencyDistillationLoss:
    """E ||f_student(z_t, t) − f_target(z_s, s)||² (pseudo-Huber with `huber_c` > 0, Song & Dhariwal 2023), z_s one
    teacher DDIM step from z_t on a `grid_steps`-point grid (module docstring)."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str,
        clip_sample: float | None = 1.0,
        grid_steps: int = 50,
        huber_c: float = 0.001,
    ) -> None:
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.clip_sample = clip_sample
        self.grid_steps = grid_steps
        self.huber_c = huber_c

    def targets(
        self,
        target_net: Network,
        teacher: Network,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_t, t, alpha_bar_t, f_target(z_s, s)) per sample, z_s one teacher DDIM step below z_t on the grid."""
        extra_args = extra_args or {}
        grid = step_grid(self.schedule.num_timesteps, self.grid_steps).to(x0.device)
        i = _random_steps(x0.shape[0], self.grid_steps, generator, x0.device)
        t, s = grid[i], grid[i - 1]
        x_t, ab_t = _noised(self.schedule, x0, t, generator)
        ab_s = alpha_bar_at(self.schedule, s, x0.dtype)
        with torch.no_grad():
            x_s = ddim_to(self.prediction_type, teacher(x_t, t, **extra_args), x_t, ab_t, ab_s, self.clip_sample)
            # At the data end f is the identity (c_skip = 1): the target is z_s itself.
            target_out = target_net(x_s, s.clamp(min=0), **extra_args)
            target = consistency_output(self.prediction_type, target_out, x_s, ab_s, s)
            on_data = append_dims(s < 0, x0.ndim)
            return x_t, t, ab_t, torch.where(on_data, x_s, target)

    def __call__(
        self,
        student: Network,
        target_net: Network,
        teacher: Network,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        x_t, t, ab_t, target = self.targets(target_net, teacher, x0, generator, extra_args)
        online = consistency_output(self.prediction_type, student(x_t, t, **(extra_args or {})), x_t, ab_t, t)
        squared = (online.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        if self.huber_c > 0:
            return ((squared + self.huber_c**2).sqrt() - self.huber_c).mean()
        return squared.mean()


class ConsistencySampler(_DiscreteSampler):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCMScheduler): at each grid point the student's
    f gives x0, which is re-noised with fresh noise to the next (lower) grid point; the last step returns x0. The grid
    and its bookkeeping are DDIM's (trailing spacing)."""

    def step(
        self, model_output: torch.Tensor, t: int, x_t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        ab_t, ab_prev = self._alpha_bars(t)
        t_batch = torch.full((x_t.shape[0],), int(t), device=x_t.device)
        x0 = consistency_output(
            self.prediction_type, model_output, x_t, torch.full_like(t_batch, ab_t, dtype=x_t.dtype), t_batch
        )
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        if self.previous_timestep(t) < 0:
            return x0
        return math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * _randn_like(x_t, generator)
