"""Classifier-free guidance (Ho & Salimans 2022)."""

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def classifier_free_guidance(cond_out: torch.Tensor, uncond_out: torch.Tensor, weight: float) -> torch.Tensor:
    """uncond + w (cond - uncond): w=0 unconditional, w=1 conditional, w>1 extrapolates past the conditional.

    torch.lerp computes exactly this and returns the endpoints bit-exactly at w=0 and w=1.
    """
    return torch.lerp(uncond_out, cond_out, weight)


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
    layer instead of two); with weight == 1 the unconditional branch is skipped since it has no effect.
    """

    def __init__(self, net: nn.Module, weight: float) -> None:
        super().__init__()
        self.net = net
        self.weight = weight

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any], uncond: Mapping[str, Any]
    ) -> torch.Tensor:
        if self.weight == 1:
            return self.net(x, t, **cond)
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), **_cat_context(dict(cond), dict(uncond)))
        cond_out, uncond_out = out.chunk(2)
        return classifier_free_guidance(cond_out, uncond_out, self.weight)


class AutoGuidanceDenoiser(nn.Module):
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): the network's
    output extrapolated away from a weaker network's, `guide + w (net - guide)`, for the samplers.

    The weaker network (an earlier checkpoint of the same run, or a smaller model trained the same way) makes the
    same kinds of errors as the main one, only more of them, so the difference points away from them. Unlike
    classifier-free guidance it needs no condition, so it also guides unconditional models. Both networks take the same
    arguments `(x, t, **cond)` and return the same parameterisation (eps, v, x0, velocity or EDM's denoised image,
    all affine in one another for a given x_t), so the combination is the same in every one of them. With weight == 1
    the weaker network is not called.
    """

    def __init__(self, net: nn.Module, guide: nn.Module, weight: float) -> None:
        super().__init__()
        self.net = net
        self.guide = guide
        self.weight = weight

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        out = self.net(x, t, **cond)
        if self.weight == 1:
            return out
        return classifier_free_guidance(out, self.guide(x, t, **cond), self.weight)
