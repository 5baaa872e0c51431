from gen_lightning.nn.ema import EMA
from gen_lightning.nn.unet import UNet, UNetConfig

__all__ = ["EMA", "UNet", "UNetConfig"]
