"""Every sampler by name: the samplers of a discrete VP schedule (DDIM, DDPM, DPM-Solver++(2M), Euler and Heun on
Karras sigmas, the multistep sampler of consistency students) and those of rectified flow (Euler, Heun). Each is a
diffusers-style scheduler object that the one sampling loop, `samplers.sample_steps` / `sample_loop`, drives.
"""

from typing import Any

from gen_lightning.diffusion.distillation import ConsistencySampler
from gen_lightning.diffusion.dpm_solver import DPMSolverSampler
from gen_lightning.diffusion.flow import FlowEulerSampler, FlowHeunSampler
from gen_lightning.diffusion.ode_samplers import EulerSampler, HeunSampler
from gen_lightning.diffusion.samplers import DDIMSampler, DDPMSampler, Sampler
from gen_lightning.diffusion.schedule import NoiseSchedule
from gen_lightning.sampler_names import ALL_SAMPLER_NAMES, FLOW_SAMPLER_NAMES, VP_SAMPLER_NAMES

_VP_SAMPLERS: dict[str, Any] = dict(
    zip(
        VP_SAMPLER_NAMES,
        (DDIMSampler, DDPMSampler, DPMSolverSampler, EulerSampler, HeunSampler, ConsistencySampler),
        strict=True,
    )
)
_FLOW_SAMPLERS: dict[str, Any] = dict(zip(FLOW_SAMPLER_NAMES, (FlowEulerSampler, FlowHeunSampler), strict=True))


def build_sampler(name: str, schedule: NoiseSchedule, prediction_type: str = "epsilon", **kwargs: Any) -> Sampler:
    """A sampler of a VP schedule by name (VP_SAMPLER_NAMES); kwargs go to its constructor (eta: DDIM's only)."""
    if name in _FLOW_SAMPLERS:
        raise ValueError(f"sampler {name!r} integrates rectified flow, not a VP schedule: use build_flow_sampler")
    if name not in _VP_SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(ALL_SAMPLER_NAMES)}")
    return _VP_SAMPLERS[name](schedule, prediction_type, **kwargs)


def build_flow_sampler(name: str, shift: float = 1.0, **kwargs: Any) -> Sampler:
    """A rectified-flow sampler by name (FLOW_SAMPLER_NAMES) with the time shift used in training."""
    if name in _VP_SAMPLERS:
        raise ValueError(f"sampler {name!r} reads a VP schedule's prediction, not a flow velocity: use build_sampler")
    if name not in _FLOW_SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(ALL_SAMPLER_NAMES)}")
    return _FLOW_SAMPLERS[name](shift=shift, **kwargs)
