"""The denoising network a diffusion model trains, chosen by `model.backbone`: the UNet or the DiT (Peebles & Xie
2023). Both take `net(x, t, context, context_mask, cond)`, so the conditioned wrappers (text, world model) hold either.

What the model fixes about the network (input and output channels, the text width it cross-attends to, the width of
its per-sample cond vector) is set on the UNet config by each model and carried over to the DiT's; the DiT's own
options are its shape: patch size, width, depth, heads, mlp ratio, position embedding, gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from gen_lightning.errors import UserInputError
from gen_lightning.nn.dit import DiT, DiTConfig
from gen_lightning.nn.unet import UNet, UNetConfig

BACKBONES = ("unet", "dit")


def dit_config_for(unet_config: UNetConfig, dit: DiTConfig | dict[str, Any] | None, input_size: int) -> DiTConfig:
    """The DiT config with the model's fixed fields taken from the UNet config (and the input side for a learned
    position embedding)."""
    return replace(
        DiTConfig.coerce(dit if dit is not None else DiTConfig()),
        in_channels=unet_config.in_channels,
        out_channels=unet_config.out_channels,
        context_dim=unet_config.context_dim,
        cond_dim=unet_config.cond_dim,
        input_size=input_size,
    )


def build_backbone(
    backbone: str, unet_config: UNetConfig, dit: DiTConfig | dict[str, Any] | None, input_size: int
) -> tuple[nn.Module, DiTConfig | None]:
    """(the network, the DiT config it was built with or None for the UNet)."""
    if backbone not in BACKBONES:
        raise UserInputError(f"model.backbone={backbone!r}: expected one of {', '.join(BACKBONES)}")
    if backbone == "unet":
        if dit is not None:
            raise UserInputError(
                "model.dit is set but model.backbone='unet': set model.backbone=dit, or drop model.dit"
            )
        return UNet(unet_config), None
    dit_config = dit_config_for(unet_config, dit, input_size)
    if dit_config.learn_sigma:  # the extra output channels would meet a loss that has no variance term
        raise UserInputError("model.dit.learn_sigma: no objective here learns the variance; leave it false")
    return DiT(dit_config), dit_config
