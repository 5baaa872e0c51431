"""Turn raw webdataset samples (bytes per extension) into training examples, counting what has to be skipped.

A corrupt sample must not stop a multi-day run, nor vanish silently: it is skipped with a (rate-limited) warning and
counted. Counters live in the process that decodes (a DataLoader worker); each batch carries the number skipped since
the previous batch of that worker (`batch["skipped"]`), so the main process can log a total across workers and ranks.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from gen_lightning.images import pil_to_tensor

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
LATENT_KEY = "latent.npy"
MAX_WARNINGS_PER_PROCESS = 20

# Per-process tallies of skipped samples by reason; drained into each batch (see module docstring).
_skipped: Counter[str] = Counter()
_warned = 0


def record_skip(reason: str, where: str) -> None:
    global _warned
    _skipped[reason] += 1
    if _warned < MAX_WARNINGS_PER_PROCESS:
        _warned += 1
        suffix = " (further warnings suppressed)" if _warned == MAX_WARNINGS_PER_PROCESS else ""
        log.warning("skipping sample %s: %s%s", where, reason, suffix)


def drain_skipped() -> int:
    total = sum(_skipped.values())
    _skipped.clear()
    return total


_URL_IN_ERROR = re.compile(r"name='([^']*)'")
_last_broken_stream: str | None = None


def count_and_continue(exn: Exception) -> bool:
    """webdataset handler for errors while reading a tar (truncated member, unreadable shard): count and go on.

    webdataset reports one broken member twice (from the member loop, then again from the shard loop that owns the
    stream), so a repeat for the same file right after the first report is not counted again.
    """
    global _last_broken_stream
    text = " ".join(str(arg) for arg in exn.args)
    match = _URL_IN_ERROR.search(text)
    stream = match.group(1) if match else (str(exn.args[-1]) if len(exn.args) > 2 else None)
    if stream is not None and stream == _last_broken_stream:
        _last_broken_stream = None
        return True
    _last_broken_stream = stream
    record_skip(f"unreadable tar data ({type(exn).__name__}: {exn.args[0] if exn.args else exn})", stream or "?")
    return True


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white (emoji, icons), 16-bit gray is scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to `size`, crop size×size (center or random), maybe flip; -> float [-1, 1] CHW."""

    size: int
    random_crop: bool = False
    random_flip: bool = False

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        image = to_rgb(image)
        w, h = image.size
        scale = self.size / min(w, h)
        if scale != 1.0:
            new_size = (max(self.size, round(w * scale)), max(self.size, round(h * scale)))
            # LANCZOS with reducing_gap: antialiased downscaling (no aliasing on big images), fast on huge ones.
            image = image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        w, h = image.size
        if self.random_crop:
            left, top = rng.randint(0, w - self.size), rng.randint(0, h - self.size)
        else:
            left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        if self.random_flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        return pil_to_tensor(image)


def decode_sample(raw: dict[str, Any], transform: ImageTransform, rng: random.Random) -> dict[str, Any]:
    """Raw webdataset dict -> {"image", "caption", "__key__"}. Raises ValueError naming what is wrong."""
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None:
        raise ValueError(f"no image member (looked for {', '.join(IMAGE_KEYS)}; found {sorted(raw)})")
    try:
        with Image.open(io.BytesIO(raw[image_key])) as image:
            image.load()  # force a full decode now, so a truncated file fails here and not later in a batch
            tensor = transform(image, rng)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{image_key} is not a decodable image ({err})") from err
    caption = raw.get("txt", b"")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"txt caption is not UTF-8 ({err})") from err
    sample = {"image": tensor, "caption": caption.strip(), "meta": _metadata(raw), "__key__": raw.get("__key__", "")}
    if LATENT_KEY in raw:  # pre-encoded shards (data.latent_source)
        sample["latent"] = _latent(raw[LATENT_KEY])
    return sample


def _latent(data: bytes) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{LATENT_KEY} is not a readable .npy array ({err})") from err
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise ValueError(f"{LATENT_KEY} must be a finite float C×h×w array, got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.float32))


def _metadata(raw: dict[str, Any]) -> dict[str, Any]:
    """The sample's `json` member (emoji group/subgroup, source info) as a dict; {} when there is none."""
    data = raw.get("json")
    if data is None:
        return {}
    try:
        meta = json.loads(data) if isinstance(data, bytes | str) else data
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"json member is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"json member is a {type(meta).__name__}, expected an object")
    return meta


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "__key__": [s["__key__"] for s in samples],
        "skipped": drain_skipped(),
    }
    with_latent = sum("latent" in s for s in samples)
    if with_latent == len(samples):
        batch["latent"] = torch.stack([s["latent"] for s in samples])
    elif with_latent:
        raise ValueError(f"a batch mixes samples with and without {LATENT_KEY}: the shard set is a mix of sources")
    return batch


def decode_and_batch(
    raw_samples: Iterable[dict[str, Any]],
    transform: ImageTransform,
    batch_size: int,
    rng: random.Random,
    partial: bool,
) -> Iterator[dict[str, Any]]:
    """Decode samples (skipping and counting bad ones) and group them into dict batches."""
    batch: list[dict[str, Any]] = []
    for raw in raw_samples:
        try:
            batch.append(decode_sample(raw, transform, rng))
        except ValueError as err:
            record_skip(str(err), f"{raw.get('__key__', '?')} from {raw.get('__url__', '?')}")
            continue
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and partial:
        yield collate(batch)
