"""Classifier-free guidance (Ho & Salimans 2022), autoguidance (Karras et al. 2024), and the guidance interval
(Kynkäänniemi et al. 2024) that limits either to the middle noise levels."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def classifier_free_guidance(cond_out: torch.Tensor, uncond_out: torch.Tensor, weight: float) -> torch.Tensor:
    """uncond + w (cond - uncond): w=0 unconditional, w=1 conditional, w>1 extrapolates past the conditional.

    torch.lerp computes exactly this and returns the endpoints bit-exactly at w=0 and w=1.
    """
    return torch.lerp(uncond_out, cond_out, weight)


@dataclass(frozen=True)
class GuidanceInterval:
    """Guide only at noise levels low < sigma <= high (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited
    Interval Improves Sample and Distribution Quality in Diffusion Models"): at high noise guidance pulls every
    sample toward the same few layouts, and at low noise it does little but sharpen, so outside the interval the
    model runs unguided (and the second network call is skipped). sigma is EDM's noise-to-signal ratio, the same axis
    for every objective (a model's `noise_level`); the paper's interval for EDM2 is (0.28, 5.42]."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"guidance interval ({self.low}, {self.high}]: need 0 <= low < high (sigmas)")

    def contains(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma > self.low) & (sigma <= self.high)


# The denoisers' `guided_at(t)`: per sample, whether guidance applies at the network's time argument t.
GuidedAt = Callable[[torch.Tensor], torch.Tensor]


def _guided_samples(weight: float, guided_at: GuidedAt | None, t: torch.Tensor) -> torch.Tensor | None:
    """A per-sample bool mask of where the guidance applies, or None where it applies to no sample (weight 1, or
    t outside the interval): then the second network call is skipped."""
    if weight == 1:
        return None
    if guided_at is None:
        return torch.ones(t.numel() or 1, dtype=torch.bool, device=t.device)
    mask = guided_at(t).reshape(-1).to(t.device)
    return mask if bool(mask.any()) else None


def _where(mask: torch.Tensor, guided: torch.Tensor, unguided: torch.Tensor) -> torch.Tensor:
    if bool(mask.all()):
        return guided
    return torch.where(mask.view(-1, *[1] * (guided.dim() - 1)), guided, unguided)


def _cat_context(cond: Any, uncond: Any) -> Any:
    """Stack [cond; uncond] along the batch; a batch-1 uncond (one learned null embedding) is repeated to match.
    An argument that is None in both branches (an absent mask) stays None."""
    if cond is None and uncond is None:
        return None
    if isinstance(cond, torch.Tensor):
        if uncond.shape[0] == 1 and cond.shape[0] != 1:
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
        return torch.cat([cond, uncond.to(cond.device, cond.dtype)])
    if isinstance(cond, dict):
        if set(cond) != set(uncond):
            raise ValueError(f"uncond has keys {sorted(uncond)} but cond has {sorted(cond)}")
        return {k: _cat_context(cond[k], uncond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_cat_context(c, u) for c, u in zip(cond, uncond, strict=True))
    raise TypeError(f"cannot batch a context of type {type(cond).__name__}; use tensors (or dicts/lists of them)")


class CFGDenoiser(nn.Module):
    """A guided network for the samplers (k-diffusion's CFGDenoiser): called as `denoiser(x, t, cond=..., uncond=...)`
    with the keyword arguments of `net(x_t, t, **cond)` for the conditional and the unconditional branch.

    Both branches run as one forward pass of the doubled batch [x; x] with [cond; uncond] (one kernel launch per
    layer instead of two); with weight == 1, or where `guided_at(t)` (a guidance interval) is false for every
    sample, the unconditional branch is skipped since it has no effect.
    """

    def __init__(self, net: nn.Module, weight: float, guided_at: GuidedAt | None = None) -> None:
        super().__init__()
        self.net = net
        self.weight = weight
        self.guided_at = guided_at

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any], uncond: Mapping[str, Any]
    ) -> torch.Tensor:
        mask = _guided_samples(self.weight, self.guided_at, t)
        if mask is None:
            return self.net(x, t, **cond)
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), **_cat_context(dict(cond), dict(uncond)))
        cond_out, uncond_out = out.chunk(2)
        return _where(mask, classifier_free_guidance(cond_out, uncond_out, self.weight), cond_out)


class AutoGuidanceDenoiser(nn.Module):
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): the network's
    output extrapolated away from a weaker network's, `guide + w (net - guide)`, for the samplers.

    The weaker network (an earlier checkpoint of the same run, or a smaller model trained the same way) makes the
    same kinds of errors as the main one, only more of them, so the difference points away from them. Unlike
    classifier-free guidance it needs no condition, so it also guides unconditional models. Both networks take the same
    arguments `(x, t, **cond)` and return the same parameterisation (eps, v, x0, velocity or EDM's denoised image,
    all affine in one another for a given x_t), so the combination is the same in every one of them. With weight == 1,
    or where `guided_at(t)` (a guidance interval) is false for every sample, the weaker network is not called.
    """

    def __init__(self, net: nn.Module, guide: nn.Module, weight: float, guided_at: GuidedAt | None = None) -> None:
        super().__init__()
        self.net = net
        self.guide = guide
        self.weight = weight
        self.guided_at = guided_at

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        out = self.net(x, t, **cond)
        mask = _guided_samples(self.weight, self.guided_at, t)
        if mask is None:
            return out
        return _where(mask, classifier_free_guidance(out, self.guide(x, t, **cond), self.weight), out)
