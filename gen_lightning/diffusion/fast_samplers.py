"""Every sampler of a discrete VP schedule by name, and the sampling loop that calls the network as
`model(x, t, **extra_args)` (k-diffusion's convention: conditioning, guidance weight and the unconditional context
travel as keyword arguments, no closures).

The loop also drives DDIM/DDPM (samplers.py) and the flow/EDM samplers: each is an object with `init_noise_sigma`,
`set_timesteps(n)`, `timesteps` (one entry per network evaluation, integer or fractional) and
`step(model_output, t, x, generator)`.
"""

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from gen_lightning.diffusion.dpm_solver import DPMSolverSampler
from gen_lightning.diffusion.ode_samplers import EulerSampler, HeunSampler
from gen_lightning.diffusion.samplers import SAMPLER_NAMES, make_sampler
from gen_lightning.diffusion.schedule import NoiseSchedule

FAST_SAMPLER_NAMES = ("dpm++", "euler", "heun")
ALL_SAMPLER_NAMES = (*SAMPLER_NAMES, *FAST_SAMPLER_NAMES)
_FAST_SAMPLERS = {"dpm++": DPMSolverSampler, "euler": EulerSampler, "heun": HeunSampler}


class Sampler(Protocol):
    init_noise_sigma: float
    timesteps: torch.Tensor

    def set_timesteps(self, num_steps: int) -> None: ...

    def step(
        self, model_output: torch.Tensor, t: Any, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


def build_sampler(name: str, schedule: NoiseSchedule, prediction_type: str = "epsilon", **kwargs: Any) -> Sampler:
    """A sampler of a VP schedule by name (ALL_SAMPLER_NAMES); kwargs go to its constructor."""
    if name in SAMPLER_NAMES:
        return make_sampler(name, schedule, prediction_type, **kwargs)
    if name not in _FAST_SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(ALL_SAMPLER_NAMES)}")
    return _FAST_SAMPLERS[name](schedule, prediction_type, **kwargs)


def iterate_sampler(
    model: Callable[..., torch.Tensor],
    sampler: Sampler,
    x_T: torch.Tensor,
    num_steps: int,
    extra_args: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[float | int, torch.Tensor]]:
    """Yield (t, x after the step at t) for each network evaluation, starting from x = x_T * init_noise_sigma
    (x_T: standard normal noise). The network gets t as [N]: int64 for integer timesteps, fractional ones as float32
    (float64 if x_T is float64)."""
    sampler.set_timesteps(num_steps)
    extra_args = extra_args or {}
    time_dtype = torch.promote_types(x_T.dtype, torch.float32) if sampler.timesteps.is_floating_point() else torch.int64
    x = x_T * sampler.init_noise_sigma
    for t in sampler.timesteps.tolist():
        t_batch = torch.full((x.shape[0],), t, dtype=time_dtype, device=x.device)
        x = sampler.step(model(x, t_batch, **extra_args), t, x, generator=generator)
        yield t, x


@torch.no_grad()
def run_sampler(*args: Any, **kwargs: Any) -> torch.Tensor:
    """`iterate_sampler` (same arguments) run to the end, without gradients: the sample."""
    ((_, x_0),) = deque(iterate_sampler(*args, **kwargs), maxlen=1)
    return x_0
