"""Every sampler by name: the samplers of a discrete VP schedule (DDIM, DDPM, DPM-Solver++(2M), Euler and Heun on
Karras sigmas, the multistep sampler of consistency students), those of rectified flow (Euler, Heun) and those of
EDM's preconditioned denoiser (Euler, Heun on Karras sigmas). Each is a diffusers-style scheduler object that the one
sampling loop, `samplers.sample_steps` / `sample_loop`, drives.
"""

from typing import Any

from gen_lightning.diffusion.distillation import ConsistencySampler
from gen_lightning.diffusion.dpm_solver import DPMSolverSampler
from gen_lightning.diffusion.edm import EDMEulerSampler, EDMHeunSampler
from gen_lightning.diffusion.flow import FlowEulerSampler, FlowHeunSampler
from gen_lightning.diffusion.ode_samplers import EulerSampler, HeunSampler
from gen_lightning.diffusion.samplers import DDIMSampler, DDPMSampler, Sampler
from gen_lightning.diffusion.schedule import NoiseSchedule
from gen_lightning.sampler_names import (
    ALL_SAMPLER_NAMES,
    EDM_SAMPLER_NAMES,
    FLOW_SAMPLER_NAMES,
    VP_SAMPLER_NAMES,
)

_VP_SAMPLERS: dict[str, Any] = dict(
    zip(
        VP_SAMPLER_NAMES,
        (DDIMSampler, DDPMSampler, DPMSolverSampler, EulerSampler, HeunSampler, ConsistencySampler),
        strict=True,
    )
)
_FLOW_SAMPLERS: dict[str, Any] = dict(zip(FLOW_SAMPLER_NAMES, (FlowEulerSampler, FlowHeunSampler), strict=True))
_EDM_SAMPLERS: dict[str, Any] = dict(zip(EDM_SAMPLER_NAMES, (EDMEulerSampler, EDMHeunSampler), strict=True))
# What each family's samplers read, and the builder that makes them (for the error of a name given to another).
_FAMILIES = (
    (_VP_SAMPLERS, "a VP schedule's prediction", "build_sampler"),
    (_FLOW_SAMPLERS, "rectified flow's velocity", "build_flow_sampler"),
    (_EDM_SAMPLERS, "EDM's preconditioned denoiser", "build_edm_sampler"),
)


def _sampler_class(name: str, registry: dict[str, Any]) -> Any:
    """The class registered under `name` in this builder's registry, or a ValueError naming the right builder."""
    if name in registry:
        return registry[name]
    for other, reads, builder in _FAMILIES:
        if name in other:
            raise ValueError(f"sampler {name!r} reads {reads}: use {builder}")
    raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(ALL_SAMPLER_NAMES)}")


def build_sampler(name: str, schedule: NoiseSchedule, prediction_type: str = "epsilon", **kwargs: Any) -> Sampler:
    """A sampler of a VP schedule by name (VP_SAMPLER_NAMES); kwargs go to its constructor (eta: DDIM's only)."""
    return _sampler_class(name, _VP_SAMPLERS)(schedule, prediction_type, **kwargs)


def build_flow_sampler(name: str, shift: float = 1.0, **kwargs: Any) -> Sampler:
    """A rectified-flow sampler by name (FLOW_SAMPLER_NAMES) with the time shift used in training."""
    return _sampler_class(name, _FLOW_SAMPLERS)(shift=shift, **kwargs)


def build_edm_sampler(name: str, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Sampler:
    """An EDM sampler by name (EDM_SAMPLER_NAMES) on Karras sigmas from sigma_max down to sigma_min (EDM eq. 5)."""
    return _sampler_class(name, _EDM_SAMPLERS)(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
