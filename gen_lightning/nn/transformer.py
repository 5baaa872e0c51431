"""Pre-LayerNorm transformer blocks shared by the CLIP towers and the text encoder of latent diffusion (pure torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransformerBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)), attention through `scaled_dot_product_attention` (flash/mem-efficient)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"transformer width {width} is not divisible by heads={heads}")
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).reshape(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + self.proj(h.transpose(1, 2).reshape(n, length, width))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of `layers` blocks; `causal=True` lets token i see tokens ≤ i only (CLIP's text tower)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio) for _ in range(layers))
        # GPT-2/CLIP initialisation: residual projections scaled down with depth so deep stacks start near identity.
        for block in self.blocks:
            nn.init.normal_(block.qkv.weight, std=width**-0.5)
            nn.init.normal_(block.proj.weight, std=(width**-0.5) * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp[0].weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp[2].weight, std=(width**-0.5) * (2 * layers) ** -0.5)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, causal=causal)
        return x
