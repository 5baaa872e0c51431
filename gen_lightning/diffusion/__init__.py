"""Pure-torch diffusion math: schedules, forward process, prediction targets, losses, samplers and guidance.

No Lightning and no network weights: usable from a plain script and testable on its own.
"""

from gen_lightning.diffusion.forward import q_posterior_mean_variance, q_sample
from gen_lightning.diffusion.guidance import CFGDenoiser, classifier_free_guidance
from gen_lightning.diffusion.losses import WEIGHTINGS, DiffusionLoss, min_snr_weight
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
    SAMPLER_NAMES,
    TIMESTEP_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    make_sampler,
    sample_loop,
    sample_steps,
    spaced_timesteps,
)
from gen_lightning.diffusion.schedule import SCHEDULE_NAMES, NoiseSchedule, rescale_zero_terminal_snr

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLER_NAMES",
    "SCHEDULE_NAMES",
    "TIMESTEP_SPACINGS",
    "WEIGHTINGS",
    "CFGDenoiser",
    "DDIMSampler",
    "DDPMSampler",
    "DiffusionLoss",
    "NoiseSchedule",
    "PredictionType",
    "classifier_free_guidance",
    "eps_from_v",
    "eps_from_x0",
    "make_sampler",
    "min_snr_weight",
    "q_posterior_mean_variance",
    "q_sample",
    "rescale_zero_terminal_snr",
    "sample_loop",
    "sample_steps",
    "spaced_timesteps",
    "to_x0_and_eps",
    "training_target",
    "v_from_eps",
    "v_from_x0_eps",
    "x0_from_eps",
    "x0_from_v",
]
