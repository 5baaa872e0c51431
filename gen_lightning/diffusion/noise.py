"""The training noise of every objective, with optional offset noise.

Offset noise (Guttenberg 2023, "Diffusion with offset noise"; DIAMOND's sigma_offset_noise) adds one Gaussian value per
sample and channel to the per-pixel noise. Per-pixel noise barely touches an image's mean (its variance per channel is
1 / pixels), so a model trained on it learns to keep the mean of x_T: a sample whose whole background must change
colour is hard to produce. The offset term lets training see, and the model learn to undo, shifts of the whole image.
"""

import torch


def channel_offsets(
    shape: torch.Size | tuple[int, ...],
    offset: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor | float:
    """offset * N(0, 1) per sample and channel, [N, C, 1, ...] broadcastable to `shape`; 0.0 (nothing drawn) when
    offset is 0, so runs without offset noise draw exactly the random numbers they drew before the option."""
    if offset < 0:
        raise ValueError(f"offset noise must be >= 0, got {offset}")
    if offset == 0:
        return 0.0
    per_channel = (*shape[:2], *[1] * (len(shape) - 2))
    return offset * torch.randn(per_channel, generator=generator, device=device, dtype=dtype)


def training_noise(
    shape: torch.Size | tuple[int, ...],
    offset: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """N(0, I) of `shape` [N, C, ...] plus channel_offsets, drawn after it from the same generator."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return noise + channel_offsets(shape, offset, generator, device, dtype)
