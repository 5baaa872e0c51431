"""Image tensors <-> PNG files and grids, with torch + Pillow only (torchvision breaks beside this torch)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gen_lightning.atomic import write_atomic


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NCHW."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def psnr(predicted: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (measured on [0, 1]); identical images give +inf."""
    mse = (predicted.detach().float().clamp(-1, 1) - real.detach().float().clamp(-1, 1)).div(2).pow(2)
    return -10 * torch.log10(mse.flatten(1).mean(1))


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> Image.Image:
    """[-1, 1] NCHW -> one RGB image with `nrow` images per row (default: a square-ish grid)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected N×{{1,3}}×H×W images, got shape {tuple(images.shape)}")
    pixels = to_uint8(images.cpu())
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    n, _, h, w = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((3, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value, dtype=torch.uint8)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top : top + h, left : left + w] = pixels[i]
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def save_image_atomic(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG via a temporary file + rename, so a reader never sees half an image."""
    path = Path(path)
    write_atomic(path, lambda handle: image.save(handle, format="PNG"))
    return path


def publish_image(trainer: Any, key: str, image: Image.Image, file_name: str) -> Path | None:
    """Rank 0's image of the current step: written to `<default_root_dir>/<file_name>` and logged as `key` through
    every logger that takes images. A smoke test (fast_dev_run) has drawn it, and keeps it: no file, no log."""
    if trainer.fast_dev_run:
        return None
    step = trainer.global_step
    path = save_image_atomic(image, Path(trainer.default_root_dir) / file_name)
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[image], step=step, caption=[f"step {step}"])
    return path


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float [-1, 1] CHW."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
