"""A DDPM/ADM-style UNet: residual blocks, group norm, sinusoidal time embedding, SDPA self-attention at chosen
levels, and optional cross-attention to a context sequence (text tokens) for latent text-to-image diffusion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gen_lightning.nn.config import NetConfig
from gen_lightning.nn.layers import Downsample, ResBlock, SpatialAttention, Upsample, group_norm, timestep_embedding

RES, ATTENTION, PLAIN = "res", "attention", "plain"  # a layer takes (h, emb) / (h, context, mask) / (h)


class LayerBlock(nn.ModuleList):
    """Layers run in turn, each with what its kind takes. The kinds are kept beside the layers (and survive deepcopy
    for the EMA): FSDP and other wrappers hide the layers' classes, so dispatching on isinstance would break."""

    def __init__(self, *layers: tuple[str, nn.Module]) -> None:
        super().__init__(layer for _, layer in layers)
        self.kinds = tuple(kind for kind, _ in layers)


@dataclass
class UNetConfig(NetConfig):
    """Shape of the UNet. `channels[i]` is the width at level i (level 0: full resolution; each level halves H, W).

    attention_levels: indices of the levels that get self-attention (and cross-attention when context_dim is set);
    the middle block always has attention. cond_dim: width of an extra per-sample embedding added to the time
    embedding (actions, classes); 0 disables it. attention: "sdpa" (torch's fused scaled_dot_product_attention) or
    "math" (written out; for comparison). gradient_checkpointing: recompute block activations in backward.
    patch_size: p > 1 folds each p×p patch of pixels into channels before the first convolution and unfolds the
    output the same way (pixel unshuffle / shuffle, as Simple Diffusion's UNets and the DiT's patches do), so level 0
    runs at 1/p of the resolution: ~p² less compute there and a p× wider receptive field, with every output pixel
    still its own value.
    """

    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (64, 128, 128)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (1,)
    num_heads: int = 4
    dropout: float = 0.0
    context_dim: int | None = None
    cond_dim: int = 0
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    patch_size: int = 1


class UNet(nn.Module):
    """eps/v/x0 predictor: forward(x [N,C,H,W], t [N], context [N,L,D] | None, cond [N,cond_dim] | None)."""

    def __init__(self, config: UNetConfig | dict[str, Any]) -> None:
        super().__init__()
        config = UNetConfig.coerce(config)
        self.config = config
        widths = config.channels
        bad_levels = [lvl for lvl in config.attention_levels if not 0 <= lvl < len(widths)]
        if bad_levels:
            raise ValueError(f"unet.attention_levels {bad_levels} out of range for {len(widths)} levels")
        if config.patch_size < 1:
            raise ValueError(f"unet.patch_size={config.patch_size}: must be >= 1")
        patch_area = config.patch_size**2
        emb_dim = 4 * widths[0]
        self.time_mlp = nn.Sequential(nn.Linear(widths[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_proj = nn.Linear(config.cond_dim, emb_dim) if config.cond_dim else None
        self.stem = nn.Conv2d(config.in_channels * patch_area, widths[0], 3, padding=1)

        def attention(ch: int) -> SpatialAttention:
            return SpatialAttention(ch, config.num_heads, config.context_dim, config.attention)

        def res_block(ch_in: int, ch_out: int, level: int) -> LayerBlock:
            layers = [(RES, ResBlock(ch_in, ch_out, emb_dim, config.dropout))]
            if level in config.attention_levels:
                layers.append((ATTENTION, attention(ch_out)))
            return LayerBlock(*layers)

        self.down = nn.ModuleList()
        skip_widths = [widths[0]]
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                self.down.append(res_block(ch, width, level))
                ch = width
                skip_widths.append(ch)
            if level < len(widths) - 1:
                self.down.append(LayerBlock((PLAIN, Downsample(ch))))
                skip_widths.append(ch)

        self.mid = LayerBlock(
            (RES, ResBlock(ch, ch, emb_dim, config.dropout)),
            (ATTENTION, attention(ch)),
            (RES, ResBlock(ch, ch, emb_dim, config.dropout)),
        )

        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(res_block(ch + skip_widths.pop(), width, level))
                ch = width
            if level > 0:
                self.up.append(LayerBlock((PLAIN, Upsample(ch))))

        self.out_norm = group_norm(ch)
        self.out_conv = nn.Conv2d(ch, config.out_channels * patch_area, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        self.downsample_factor = config.patch_size * 2 ** (len(widths) - 1)

    def _run(
        self,
        block: LayerBlock,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        for kind, layer in zip(block.kinds, block, strict=True):
            if kind == RES:
                h = layer(h, emb)
            elif kind == ATTENTION:
                h = layer(h, context, context_mask)
            else:
                h = layer(h)
        return h

    def _block(self, block: LayerBlock, h: torch.Tensor, emb: torch.Tensor, context, context_mask) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute activations in backward: trades ~30% more compute for much less memory on large UNets.
            return checkpoint(self._run, block, h, emb, context, context_mask, use_reentrant=False)
        return self._run(block, h, emb, context, context_mask)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} must be divisible by {self.downsample_factor} "
                f"({len(self.config.channels)} UNet levels, patch_size {self.config.patch_size})"
            )
        emb = self.time_mlp(timestep_embedding(t, self.config.channels[0]))
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("this UNet was built with cond_dim > 0 but got no cond embedding")
            emb = emb + self.cond_proj(cond)
        h = self.stem(F.pixel_unshuffle(x, self.config.patch_size) if self.config.patch_size > 1 else x)
        skips = [h]
        for block in self.down:
            h = self._block(block, h, emb, context, context_mask)
            skips.append(h)
        h = self._block(self.mid, h, emb, context, context_mask)
        for block in self.up:
            if block.kinds[0] == RES:  # residual blocks take the skip; an upsampling block does not
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._block(block, h, emb, context, context_mask)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(out, self.config.patch_size) if self.config.patch_size > 1 else out
