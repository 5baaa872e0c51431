"""Checkpoint formats, and the map from older ones applied when a checkpoint is loaded.

Format 1 (before #19): each model held its networks under names of its own (`unet`, `autoencoder`, CLIP's towers at
the top level; latent diffusion its UNet and text encoder twice, and a whole VAEModel).
Format 2: one trainable network `net` per model, its EMA copy `ema.shadow`, frozen networks as plain modules.
Format 3 (VAEModel, LatentDiffusionModel, #20): the autoencoder's hyper-parameters name its encoder's downsampling
padding (`downsample`); the VAEs of earlier formats padded on all sides ("same"), new ones default to "ldm".

Each model class names its format (`checkpoint_format`) and how a checkpoint of format n becomes one of format n + 1
(`upgrade_from_format_n`: mostly key renames, or hyper-parameters made explicit). `upgrade` applies those in turn, in
place, to a checkpoint dict, so that
`load_model` (sample, evaluate) and Lightning's resume (GenerativeModule.on_load_checkpoint, called before the state
dict is loaded) read old files through the same map. Optimizer state is keyed by parameter position, and every
format-2 network keeps its parameters in the format-1 order, so a resume restores the optimizer too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gen_lightning.models.base import GenerativeModule

# (old key, or old prefix ending in "."; its new key or prefix, or None to drop it). The first matching rule wins.
Rule = tuple[str, str | None]


def stored_format(checkpoint: Mapping[str, Any]) -> int:
    meta = checkpoint.get("gen_lightning")
    return int(meta.get("format", 1)) if isinstance(meta, Mapping) else 1


def renamed(state: Mapping[str, torch.Tensor], rules: Sequence[Rule]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for old, new in rules:
            if key == old or (old.endswith(".") and key.startswith(old)):
                if new is not None:
                    out[new + key[len(old) :]] = value
                break
        else:
            out[key] = value
    return out


def upgrade(checkpoint: dict[str, Any], cls: type[GenerativeModule]) -> dict[str, Any]:
    """`checkpoint`, changed in place to `cls`'s format (a no-op when it is there already)."""
    stored = stored_format(checkpoint)
    if stored < cls.checkpoint_format and isinstance(checkpoint.get("state_dict"), dict):
        for version in range(stored, cls.checkpoint_format):
            getattr(cls, f"upgrade_from_format_{version}")(checkpoint)
        checkpoint.setdefault("gen_lightning", {})["format"] = cls.checkpoint_format
    return checkpoint
