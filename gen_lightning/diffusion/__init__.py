"""Pure-torch diffusion math: schedules, forward process, prediction targets, losses, samplers and guidance; rectified
flow and EDM beside the discrete VP schedules.

No Lightning and no network weights: usable from a plain script and testable on its own.
"""

from gen_lightning.diffusion.dpm_solver import DPMSolverSampler
from gen_lightning.diffusion.edm import (
    EDMEulerSampler,
    EDMHeunSampler,
    EDMLoss,
    EDMPrecond,
    edm_coefficients,
    edm_loss_weight,
)
from gen_lightning.diffusion.fast_samplers import build_edm_sampler, build_flow_sampler, build_sampler
from gen_lightning.diffusion.flow import (
    TIME_SAMPLINGS,
    FlowEulerSampler,
    FlowHeunSampler,
    FlowMatchingLoss,
    flow_interpolate,
    flow_velocity,
    resolution_shift,
    sample_flow_time,
    shift_time,
    x0_from_velocity,
)
from gen_lightning.diffusion.forward import q_posterior_mean_variance, q_sample
from gen_lightning.diffusion.guidance import (
    AutoGuidanceDenoiser,
    CFGDenoiser,
    GuidanceInterval,
    classifier_free_guidance,
)
from gen_lightning.diffusion.karras import (
    karras_sigmas,
    sigma_to_timestep,
    timestep_to_sigma,
    vp_noise_levels,
    vp_sigmas,
)
from gen_lightning.diffusion.losses import WEIGHTINGS, DiffusionLoss, min_snr_weight
from gen_lightning.diffusion.ode_samplers import EulerSampler, HeunSampler, ODESampler
from gen_lightning.diffusion.parameterization import (
    PREDICTION_TYPES,
    PredictionType,
    eps_from_v,
    eps_from_x0,
    to_x0_and_eps,
    training_target,
    v_from_eps,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from gen_lightning.diffusion.samplers import (
    TIMESTEP_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    Sampler,
    gaussian_noise,
    sample_loop,
    sample_steps,
    spaced_timesteps,
)
from gen_lightning.diffusion.schedule import SCHEDULE_NAMES, NoiseSchedule, rescale_zero_terminal_snr
from gen_lightning.sampler_names import (
    ALL_SAMPLER_NAMES,
    EDM_SAMPLER_NAMES,
    FLOW_SAMPLER_NAMES,
    SAMPLER_NAMES_BY_OBJECTIVE,
    VP_SAMPLER_NAMES,
)

__all__ = [
    "ALL_SAMPLER_NAMES",
    "EDM_SAMPLER_NAMES",
    "FLOW_SAMPLER_NAMES",
    "PREDICTION_TYPES",
    "SAMPLER_NAMES_BY_OBJECTIVE",
    "SCHEDULE_NAMES",
    "TIMESTEP_SPACINGS",
    "TIME_SAMPLINGS",
    "VP_SAMPLER_NAMES",
    "WEIGHTINGS",
    "AutoGuidanceDenoiser",
    "CFGDenoiser",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "DiffusionLoss",
    "EDMEulerSampler",
    "EDMHeunSampler",
    "EDMLoss",
    "EDMPrecond",
    "EulerSampler",
    "FlowEulerSampler",
    "FlowHeunSampler",
    "FlowMatchingLoss",
    "GuidanceInterval",
    "HeunSampler",
    "NoiseSchedule",
    "ODESampler",
    "PredictionType",
    "Sampler",
    "build_edm_sampler",
    "build_flow_sampler",
    "build_sampler",
    "classifier_free_guidance",
    "edm_coefficients",
    "edm_loss_weight",
    "eps_from_v",
    "eps_from_x0",
    "flow_interpolate",
    "flow_velocity",
    "gaussian_noise",
    "karras_sigmas",
    "min_snr_weight",
    "q_posterior_mean_variance",
    "q_sample",
    "rescale_zero_terminal_snr",
    "resolution_shift",
    "sample_flow_time",
    "sample_loop",
    "sample_steps",
    "shift_time",
    "sigma_to_timestep",
    "spaced_timesteps",
    "timestep_to_sigma",
    "to_x0_and_eps",
    "training_target",
    "v_from_eps",
    "v_from_x0_eps",
    "vp_noise_levels",
    "vp_sigmas",
    "x0_from_eps",
    "x0_from_v",
    "x0_from_velocity",
]
