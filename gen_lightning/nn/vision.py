"""A small Vision Transformer image tower for CLIP (pure torch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gen_lightning.nn.config import NetConfig
from gen_lightning.nn.layers import group_norm
from gen_lightning.nn.transformer import Transformer


@dataclass
class VisionConfig(NetConfig):
    """ViT shape. `stem="conv"` replaces the single patchifying convolution with stride-2 3×3 convolutions (Xiao et
    al. 2021, "Early convolutions help transformers see better"): it trains faster and more stably on small data.
    The stem uses GroupNorm, not BatchNorm: per-rank batch statistics would make a DDP step differ from a
    single-process step on the same global batch."""

    image_size: int = 32
    patch_size: int = 4
    width: int = 256
    layers: int = 4
    heads: int = 4
    stem: str = "conv"


def _conv_stem(width: int, patch_size: int) -> nn.Sequential:
    if patch_size & (patch_size - 1):
        raise ValueError(f"vision.stem='conv' needs a power-of-two patch_size, got {patch_size}")
    layers: list[nn.Module] = []
    channels = 3
    for level in range(patch_size.bit_length() - 1):
        out = max(width // 2 ** (patch_size.bit_length() - 2 - level), 32)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), group_norm(out), nn.GELU()]
        channels = out
    layers.append(nn.Conv2d(channels, width, 1))
    return nn.Sequential(*layers)


class VisionTransformer(nn.Module):
    """Images float [-1, 1] NCHW -> pooled class-token state [N, width]. Other sizes are resized to image_size."""

    def __init__(self, config: VisionConfig | dict) -> None:
        super().__init__()
        self.config = config = VisionConfig.coerce(config)
        if config.image_size % config.patch_size:
            raise ValueError(f"vision.image_size={config.image_size} is not a multiple of patch_size")
        if config.stem == "conv":
            self.stem: nn.Module = _conv_stem(config.width, config.patch_size)
        elif config.stem == "patch":
            self.stem = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size)
        else:
            raise ValueError(f"vision.stem={config.stem!r}: expected 'conv' or 'patch'")
        tokens = (config.image_size // config.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.randn(config.width) * config.width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(tokens + 1, config.width) * config.width**-0.5)
        self.ln_pre = nn.LayerNorm(config.width)
        self.transformer = Transformer(config.width, config.layers, config.heads)
        self.ln_post = nn.LayerNorm(config.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = self.stem(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding)
        return self.ln_post(self.transformer(x)[:, 0])
