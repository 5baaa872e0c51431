"""The world model's one network (pure torch): a UNet or a DiT (held as `unet`, the name its checkpoint keys keep)
that sees the noisy next frame concatenated with the context frames and the pointer channels, and the action (with
the context-noise level) through its `cond` embedding (the DiT's adaLN input).

    net(x_t, t, frames=[N, K, 3, H, W] (already noised), action=[N, A], noise_level=[N]) -> prediction [N, 3, H, W]

The action layout is gen_lightning.actions' encoding: x, y, button, click first (read here by index, so nn stays
free of project imports).
"""

from __future__ import annotations

import torch
from torch import nn

from gen_lightning.nn.dit import DiT
from gen_lightning.nn.unet import UNet

X, Y, BUTTON, CLICK = 0, 1, 2, 3  # positions in the encoded action (gen_lightning.actions.encode_action)


def cursor_map(action: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """[N, 1, H, W] Gaussian bumps (peak 1) centred on each action's cursor tip pixel (actions.cursor_pixel)."""
    tip_x = (action[:, X] * width).floor().clamp(max=width - 1)
    tip_y = (action[:, Y] * height).floor().clamp(max=height - 1)
    xs = torch.arange(width, device=action.device, dtype=action.dtype)
    ys = torch.arange(height, device=action.device, dtype=action.dtype)
    dx = (xs[None, :] - tip_x[:, None]).pow(2)  # [N, W]
    dy = (ys[None, :] - tip_y[:, None]).pow(2)  # [N, H]
    return torch.exp(-(dy[:, :, None] + dx[:, None, :]) / (2 * sigma**2))[:, None]


class WorldUNet(nn.Module):
    """Owns the conditioning (context concatenation, cursor maps, action embedding) and no parameter of its own: the
    action embedding is the UNet's `cond_proj`, so the UNet's parameters keep their order (optimizer state).

    Args:
        unet: in_channels = 3 (next frame) + 3·K (context) + pointer channels; cond_dim = action size + 1.
        click_maps: two more pointer channels, the bump where the button is held and where it was clicked.
        cursor_sigma: width in pixels of the cursor bump.
        channels_last: NHWC input (the UNet was converted to it).
    """

    def __init__(self, unet: UNet | DiT, *, click_maps: bool, cursor_sigma: float, channels_last: bool = False) -> None:
        super().__init__()
        self.unet = unet
        self.click_maps, self.cursor_sigma, self.channels_last = click_maps, cursor_sigma, channels_last

    def conditioning(
        self, frames: torch.Tensor, action: torch.Tensor, noise_level: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(channels concatenated to x_t, cond vector) for context frames that already carry `noise_level`."""
        height, width = frames.shape[-2:]
        bump = cursor_map(action, height, width, self.cursor_sigma).to(frames.dtype)
        pointer = [bump]
        if self.click_maps:
            held, clicked = (action[:, i].to(frames.dtype).view(-1, 1, 1, 1) for i in (BUTTON, CLICK))
            pointer += [bump * held, bump * clicked]
        spatial = torch.cat([frames.flatten(1, 2), *pointer], 1)
        cond = torch.cat([action, noise_level[:, None]], 1).to(frames.dtype)
        return spatial, cond

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, *, frames: torch.Tensor, action: torch.Tensor, noise_level: torch.Tensor
    ) -> torch.Tensor:
        spatial, cond = self.conditioning(frames, action, noise_level)
        if self.channels_last:
            spatial = spatial.contiguous(memory_format=torch.channels_last)
        return self.unet(torch.cat([x, spatial.to(x.dtype)], 1), t, cond=cond)
