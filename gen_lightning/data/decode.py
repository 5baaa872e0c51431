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
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from gen_lightning.errors import UserInputError
from gen_lightning.images import pil_to_tensor

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
LATENT_KEY = "latent.npy"
# World-model samples (data.ui_source): the previous frames tiled left to right, and the action taken after them.
CONTEXT_KEY = "context.png"
ACTION_KEY = "action.json"
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
        log.warning("skipping %s: %s%s", where, reason, suffix)


def drain_skipped() -> int:
    total = sum(_skipped.values())
    _skipped.clear()
    return total


class UnusableDataError(UserInputError):
    """A stream that only skips: the data cannot feed this model. The message names the source and the last reason."""


class SkipCounter:
    """Counts what one stream skips (via record_skip) and stops a stream that skips and never yields.

    A resampled training stream is endless: if nothing in it is usable (every shard broken, no caption anywhere for a
    text model) it would loop forever without producing a batch, a hang rather than an error. `limit` skips in a row,
    with no usable sample between them, raise UnusableDataError instead. None (validation: finite) never raises.
    """

    def __init__(self, source: str, limit: int | None = None) -> None:
        self.source = source
        self.limit = limit
        self.in_a_row = 0

    def skipped(self, reason: str, where: str) -> None:
        record_skip(reason, where)
        self.in_a_row += 1
        if self.limit is not None and self.in_a_row >= self.limit:
            raise UnusableDataError(
                f"{self.source}: {self.in_a_row} samples in a row could not be used (the last: {where}: {reason}); "
                "this data cannot feed this model. Fix or remove the shards, or raise data.max_skips_in_a_row if "
                "long runs of bad samples are expected."
            )

    def used(self) -> None:
        self.in_a_row = 0


_END_OF_SHARD: dict[str, Any] = {}  # webdataset's marker between shards: group_by_keys never joins samples across it


def read_tar_samples(shards: Iterable[dict[str, Any]], skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Raw samples (member bytes by extension, "__key__", "__url__") of each shard, through webdataset's public tar
    functions; what cannot be read is counted in `skips` and named by the shard it came from.

    A shard is {"url": ...}, optionally with "share" and "shares": several readers split one shard, each keeping the
    samples whose index in the shard is `share` modulo `shares` (a val split with fewer shards than readers). Errors
    of the shard as a whole are then counted by share 0 alone, so a broken shard is one skip, not one per reader.
    """
    return group_by_keys(_without_repeated_members(_shard_members(shards, skips), skips))


def _shard_members(shards: Iterable[dict[str, Any]], skips: SkipCounter) -> Iterator[dict[str, Any]]:
    for shard in shards:
        yield from _members_of(shard["url"], shard.get("share", 0), shard.get("shares", 1), skips)
        yield _END_OF_SHARD


def _members_of(url: str, share: int, shares: int, skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """One shard's tar members ({"fname", "data", "__url__"}) of this reader's share; a broken shard is one skip.

    webdataset's tar_file_iterator hands an error inside a member to its handler (the text then carries " @ <file
    object>") and reads on; a stream cut there fails again at the next header, and that error leaves the iterator.
    So the shard's error is the one that ends it, or else the first a member raised: counted once, never parsed.
    """
    member_errors: list[Exception] = []

    def note(error: Exception) -> bool:
        member_errors.append(error)
        return True

    failure: Exception | None = None
    try:
        for index, member in _numbered_by_sample(tar_file_iterator(gopen(url), handler=note)):
            if index % shares == share:
                yield {**member, "__url__": url}
    except Exception as error:  # unreadable shard (missing, empty, not a tar, cut off): the samples before it stay
        failure = error
    failure = failure or (member_errors[0] if member_errors else None)
    if failure is not None and share == 0:
        skips.skipped(f"unreadable tar data ({type(failure).__name__}: {failure})", f"data in shard {url}")


def _numbered_by_sample(members: Iterable[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index of the sample in its shard, member): a sample is a run of members with one key, as group_by_keys
    groups them; readers sharing a shard number it alike, since all read the same bytes."""
    index, key = -1, None
    for member in members:
        prefix, _ = base_plus_ext(member["fname"])
        if prefix is not None and prefix != key:
            index, key = index + 1, prefix
        yield index, member


def _without_repeated_members(members: Iterable[dict[str, Any]], skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Drops a member whose name repeats within its sample (`a.png` twice in a row), keeping the first copy, counted
    and named: webdataset's group_by_keys would raise on it and lose the rest of the shard."""
    key, seen = None, set()
    for member in members:
        prefix, suffix = base_plus_ext(member["fname"]) if member else (None, None)
        if not member:  # the end of a shard: the next member starts a sample whatever its key
            key = None
        elif prefix is not None:  # (group_by_keys drops members without a key; so does nothing here)
            suffix = suffix.lower()  # as group_by_keys compares them
            if prefix != key:
                key, seen = prefix, set()
            elif suffix in seen:
                reason = f"tar member {member['fname']} repeats the one before it (the first copy is used)"
                skips.skipped(reason, f"data in shard {member['__url__']}")
                continue
            seen.add(suffix)
        yield member


EXIF_ORIENTATION = 0x0112


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: phone and camera JPEGs store the sensor's pixels and an EXIF orientation
    that viewers apply (decoding alone does not)."""
    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF (struct.error, TypeError, ...): the pixels are still good, used as stored
        pass
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white (emoji, icons), 16-bit gray is scaled, not clipped.

    Transparency is an alpha channel, or (PNG's tRNS) one colour of a palette, grey or RGB image marked transparent,
    as optimisers such as oxipng write on/off alpha."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """Crop the largest square (center or random), resize it to size×size, maybe flip; -> float [-1, 1] CHW."""

    size: int
    random_crop: bool = False
    random_flip: bool = False

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        image = to_rgb(upright(image))
        w, h = image.size
        side = min(w, h)
        if self.random_crop:
            left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        else:
            left, top = (w - side) // 2, (h - side) // 2
        # Only the kept square is resized (`box`): resizing the whole image first would, for a thin strip (1×2,000,000
        # pixels, a tiny PNG) scaled up to 64 px, allocate billions of pixels. LANCZOS with reducing_gap: antialiased
        # downscaling (no aliasing on big images), fast on huge ones.
        box = (left, top, left + side, top + side)
        image = image.resize((self.size, self.size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
        if self.random_flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        return pil_to_tensor(image)


def decode_sample(
    raw: dict[str, Any], transform: ImageTransform, rng: random.Random, require_caption: bool = False
) -> dict[str, Any]:
    """Raw webdataset dict -> {"image", "caption", "meta", "__key__"}. Raises ValueError naming what is wrong.

    `require_caption`: a missing or blank caption is an error (text-to-image models and CLIP would otherwise learn
    from "" as if it described the image). The caption is checked first, so such samples cost no image decode.
    """
    caption = _caption(raw, require_caption)
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None:
        raise ValueError(f"no image member (looked for {', '.join(IMAGE_KEYS)}; found {sorted(raw)})")
    try:
        with Image.open(io.BytesIO(raw[image_key])) as image:
            image.load()  # force a full decode now, so a truncated file fails here and not later in a batch
            tensor = transform(image, rng)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{image_key} is not a decodable image ({err})") from err
    sample = {"image": tensor, "caption": caption, "meta": sample_metadata(raw), "__key__": raw.get("__key__", "")}
    if LATENT_KEY in raw:  # pre-encoded shards (data.latent_source)
        sample["latent"] = _latent(raw[LATENT_KEY])
    if CONTEXT_KEY in raw or ACTION_KEY in raw:  # world-model shards
        sample["frames"], sample["action"] = _frames_and_action(raw, transform, rng, tuple(tensor.shape))
    return sample


def _frames_and_action(
    raw: dict[str, Any], transform: ImageTransform, rng: random.Random, frame_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """context.png (K frames side by side) -> [K, 3, H, W] through the same transform as the next frame, and
    action.json -> the encoded action vector (gen_lightning.actions)."""
    from gen_lightning.actions import encode_action

    missing = [k for k in (CONTEXT_KEY, ACTION_KEY) if k not in raw]
    if missing:
        raise ValueError(f"world-model sample without {', '.join(missing)}")
    try:
        with Image.open(io.BytesIO(raw[CONTEXT_KEY])) as strip:
            strip.load()
            width, height = strip.size
            if width % height:
                raise ValueError(f"its size {width}×{height} is not K square frames side by side")
            frames = [
                transform(strip.crop((i * height, 0, (i + 1) * height, height)), rng) for i in range(width // height)
            ]
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{CONTEXT_KEY} is not a decodable image ({err})") from err
    if tuple(frames[0].shape) != frame_shape:
        raise ValueError(f"{CONTEXT_KEY} frames are {tuple(frames[0].shape)}, the next frame is {frame_shape}")
    try:
        action = json.loads(raw[ACTION_KEY])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{ACTION_KEY} is not valid JSON ({err})") from err
    if not isinstance(action, dict):
        raise ValueError(f"{ACTION_KEY} is a {type(action).__name__}, expected an object")
    return torch.stack(frames), encode_action(action, ACTION_KEY)


def _caption(raw: dict[str, Any], required: bool) -> str:
    caption = raw.get("txt")
    if caption is None and required:
        raise ValueError("no caption (txt member) and this model trains on captions")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"txt caption is not UTF-8 ({err})") from err
    caption = (caption or "").strip()
    if not caption and required:
        raise ValueError("empty caption (txt member is blank) and this model trains on captions")
    return caption


def _latent(data: bytes) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{LATENT_KEY} is not a readable .npy array ({err})") from err
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise ValueError(f"{LATENT_KEY} must be a finite float C×h×w array, got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.float32))


def sample_metadata(raw: Mapping[str, Any]) -> dict[str, Any]:
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
    for key, member in (("latent", LATENT_KEY), ("frames", CONTEXT_KEY), ("action", ACTION_KEY)):
        present = sum(key in s for s in samples)
        if present == len(samples):
            batch[key] = torch.stack([s[key] for s in samples])
        elif present:
            raise ValueError(f"a batch mixes samples with and without {member}: the shard set is a mix of sources")
    return batch


def decode_and_batch(
    raw_samples: Iterable[dict[str, Any]],
    transform: ImageTransform,
    batch_size: int,
    rng: random.Random,
    partial: bool,
    skips: SkipCounter,
    require_caption: bool = False,
) -> Iterator[dict[str, Any]]:
    """Decode samples (skipping and counting bad ones) and group them into dict batches."""
    batch: list[dict[str, Any]] = []
    for raw in raw_samples:
        try:
            batch.append(decode_sample(raw, transform, rng, require_caption))
        except ValueError as err:
            skips.skipped(str(err), f"sample {raw.get('__key__', '?')} from {raw.get('__url__', '?')}")
            continue
        skips.used()
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and partial:
        yield collate(batch)
