"""The encoder of a CLIP score, from one path: a Hugging Face CLIP directory or the project's own CLIP checkpoint.

Heavy imports (transformers, lightning through the CLIP module) happen only for the branch the path takes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from gen_lightning.errors import UserInputError
from gen_lightning.interop.folders import EXPORT_MARKER
from gen_lightning.metrics.clip_score import CLIPScore, TextImageEncoder

log = logging.getLogger(__name__)


class EncoderPathError(UserInputError):
    """A path that is neither accepted form of a CLIP-score encoder; the message names the path and both forms."""


ACCEPTED = (
    "a Hugging Face CLIP directory (written by save_pretrained, with config.json) "
    "or a gen_lightning CLIP checkpoint file (.ckpt) or export folder"
)


def load_text_image_encoder(path: str | Path) -> TextImageEncoder:
    """The frozen, eval-mode image/text encoder pair stored at `path`; nothing is downloaded."""
    path = Path(path)
    if path.is_dir() and not (path / EXPORT_MARKER).is_file():  # an export of our CLIP loads as its checkpoint
        if not (path / "config.json").is_file():
            raise EncoderPathError(f"{str(path)!r} is a directory without config.json; expected {ACCEPTED}")
        from gen_lightning.metrics.hf_clip import HuggingFaceCLIP

        return HuggingFaceCLIP(path)
    if path.exists():
        from gen_lightning.models.clip import load_clip  # weights-only: no code from the file runs

        return load_clip(path)
    raise EncoderPathError(f"CLIP-score encoder {str(path)!r} does not exist; expected {ACCEPTED}")


def clip_score_for(model: Any, clip: str | None, option: str) -> CLIPScore | None:
    """A CLIPScore for a text-to-image `model` on its device, or None with one log line saying why it is skipped.
    `option`: how the user names the CLIP (in that line)."""
    if model.kind != "text-to-image":
        if clip:
            log.info("CLIP score skipped: %s is not text-conditioned", type(model).__name__)
        return None
    if not clip:
        log.info("CLIP score skipped: no CLIP configured (set %s to a CLIP checkpoint or HF CLIP directory)", option)
        return None
    encoder = load_text_image_encoder(clip)
    if isinstance(encoder, torch.nn.Module):
        encoder.to(model.device)
    return CLIPScore(encoder).to(model.device)
