"""WorldModel: action-conditioned diffusion that generates the next screen of a desktop from the previous screens and
the mouse/keyboard input (as GameNGen, Valevski et al. 2024, and NeuralOS, Rivard et al. 2025, do).

Conditioning, all through the shared UNet:
- the K previous frames are concatenated to the noisy next frame along channels;
- the cursor position is one more input channel: a Gaussian bump at the action's (x, y), so "where" is spatial;
  `click_maps` adds two: the same bump where the left button is held and where it was clicked, making "a click
  here" a local signal next to the widget under it (measured: no better after 20 CPU-minutes, bench/RESULTS.md);
- the whole action (gen_lightning.actions' encoding: x, y, button, click, key) also goes through the UNet's `cond`
  embedding, added to the time embedding, together with the context-noise level below.
- `key_kernels` (off by default): a pressed key also stamps learned kernels of its own onto maps the network draws
  (a typed glyph's shape is then the key's kernel, and the network only says where; nn.world_unet).

Noise augmentation of the context (GameNGen's trick): in training the context frames are corrupted with Gaussian noise
of a random level in [0, context_noise], and the level is given to the model. A model that only ever saw clean
context drifts in an autoregressive rollout, where its own slightly wrong frames become the next context; one trained
to look through noisy context corrects them. At sampling time the level is `sample_context_noise` (default 0).

Loss weighted toward what changes (`change_weight`): most of a next screen equals the last one, and the pixels that
make an action's effect (a typed glyph, a ticked box) are a few percent of the frame, so a plain mean over pixels
spends most of a small model's training on copying. With change_weight = λ > 0, a pixel that differs from the newest
context frame (by more than CHANGE_THRESHOLD in any channel, grown by one pixel) weighs 1 + λ, the rest 1; the
weights are rescaled to mean 1 per sample, so frames where nothing changes train as before. val/loss is weighted the
same way: compare it only between runs with the same change_weight.

What is diffused: `target="frame"` (default) is the next frame; `target="delta"` is the change from the newest context
frame, halved so it stays in [-1, 1] (clip_sample applies to it). Measured on the Tk desktop after 20 CPU-minutes
(bench/RESULTS.md): "delta" scores better one-step PSNR (most of the screen does not change, and a zero change keeps
those pixels exactly), but its rollouts drift in colour and it showed click effects less often; "frame" rollouts
stay cleaner.

Snapping small changes back (`snap_unchanged`, sampling only): a screen's unchanged pixels are byte-identical from
one frame to the next, but a sampled frame moves every pixel a little. In a rollout those small moves add up to a
tint (measured on the Tk desktop: rollout PSNR 12.4 dB at step 16 of 16). With snap_unchanged = s > 0, a pixel whose
predicted change from the newest context frame is below s in every channel keeps that frame's value. Measured there
(bench/RESULTS.md), s from 0.08 (CHANGE_THRESHOLD) to 0.3 lifts the mean rollout PSNR from 18.0 to 19.5-19.9 dB and
the FID from 75 to 44-17, and changes no widget-state reading; configs/world_model_ui.yaml uses 0.2. Real changes
on a screen are large (a glyph, a colour, the cursor), so a threshold this size keeps them. It is an hparam, so a
trained checkpoint can be sampled with and without it.

Batches come from the one ShardDataModule (world-model shards written by `gen-lightning shards ui`):
`image` is the next frame, `frames` [N, K, 3, H, W] the context, `action` [N, ACTION_DIM].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gen_lightning.actions import ACTION_DIM, KEYS, encode_action
from gen_lightning.diffusion import Sampler
from gen_lightning.errors import UserInputError
from gen_lightning.models.diffusion import GUIDE_MUST_MATCH, DiffusionModel
from gen_lightning.nn.unet import UNetConfig
from gen_lightning.nn.world_unet import WorldUNet

IMAGE_CHANNELS = 3
# With the noise level, the per-sample conditioning vector fed to the UNet's cond embedding.
COND_DIM = ACTION_DIM + 1
NULL_ACTION = {"x": 0.5, "y": 0.5, "button": 0, "click": 0, "key": ""}
TARGETS = ("delta", "frame")
# A pixel counts as changed when a channel moves by more than this (images in [-1, 1]: ~10 of 255 levels); PNG frames
# of the same screen are identical, so any small threshold separates "changed" from "not".
CHANGE_THRESHOLD = 0.08


@dataclass(frozen=True)
class NextFrame:
    """What a world model's next frame is conditioned on (sample's `cond`): context frames [n, K, 3, H, W] in
    [-1, 1], oldest first, and each one's action: encoded [n, A], or action dicts (see gen_lightning.actions)."""

    frames: torch.Tensor
    action: torch.Tensor | Sequence[Mapping[str, Any]]

    def encoded_action(self) -> torch.Tensor:
        if isinstance(self.action, torch.Tensor):
            return self.action
        return torch.stack([encode_action(action) for action in self.action])


class WorldModel(DiffusionModel):
    """Args (besides DiffusionModel's, which apply to the next frame):
    context_frames: K, the number of previous frames the model sees (must match the shards' context.png).
    target: "frame" (the next frame) or "delta" (the change from the newest context frame, halved); see above.
    click_maps: two more pointer channels, button held and click, as bumps at the cursor (see above).
    context_noise: largest context-noise level in training (0 disables the augmentation).
    sample_context_noise: the level the model is told (and that is added) at sampling time.
    cursor_sigma: width in pixels of the cursor-position channel's bump.
    change_weight: λ, the extra loss weight of pixels that change from the newest context frame (0: plain mean).
    snap_unchanged: at sampling, a pixel whose predicted change from the newest context frame is below this in every
        channel keeps that frame's value (0: off); see above.
    key_kernels / key_kernel_size: m maps the network draws where a pressed key's shape goes, stamped with that
        key's m learned k×k kernels per channel (nn.world_unet; 0: off, the key acts only through the embedding).
    """

    kind = "next-frame"
    # A guide (autoguidance) is called with this model's conditioning: it must read the same frames, pointer maps and
    # target.
    guide_must_match = (*GUIDE_MUST_MATCH, "context_frames", "target", "click_maps", "cursor_sigma")
    format_1_renames = (("unet.", "net.unet."), ("ema.shadow.", "ema.shadow.unet."))

    def __init__(
        self,
        unet: UNetConfig | None = None,
        image_size: int = 64,
        context_frames: int = 4,
        target: str = "frame",
        click_maps: bool = False,
        context_noise: float = 0.3,
        sample_context_noise: float = 0.0,
        cursor_sigma: float = 1.5,
        change_weight: float = 0.0,
        snap_unchanged: float = 0.0,
        key_kernels: int = 0,
        key_kernel_size: int = 9,
        **kwargs: Any,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"model.target={target!r}: expected one of {TARGETS}")
        if change_weight < 0:
            raise ValueError(f"model.change_weight={change_weight}: must be >= 0")
        if not 0 <= snap_unchanged < 2:
            raise ValueError(f"model.snap_unchanged={snap_unchanged}: must lie in [0, 2) (a change in [-1, 1] units)")
        if key_kernels < 0 or key_kernel_size < 1 or key_kernel_size % 2 == 0:
            raise ValueError(
                f"model.key_kernels={key_kernels}, model.key_kernel_size={key_kernel_size}: need key_kernels >= 0 "
                "and an odd kernel size"
            )
        if context_frames < 1:
            raise ValueError(f"model.context_frames={context_frames}: needs at least one previous frame")
        if not 0.0 <= sample_context_noise <= max(context_noise, 0.0) or context_noise < 0:
            raise ValueError(
                f"model.sample_context_noise={sample_context_noise} must lie in [0, context_noise={context_noise}] "
                "(the model never saw other levels)"
            )
        unet_config = UNetConfig.coerce(unet if unet is not None else UNetConfig())
        pointer_channels = 3 if click_maps else 1  # where the cursor is (+ where the button is held, was clicked)
        unet_config.in_channels = IMAGE_CHANNELS * (context_frames + 1) + pointer_channels
        unet_config.out_channels = IMAGE_CHANNELS + key_kernels  # the frame (or change), then the key maps
        unet_config.cond_dim = COND_DIM
        super().__init__(unet=unet_config, image_size=image_size, **kwargs)
        channels_last = bool(self.hparams.channels_last)
        world_net = WorldUNet(
            self.inner_net,
            click_maps=click_maps,
            cursor_sigma=cursor_sigma,
            channels_last=channels_last,
            key_kernels=key_kernels,
            key_kernel_size=key_kernel_size,
            num_keys=len(KEYS),
        )
        self.wrap_network(world_net)
        self.sample_shape = (IMAGE_CHANNELS, image_size, image_size)
        # A starting screen stored with the weights (filled from the first batch seen), so `play` needs only the
        # checkpoint. NaN until then.
        self.register_buffer("start_frames", torch.full((context_frames, *self.sample_shape), math.nan))

    # --- conditioning ---------------------------------------------------------------------------------------------
    def check_batch(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "frames" not in batch or "action" not in batch:
            raise UserInputError(
                "WorldModel needs world-model shards (context.png + action.json per sample, written by "
                f"`gen-lightning shards ui`); this batch has {sorted(k for k in batch if not k.startswith('__'))}"
            )
        frames, action = batch["frames"], batch["action"]
        expected = (self.hparams.context_frames, *self.sample_shape)
        if tuple(frames.shape[1:]) != expected:
            raise UserInputError(
                f"context frames are {tuple(frames.shape[1:])}, the model expects {expected} "
                "(model.context_frames must match the shards' context length, data.image_size their frame size)"
            )
        return frames, action

    def noisy_context(
        self, frames: torch.Tensor, training: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context frames with the augmentation noise added, and each sample's level."""
        n = frames.shape[0]
        if training:
            levels = torch.rand(n, device=frames.device) * self.hparams.context_noise
        else:
            levels = torch.full((n,), float(self.hparams.sample_context_noise), device=frames.device)
        if not levels.any():
            return frames, levels
        device = generator.device if generator is not None else frames.device
        noise = torch.randn(frames.shape, generator=generator, device=device, dtype=frames.dtype).to(frames.device)
        return frames + levels.view(n, 1, 1, 1, 1).to(frames.dtype) * noise, levels

    def condition(
        self, batch: Mapping[str, Any], training: bool, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """WorldUNet's arguments: the context frames with their augmentation noise, the action, the noise level."""
        frames, action = self.check_batch(batch)
        noisy, levels = self.noisy_context(frames, training, generator)
        return {"frames": noisy, "action": action, "noise_level": levels}

    # --- DiffusionModel hooks -------------------------------------------------------------------------------------
    def diffusion_input(self, batch: dict[str, Any]) -> torch.Tensor:
        frames, _ = self.check_batch(batch)
        if not torch.isfinite(self.start_frames).all():
            self.start_frames.copy_(frames[0])
        next_frame = self._images(batch)
        if self.hparams.target == "frame":
            return next_frame
        return (next_frame - frames[:, -1]) / 2  # keeps next_frame's memory format

    def pixel_weight(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """[N, 1, H, W] weights, mean 1 per sample: 1 + change_weight where the next frame differs from the newest
        context frame (see the module docstring), 1 elsewhere; None when change_weight is 0."""
        change_weight = self.hparams.change_weight  # older checkpoints load with the default (0: off)
        if not change_weight:
            return None
        frames, _ = self.check_batch(batch)
        change = (batch["image"] - frames[:, -1]).abs().amax(dim=1, keepdim=True) > CHANGE_THRESHOLD
        grown = torch.nn.functional.max_pool2d(change.float(), kernel_size=3, stride=1, padding=1)
        weight = 1 + change_weight * grown
        return weight / weight.mean(dim=(1, 2, 3), keepdim=True)

    def to_frame(self, sampled: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """The next frame from what the sampler produced (the frame, or the halved change from the newest context),
        with changes below snap_unchanged undone."""
        last = frames[:, -1]
        frame = sampled if self.hparams.target == "frame" else last + 2 * sampled
        frame = frame.clamp(-1, 1)
        snap = self.hparams.snap_unchanged  # older checkpoints load with the default (0: off)
        if snap:
            unchanged = (frame - last).abs().amax(dim=1, keepdim=True) < snap
            frame = torch.where(unchanged, last, frame)
        return frame

    def on_fit_start(self) -> None:
        super().on_fit_start()
        data = getattr(self.trainer, "datamodule", None)
        if data is not None and (getattr(data, "random_flip", False) or getattr(data, "random_crop", False)):
            # A flipped or shifted frame no longer matches the cursor position stored in its action.
            raise UserInputError("WorldModel: data.random_flip and data.random_crop must be false")

    # --- generation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: NextFrame | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """n next frames [n, 3, H, W] in [-1, 1] after `cond` (context frames and actions); None: the stored start
        screen with the cursor resting at the centre (GenerativeModule.sample). `guidance` only with an autoguidance
        model set (set_autoguidance; None: 1, unguided). The context noise (at sample_context_noise) is drawn from
        `generator` before x_T."""
        if guidance is not None and self.autoguide is None:
            raise ValueError(
                "WorldModel has no classifier-free guidance: guidance needs an autoguidance model (set_autoguidance; "
                "`--guide-ckpt` on the command line)"
            )
        if cond is None:
            cond = NextFrame(self.start_context(n), [NULL_ACTION] * n)
        if not isinstance(cond, NextFrame):
            raise TypeError(f"WorldModel.sample(cond=...) takes a NextFrame, got a {type(cond).__name__}")
        frames = cond.frames.to(self.device)
        if frames.shape[0] != n:
            raise ValueError(f"sample({n}, cond): cond holds {frames.shape[0]} contexts")
        network_cond = self.condition(
            {"frames": frames, "action": cond.encoded_action().to(self.device)}, False, generator
        )
        weight = 1.0 if guidance is None else guidance
        sampled = self.draw(n, network_cond, guidance=weight, steps=steps, sampler=sampler, generator=generator)
        return self.to_frame(sampled, frames)

    @torch.no_grad()
    def rollout(
        self,
        frames: torch.Tensor,
        actions: torch.Tensor,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Autoregressive rollout: [N, T, 3, H, W] frames for actions [N, T, A], each step's prediction appended to
        the context of the next (the first context is `frames` [N, K, 3, H, W]). Sampling options as sample()."""
        context, predicted = frames, []
        options = {"steps": steps, "guidance": guidance, "sampler": sampler, "generator": generator}
        for step in range(actions.shape[1]):
            frame = self.sample(len(frames), NextFrame(context, actions[:, step]), **options)
            predicted.append(frame)
            context = torch.cat([context[:, 1:], frame[:, None]], 1)
        return torch.stack(predicted, 1)

    def start_context(self, n: int = 1) -> torch.Tensor:
        """The stored starting screen as a context of n identical episodes [n, K, 3, H, W]."""
        if not torch.isfinite(self.start_frames).all():
            raise RuntimeError("this WorldModel has no start frames yet: train at least one step")
        return self.start_frames.expand(n, *self.start_frames.shape).clone()
