"""Pre-encoded latent shards: `gen-lightning shards encode --vae CKPT --data SRC --out DIR`.

Latent diffusion spends as long in the frozen VAE encoder as in the UNet on every training step (on 64×64 emoji the
encoder's full-resolution convolutions cost about what the UNet on 16×16 latents does). Encoding the data set once
removes that.
Each sample keeps all its members (image, caption, json) and gains `latent.npy` (float32 posterior mode, C×h×w), and its
json gains `latent: {vae_sha256, image_size, shape}` so a model can refuse latents from another VAE instead of silently
decoding them wrongly. Train/val splits follow the source's keys, so they are the same samples as the source's.
Image augmentation (random crop/flip) cannot apply to stored latents.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen_lightning.data.decode import ImageTransform, decode_sample
from gen_lightning.data.shard_writer import SPLITS, read_manifest, shard_pattern, write_shards
from gen_lightning.data.urls import expand_pattern
from gen_lightning.progress import progress

log = logging.getLogger(__name__)

# images [N, 3, H, W] in [-1, 1] -> latents [N, C, h, w]: the first stage's encoder, passed in so data knows no model
LatentEncoder = Callable[[torch.Tensor], torch.Tensor]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _raw_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    import webdataset as wds

    yield from wds.WebDataset(urls, shardshuffle=False, empty_check=False)


def iter_latent_samples(
    urls: list[str], encode: LatentEncoder, fingerprint: str, image_size: int, batch_size: int, stats: dict[str, int]
) -> Iterator[dict[str, Any]]:
    """The source samples with `latent.npy` added, encoded `batch_size` at a time; undecodable ones counted."""
    transform = ImageTransform(image_size)
    pending: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def flush() -> Iterator[dict[str, Any]]:
        latents = encode(torch.stack([decoded["image"] for _, decoded in pending]))
        for (raw, decoded), latent in zip(pending, latents.cpu().numpy().astype(np.float32), strict=True):
            sample = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
            meta = dict(decoded["meta"])
            meta["latent"] = {"vae_sha256": fingerprint, "image_size": image_size, "shape": list(latent.shape)}
            sample["json"] = meta
            sample["latent.npy"] = npy_bytes(latent)
            yield sample
        pending.clear()

    for raw in _raw_samples(urls):
        try:
            decoded = decode_sample(raw, transform, random.Random(0))
        except ValueError as err:
            log.warning("skipping %s: %s", raw.get("__key__", "?"), err)
            stats["undecodable"] = stats.get("undecodable", 0) + 1
            continue
        pending.append((raw, decoded))
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()


def write_latent_shards(
    source: str | Path,
    out_dir: str | Path,
    *,
    encode: LatentEncoder,
    fingerprint: str,
    image_size: int,
    batch_size: int = 64,
    samples_per_shard: int = 64,
    provenance: Mapping[str, Any] | None = None,
) -> dict:
    """Encode both splits of the shard folder `source` into `out_dir` with `encode` (the first stage's images ->
    latents, on whatever device it runs), stamping each sample with `fingerprint` (the VAE's weights); returns the
    manifest. `provenance` is added to the manifest's source record (e.g. the VAE checkpoint's path)."""
    manifest = read_manifest(source)
    splits = [split for split in SPLITS if manifest["splits"].get(split, {}).get("shards")]
    urls = [url for split in splits for url in expand_pattern(shard_pattern(source, split))]
    stats: dict[str, int] = {}
    total = sum(int(manifest["splits"][split]["num_samples"]) for split in splits)  # undecodable ones fall short
    samples = iter_latent_samples(urls, encode, fingerprint, image_size, batch_size, stats)
    return write_shards(
        progress(samples, total=total, desc="encoding", unit="samples"),
        out_dir,
        samples_per_shard=samples_per_shard,
        val_fraction=manifest["val_fraction"],
        source={
            "type": "latents",
            "from": str(Path(source).resolve()),
            **(provenance or {}),
            "vae_sha256": fingerprint,
            "image_size": image_size,
        },
        skipped=stats,
    )
