"""Exponential moving average of a module's weights, with the warm-up that short runs need.

A fixed decay of 0.999 after 1,000 steps still holds (0.999^1000 ≈ 0.37) a third of the random initial weights, so
samples from it are noise. As diffusers' EMAModel and k-diffusion do, the decay grows with the step:
    decay(step) = min(max_decay, 1 - (1 + step / inv_gamma) ** -power)
power=2/3 suits runs of ~1e4-1e5 steps (decay 0.99 at step 1k, 0.999 at step 31k); power=3/4 longer runs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(step: int, max_decay: float = 0.9999, power: float = 2 / 3, inv_gamma: float = 1.0) -> float:
    if step <= 0:
        return 0.0
    return max(0.0, min(max_decay, 1.0 - (1.0 + step / inv_gamma) ** -power))


class EMA(nn.Module):
    """Holds a frozen copy of `model` as a submodule, so it is saved in and restored from checkpoints with the model."""

    def __init__(self, model: nn.Module, max_decay: float = 0.9999, power: float = 2 / 3, inv_gamma: float = 1.0):
        super().__init__()
        self.shadow = copy.deepcopy(model).requires_grad_(False)
        self.max_decay = max_decay
        self.power = power
        self.inv_gamma = inv_gamma
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        decay = ema_decay(int(self.num_updates), self.max_decay, self.power, self.inv_gamma)
        # Frozen parameters (a pretrained text tower) never move, so their lerp would be a + w·(a - a) = a: skipped,
        # which saves a lerp over ~10^8 elements per step for Stable Diffusion's CLIP.
        pairs = [(s, p) for s, p in zip(self.shadow.parameters(), model.parameters(), strict=True) if p.requires_grad]
        if pairs:
            torch._foreach_lerp_([s for s, _ in pairs], [p.detach().to(s.dtype) for s, p in pairs], 1.0 - decay)
        for s_buf, m_buf in zip(self.shadow.buffers(), model.buffers(), strict=True):
            s_buf.copy_(m_buf)
        self.num_updates += 1
        return decay

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """The shadow becomes an exact copy of `model`'s current weights (sampling from the raw weights)."""
        for s_param, m_param in zip(self.shadow.parameters(), model.parameters(), strict=True):
            s_param.copy_(m_param)
        for s_buf, m_buf in zip(self.shadow.buffers(), model.buffers(), strict=True):
            s_buf.copy_(m_buf)

    def forward(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)
