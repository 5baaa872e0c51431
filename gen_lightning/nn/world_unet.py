"""The world model's one network (pure torch): a UNet or a DiT (held as `unet`, the name its checkpoint keys keep)
that sees the noisy next frame concatenated with the context frames and the pointer channels, and the action (with
the context-noise level) through its `cond` embedding (the DiT's adaLN input).

    net(x_t, t, frames=[N, K, 3, H, W] (already noised), action=[N, A], noise_level=[N]) -> prediction [N, 3, H, W]

The action layout is gen_lightning.actions' encoding: x, y, button, click first, then the key's one-hot with "no key"
first (read here by index, so nn stays free of project imports).

Key kernels (`key_kernels` = m > 0): a pressed key draws something of its own (a typed glyph) at a place the screen
shows (the caret), and a global embedding is a poor way to carry a shape: through the cond embedding the network has
to rebuild each glyph from per-channel scales and shifts. Here the network draws m extra "where" maps beside the
prediction, and each key owns m learned k×k kernels per image channel: the prediction gets the maps convolved with
the pressed key's kernels added (a dynamic filter, as in Jia et al. 2016's dynamic filter networks), so "which
shape" is a learned stamp and the network only has to say where. No key, no stamp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gen_lightning.nn.dit import DiT
from gen_lightning.nn.unet import UNet

X, Y, BUTTON, CLICK = 0, 1, 2, 3  # positions in the encoded action (gen_lightning.actions.encode_action)
KEY_ONE_HOT = 4  # the key's one-hot starts here, "no key" first


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
    """Owns the conditioning (context concatenation, cursor maps, action embedding). The action embedding is the
    UNet's `cond_proj`; the one parameter of its own, the key kernels (when asked for), is registered after the
    UNet, so the UNet's parameters keep their order (optimizer state).

    Args:
        unet: in_channels = 3 (next frame) + 3·K (context) + pointer channels; out_channels = 3 + key_kernels;
            cond_dim = action size + 1.
        click_maps: two more pointer channels, the bump where the button is held and where it was clicked.
        cursor_sigma: width in pixels of the cursor bump.
        channels_last: NHWC input (the UNet was converted to it).
        key_kernels / key_kernel_size / num_keys: m "where" maps stamped with the pressed key's k×k kernels (see the
            module docstring); num_keys counts the keys of the action's one-hot, "no key" included. 0: off.
    """

    def __init__(
        self,
        unet: UNet | DiT,
        *,
        click_maps: bool,
        cursor_sigma: float,
        channels_last: bool = False,
        key_kernels: int = 0,
        key_kernel_size: int = 9,
        num_keys: int = 0,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.click_maps, self.cursor_sigma, self.channels_last = click_maps, cursor_sigma, channels_last
        self.key_kernels, self.key_kernel_size = key_kernels, key_kernel_size
        if key_kernels:
            # One row per real key ("no key" has none: it stamps nothing). Small random weights: with zeros, neither
            # the kernels nor the zero-initialised maps would ever get a gradient.
            self.key_kernel = nn.Parameter(
                torch.randn(num_keys - 1, 3 * key_kernels * key_kernel_size**2) / key_kernel_size**2
            )

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
        out = self.unet(torch.cat([x, spatial.to(x.dtype)], 1), t, cond=cond)
        if not self.key_kernels:
            return out
        return out[:, :3] + self.stamp(out[:, 3:], action)

    def stamp(self, maps: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W]: each sample's maps [N, m, H, W] convolved with its pressed key's kernels (0 for no key)."""
        n, m, height, width = maps.shape
        keys = action[:, KEY_ONE_HOT + 1 : KEY_ONE_HOT + 1 + self.key_kernel.shape[0]].to(self.key_kernel.dtype)
        kernels = (keys @ self.key_kernel).view(n * 3, m, self.key_kernel_size, self.key_kernel_size)
        grouped = maps.reshape(1, n * m, height, width).to(kernels.dtype)  # one group per sample
        stamped = F.conv2d(grouped, kernels, padding=self.key_kernel_size // 2, groups=n)
        return stamped.view(n, 3, height, width).to(maps.dtype)
