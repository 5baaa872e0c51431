"""Broadcasting helper shared by the diffusion modules."""

import torch


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample [N] tensor broadcasts over [N, C, H, W] (or any rank)."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"tensor has {x.ndim} dims, more than the target {ndim}")
    return x.reshape(*x.shape, *([1] * missing))
