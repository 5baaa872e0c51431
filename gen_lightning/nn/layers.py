"""Small building blocks shared by the UNet and later encoders/decoders (pure torch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with gcd(channels, max_groups) groups: 32 for multiples of 32, 16 for 48 or 80, 8 for 24 (narrow
    CPU models). Not the largest divisor of `channels` up to max_groups (24 for 48): checkpoints rely on it."""
    groups = math.gcd(channels, max_groups)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch so every block starts as the identity (DDPM/ADM practice)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [N] -> [N, dim], as in the Transformer/DDPM papers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GN-SiLU-conv ×2 with the conditioning embedding applied as a scale/shift of the second norm (ADM's AdaGN).

    emb_dim=0 builds an unconditioned block (autoencoders): no projection, and forward takes no embedding.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels) if emb_dim else None
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("this ResBlock was built with emb_dim > 0 but got no embedding")
            scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


ATTENTION_BACKENDS = ("sdpa", "math")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(QKᵀ/√d)V written out: the reference SDPA is measured against (bench/speed_features.py)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head attention over tokens via `scaled_dot_product_attention` (fused flash / memory-efficient kernels;
    backend="math" writes it out); cross-attention when context_dim is set."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, backend: str = "sdpa") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={heads}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r}: expected one of {ATTENTION_BACKENDS}")
        self.backend = backend
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.out = zero_module(nn.Linear(dim, dim))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, length, dim = x.shape
        q = self.to_q(x)
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)
        q, k, v = (z.reshape(n, -1, self.heads, dim // self.heads).transpose(1, 2) for z in (q, k, v))
        # context_mask: [N, L_ctx] True where a token is real; padding must not receive attention.
        mask = None if context_mask is None else context_mask[:, None, None, :]
        if self.backend == "sdpa":
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            h = math_attention(q, k, v, mask)
        return self.out(h.transpose(1, 2).reshape(n, length, dim))


class SpatialAttention(nn.Module):
    """Self-attention over the H×W positions of a feature map, then optional cross-attention to a context sequence."""

    def __init__(self, channels: int, heads: int, context_dim: int | None = None, backend: str = "sdpa") -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.self_attn = Attention(channels, heads, backend=backend)
        self.cross_norm = nn.LayerNorm(channels) if context_dim else None
        self.cross_attn = Attention(channels, heads, context_dim, backend) if context_dim else None

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # the residual stream
        tokens = tokens + self.self_attn(self.norm(x).flatten(2).transpose(1, 2))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this UNet was built with cross-attention (context_dim set) but got no context")
            tokens = tokens + self.cross_attn(self.cross_norm(tokens), context, context_mask)
        return tokens.transpose(1, 2).reshape(n, c, h, w)


DOWNSAMPLE_PADDINGS = ("same", "ldm")


class Downsample(nn.Module):
    """A stride-2 3×3 convolution. padding "same": one pixel on every side (the UNet's, diffusers' UNet2DModel's);
    "ldm": right and bottom only, as LDM's and diffusers' AutoencoderKL encoders pad, so that such a VAE maps onto
    theirs weight for weight. The parameters are the same either way; only what the convolution sees differs."""

    def __init__(self, channels: int, padding: str = "same") -> None:
        super().__init__()
        if padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f"downsample padding {padding!r}: expected one of {DOWNSAMPLE_PADDINGS}")
        self.pad_right_bottom = padding == "ldm"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.pad_right_bottom else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_right_bottom else x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
