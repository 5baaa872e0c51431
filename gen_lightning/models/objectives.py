"""A diffusion model's training objective, chosen by `model.objective`, and the options that belong to each.

- "vp": the discrete variance-preserving schedule with an eps / v / x0 target (DiffusionLoss); sampled by DDIM, DDPM,
  DPM-Solver++, Euler or Heun.
- "flow": rectified flow (FlowMatchingLoss): straight paths, velocity target, uniform or logit-normal times with an
  optional shift; sampled by flow_euler or flow_heun with the same shift.
- "edm": Karras et al. 2022 (EDMLoss): the trained network is EDMPrecond around the network that holds the backbone,
  so it is called as net(x, sigma, **cond) and returns the x0 estimate; ln sigma ~ N(p_mean, p_std^2) in training;
  sampled by edm_euler or edm_heun on Karras sigmas (sigma_min, sigma_max, rho). Its state-dict keys gain `inner.`
  (net.inner.*, ema.shadow.inner.*); vp and flow networks are not wrapped, so their checkpoints are unchanged.

An option of the other objective set away from its default would be silently ignored, so it is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from gen_lightning.diffusion import DiffusionLoss, EDMLoss, EDMPrecond, FlowMatchingLoss, NoiseSchedule
from gen_lightning.errors import UserInputError
from gen_lightning.sampler_names import SAMPLER_NAMES_BY_OBJECTIVE

OBJECTIVES = tuple(SAMPLER_NAMES_BY_OBJECTIVE)
DEFAULT_SAMPLER = {"vp": "ddim", "flow": "flow_euler", "edm": "edm_heun"}  # edm_heun: EDM's Algorithm 1
# Each objective's own options and their defaults (DiffusionModel's arguments of the same names).
OPTIONS = {
    "vp": {
        "schedule": "linear",
        "num_timesteps": 1000,
        "zero_terminal_snr": False,
        "prediction_type": "epsilon",
        "loss_weighting": "uniform",
        "min_snr_gamma": 5.0,
        "eta": 0.0,
    },
    "flow": {"time_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "time_shift": 1.0},
    # sigma_data None: the model's own default_sigma_data (0.5 for pixels in [-1, 1], 1 for unit-variance latents).
    "edm": {"sigma_data": None, "p_mean": -1.2, "p_std": 1.2, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
}


def check_objective(objective: str, options: Mapping[str, Any]) -> None:
    """Refuse an unknown objective, or an option of another objective set away from its default."""
    if objective not in OBJECTIVES:
        raise UserInputError(f"model.objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    for other, defaults in OPTIONS.items():
        changed = [key for key, default in defaults.items() if other != objective and options[key] != default]
        if changed:
            key = changed[0]
            raise UserInputError(
                f"model.{key}={options[key]!r} is an option of model.objective={other!r}, but this model's objective "
                f"is {objective!r}: leave model.{key} unset, or set model.objective={other}"
            )


def objective_loss(objective: str, options: Mapping[str, Any], schedule: NoiseSchedule) -> Any:
    """The training loss, called as loss(net, x0, generator=, pixel_weight=, extra_args=) whatever the objective."""
    offset = options.get("offset_noise", 0.0)  # every objective's option; absent from older checkpoints
    if objective == "flow":
        return FlowMatchingLoss(
            options["time_sampling"], options["logit_mean"], options["logit_std"], options["time_shift"],
            offset_noise=offset,
        )  # fmt: skip
    if objective == "edm":
        return EDMLoss(options["p_mean"], options["p_std"], options["sigma_data"], offset_noise=offset)
    return DiffusionLoss(
        schedule, options["prediction_type"], options["loss_weighting"], options["min_snr_gamma"], offset_noise=offset
    )


def objective_network(objective: str, options: Mapping[str, Any], network: nn.Module) -> nn.Module:
    """The network this objective trains around `network` (the one holding the backbone, net(x_t, t, **cond)):
    EDMPrecond(network) for edm (keys under `inner.`, conditioning passed through as keyword arguments), else
    `network` itself."""
    if objective == "edm":
        # The coefficients see the offset noise's variance (DIAMOND), in training and sampling alike.
        return EDMPrecond(network, sigma_data=options["sigma_data"], offset_noise=options.get("offset_noise", 0.0))
    return network


def inner_network(net: nn.Module) -> nn.Module:
    """The network that holds the backbone and the conditioning (TextConditionedUNet, WorldUNet, the backbone): the
    one inside an edm model's EDMPrecond, or `net` itself (vp, flow). Works on `net` and on its EMA copy alike."""
    return net.inner if isinstance(net, EDMPrecond) else net


def check_sampler_name(objective: str, name: str) -> None:
    """A sampler name (model.sampler, a callback's sampler, --sampler) must read this objective's network output."""
    valid = SAMPLER_NAMES_BY_OBJECTIVE[objective]
    if name in valid:
        return
    owner = next((other for other, names in SAMPLER_NAMES_BY_OBJECTIVE.items() if name in names), None)
    what = f"sampler {name!r} integrates model.objective={owner!r}" if owner else f"unknown sampler {name!r}"
    raise UserInputError(
        f"{what}, and this model was trained with model.objective={objective!r} (sampler given by model.sampler, "
        f"--sampler or a callback's sampler); valid: {', '.join(valid)}"
    )


def check_sampler_object(objective: str, sampler: Any) -> None:
    if sampler.objective != objective:
        raise UserInputError(
            f"{type(sampler).__name__} samples model.objective={sampler.objective!r}, but this model was trained "
            f"with model.objective={objective!r}"
        )
