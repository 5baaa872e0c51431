"""An LDM/Stable-Diffusion-style convolutional VAE: Encoder -> DiagonalGaussian posterior -> Decoder (pure torch).

Each level of `channels` halves H and W, so the latent is (latent_channels, H / f, W / f) with f = 2**(len(channels)-1).
The blocks are the UNet's (ResBlock without a conditioning embedding, Downsample, Upsample, SpatialAttention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gen_lightning.nn.config import NetConfig
from gen_lightning.nn.layers import DOWNSAMPLE_PADDINGS, Downsample, ResBlock, SpatialAttention, Upsample, group_norm


@dataclass
class AutoencoderConfig(NetConfig):
    """Shape of the autoencoder. `channels[i]` is the width at level i (level 0: full resolution).

    num_res_blocks: ResBlocks per encoder level (the decoder has one more per level, as in LDM).
    mid_attention: single-scale self-attention between the two middle ResBlocks of encoder and decoder.
    downsample: the encoder's padding before each stride-2 convolution (nn.layers.Downsample). "ldm" (right and
        bottom only) makes the autoencoder the same function as diffusers' AutoencoderKL with the same weights, so
        `gen-lightning export --format diffusers` can write it; "same" (all sides) is the layout of gen_lightning's
        VAEs before it, which their checkpoints keep (models.checkpoint_format).
    """

    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int = 1
    latent_channels: int = 4
    mid_attention: bool = True
    num_heads: int = 1
    dropout: float = 0.0
    downsample: str = "ldm"


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from the encoder's [N, 2C, h, w] output (mean first, as in LDM).

    logvar is clamped to [-30, 20] like LDM's DiagonalGaussianDistribution: exp() of an untrained encoder's output
    must neither overflow nor give a zero variance whose log is -inf in the KL. Kept in fp32 for the same reason.
    """

    def __init__(self, parameters: torch.Tensor) -> None:
        mean, logvar = parameters.float().chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise  # reparameterised: gradients flow to mean and logvar

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) in nats, summed over all latent dimensions: one value per sample, shape [N]."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(dim=1)


def _mid_block(ch: int, config: AutoencoderConfig) -> nn.Sequential:
    layers: list[nn.Module] = [ResBlock(ch, ch, dropout=config.dropout)]
    if config.mid_attention:
        layers.append(SpatialAttention(ch, config.num_heads))
    layers.append(ResBlock(ch, ch, dropout=config.dropout))
    return nn.Sequential(*layers)


def _out_head(ch: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))


class Encoder(nn.Module):
    """images [N, C, H, W] -> posterior parameters [N, 2 * latent_channels, H / f, W / f]."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        widths = config.channels
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers.append(ResBlock(ch, width, dropout=config.dropout))
                ch = width
            if level < len(widths) - 1:
                layers.append(Downsample(ch, config.downsample))
        self.down = nn.Sequential(*layers)
        self.mid = _mid_block(ch, config)
        self.out = _out_head(ch, 2 * config.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.down(self.conv_in(x))))


class Decoder(nn.Module):
    """latents [N, latent_channels, h, w] -> images [N, C, h * f, w * f] (unbounded: the likelihood's mean)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        widths = config.channels
        ch = widths[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, ch, 3, padding=1)
        self.mid = _mid_block(ch, config)
        layers: list[nn.Module] = []
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResBlock(ch, width, dropout=config.dropout))
                ch = width
            if level > 0:
                layers.append(Upsample(ch))
        self.up = nn.Sequential(*layers)
        self.out = _out_head(ch, config.in_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(self.mid(self.conv_in(z))))


class Autoencoder(nn.Module):
    """Encoder + decoder as one module, so an EMA copy or a frozen first stage is a single object."""

    def __init__(self, config: AutoencoderConfig | dict[str, Any]) -> None:
        super().__init__()
        config = AutoencoderConfig.coerce(config)
        if not config.channels:
            raise ValueError("autoencoder.channels must name at least one level")
        if config.downsample not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f"autoencoder.downsample={config.downsample!r}: expected one of {DOWNSAMPLE_PADDINGS}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.downsample_factor = 2 ** (len(config.channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (self.config.latent_channels, image_size // self.downsample_factor, image_size // self.downsample_factor)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} must be divisible by {self.downsample_factor} "
                f"({len(self.config.channels)} autoencoder levels)"
            )
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(decoder mean for one posterior sample, posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


# The first stage always runs in fp32, whatever the caller's precision: a VAE in fp16 overflows (a known Stable
# Diffusion failure), and bf16 loses the precision the latents need. Hence autocast off around both directions.
@torch.no_grad()
def encode_fp32(
    autoencoder: Autoencoder, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images in [-1, 1] -> fp32 latents: the posterior mode, or a posterior sample."""
    with torch.autocast(images.device.type, enabled=False):
        posterior = autoencoder.encode(images.float())
        return posterior.sample(generator) if sample else posterior.mode()


@torch.no_grad()
def decode_fp32(autoencoder: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> fp32 images clamped to [-1, 1]."""
    with torch.autocast(latents.device.type, enabled=False):
        return autoencoder.decode(latents.float()).clamp(-1, 1)
