from gen_lightning.nn.dit import DiT, DiTBlock, DiTConfig, dit_forward_flops
from gen_lightning.nn.ema import EMA
from gen_lightning.nn.unet import UNet, UNetConfig

__all__ = ["EMA", "DiT", "DiTBlock", "DiTConfig", "UNet", "UNetConfig", "dit_forward_flops"]
