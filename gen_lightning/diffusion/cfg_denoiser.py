"""Classifier-free guidance (Ho & Salimans 2022) as a module with the samplers' `model(x, t, **extra_args)` call
(k-diffusion's CFGDenoiser): the conditioning, the unconditional conditioning and the weight are keyword arguments,
so one object serves every sampler and every prediction type (eps, v, x0, flow velocity: guidance combines the
outputs linearly either way)."""

from typing import Any

import torch
from torch import nn

from gen_lightning.diffusion.guidance import _cat_context, classifier_free_guidance


class CFGDenoiser(nn.Module):
    """forward(x, t, *, guidance=w, uncond={...}, **cond) = uncond_out + w (cond_out - uncond_out).

    Both branches run as one forward of the doubled batch [x; x] with [cond; uncond] for each keyword (a batch-1
    uncond tensor is repeated; None stays None if both are None). w == 1 or no uncond: the conditional pass alone;
    w == 0: the unconditional pass alone.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        guidance: float = 1.0,
        uncond: dict[str, Any] | None = None,
        **cond: Any,
    ) -> torch.Tensor:
        if guidance == 1 or uncond is None:
            if guidance != 1:
                raise ValueError(f"guidance {guidance} needs the unconditional conditioning (uncond=...)")
            return self.model(x, t, **cond)
        if set(uncond) != set(cond):
            raise ValueError(f"uncond has keys {sorted(uncond)} but cond has {sorted(cond)}")
        if guidance == 0:
            return self.model(x, t, **{key: _match_batch(value, x.shape[0]) for key, value in uncond.items()})
        both = {
            key: None if cond[key] is None and uncond[key] is None else _cat_context(cond[key], uncond[key])
            for key in cond
        }
        cond_out, uncond_out = self.model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return classifier_free_guidance(cond_out, uncond_out, guidance)


def _match_batch(value: Any, n: int) -> Any:
    """A batch-1 tensor (one learned null embedding) repeated to n rows; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.shape[0] == 1 and n != 1:
        return value.expand(n, *value.shape[1:])
    return value
