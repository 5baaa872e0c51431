"""ShardDataModule: the one DataModule every model family uses. Streams webdataset shards into dict batches.

Training: shards are resampled with replacement (every rank and worker draws its own infinite stream, seeded by rank,
worker and epoch) and an epoch is an explicit number of samples, so every rank yields exactly the same number of
batches. A finite, split stream gives ranks unequal counts whenever shards don't divide evenly, and DDP then hangs
at the first collective of the rank that still has data.

Validation: every val sample is read exactly once across ranks × workers ("readers"), on any number of shards. With
at least as many shards as readers, each reader reads whole shards of its own (shard s goes to reader s mod readers).
With fewer, the readers take turns on the shards (reader r reads shard r mod shards) and the k readers of one shard
keep every k-th of its samples by index, decoding only those; each still reads the shard's bytes. Ranks may get
unequal numbers of val batches: Lightning reduces `self.log(..., sync_dist=True)` values once at the epoch's end, not
per batch, but a rank with no val batch at all would skip that reduction, so setup refuses a split that leaves a rank
without samples when the manifest says how many each shard holds.

Loader workers die with the process that started them (PR_SET_PDEATHSIG): a killed fit leaves no orphan behind.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import os
import random
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gen_lightning.data.decode import (
    ImageTransform,
    SkipCounter,
    decode_and_batch,
    drain_skipped,
    read_tar_samples,
)
from gen_lightning.data.oversample import OversampleRule, check_rules_match, oversampled, parse_rules
from gen_lightning.data.urls import ShardPatternError, expand_pattern, split_urls

log = logging.getLogger(__name__)


def model_trains_on_captions(model: Any) -> bool:
    """Text-to-image models and CLIP learn from the caption: a missing one must not reach them as "" (it would teach
    that "" describes the image). Any LightningModule may declare it; gen_lightning's models do (models.base)."""
    return bool(getattr(model, "trains_on_captions", False))


def _worker_index() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainStream(IterableDataset):
    """Infinite resampled shard stream cut into epochs of exactly `batches_per_rank` batches: the loader's workers
    split them (any two differ by at most one), and every rank yields the same number, so DDP never waits."""

    def __init__(
        self,
        urls: list[str],
        transform: ImageTransform,
        batch_size: int,
        batches_per_rank: int,
        num_workers: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        resumed_at: int = 0,
        require_caption: bool = False,
        max_skips_in_a_row: int | None = None,
        source: str = "data.train",
        oversample: tuple[OversampleRule, ...] = (),
    ) -> None:
        super().__init__()
        self.urls = urls
        self.transform = transform
        self.batch_size = batch_size
        self.batches_per_rank = batches_per_rank
        self.num_workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.resumed_at = resumed_at
        self.require_caption = require_caption
        self.max_skips_in_a_row = max_skips_in_a_row
        self.source = source
        self.oversample = oversample
        self.epoch = 0  # advances inside each (persistent) worker; a fresh worker would otherwise replay epoch 0

    def __len__(self) -> int:
        return self.batches_per_rank

    def _worker_batches(self) -> int:
        worker, workers = _worker_index()
        return self.batches_per_rank // workers + (worker < self.batches_per_rank % workers)

    def _stream_seed(self) -> int:
        worker, _ = _worker_index()
        # A resumed run draws a fresh stream (its seed includes the step it resumed at) instead of replaying the
        # samples the first run already trained on since the start of the epoch.
        return hash((self.seed, self.rank, worker, self.epoch, self.resumed_at)) & 0x7FFFFFFF

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream_seed = self._stream_seed()
        self.epoch += 1
        rng = random.Random(stream_seed)
        shard_rng = random.Random(rng.getrandbits(32))

        def resampled_shards() -> Iterator[dict[str, str]]:
            while True:
                yield {"url": shard_rng.choice(self.urls)}

        skips = SkipCounter(self.source, self.max_skips_in_a_row)  # endless stream: must not spin on bad data
        samples = read_tar_samples(resampled_shards(), skips)
        if self.oversample:
            samples = oversampled(samples, self.oversample, rng)
        if self.shuffle_buffer > 1:
            samples = wds.filters.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(samples)
        batches = decode_and_batch(samples, self.transform, self.batch_size, rng, False, skips, self.require_caption)
        for _, batch in zip(range(self._worker_batches()), batches, strict=False):
            yield batch


def val_reader_parts(num_shards: int, reader: int, readers: int) -> list[tuple[int, int, int]]:
    """What val reader `reader` of `readers` reads, as (shard index, share, shares): keep the shard's samples whose
    index is share mod shares. With enough shards: whole shards s with s mod readers == reader. With fewer: one
    shard (reader mod shards), shared by the readers of the same shard, each keeping every k-th sample (k = that
    shard's readers). Readers are numbered rank + world × worker, so enough shards are split by rank, then by worker
    (the plain split), and shared shards spread over ranks."""
    if num_shards >= readers:
        return [(shard, 0, 1) for shard in range(reader, num_shards, readers)]
    shard = reader % num_shards
    return [(shard, reader // num_shards, len(range(shard, readers, num_shards)))]


def val_samples_per_rank(shard_sizes: list[int], world: int, workers: int) -> list[int]:
    """How many samples each rank's val readers get from shards of these sizes (before any is skipped)."""
    readers = world * workers
    counts = [0] * world
    for reader in range(readers):
        for shard, share, shares in val_reader_parts(len(shard_sizes), reader, readers):
            counts[reader % world] += len(range(share, shard_sizes[shard], shares))
    return counts


class ValStream(IterableDataset):
    """Each val sample exactly once across ranks × workers, on any number of shards (val_reader_parts); last batch
    partial.

    The rank split is done here from the rank the DataModule was given, not by webdataset's split_by_node: that one
    asks torch.distributed or $RANK from inside the worker process, where neither is reliably set.
    """

    def __init__(
        self,
        urls: list[str],
        transform: ImageTransform,
        batch_size: int,
        rank: int,
        world: int,
        require_caption: bool = False,
        source: str = "data.val",
    ) -> None:
        super().__init__()
        self.urls = urls
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.require_caption = require_caption
        self.source = source

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker_index()
        parts = val_reader_parts(len(self.urls), self.rank + self.world * worker, self.world * num_workers)
        reads = [{"url": self.urls[shard], "share": share, "shares": shares} for shard, share, shares in parts]
        skips = SkipCounter(self.source)  # finite: ends by itself even if every sample is skipped
        samples = read_tar_samples(reads, skips)
        yield from decode_and_batch(
            samples, self.transform, self.batch_size, random.Random(0), True, skips, self.require_caption
        )


class ShardDataModule(L.LightningDataModule):
    """Webdataset shards -> batches {"image": float [-1,1] NCHW, "caption": list[str], "meta": list[dict] (each
    sample's json member), "__key__": list[str], "skipped": int}.

    Args:
        train: URL pattern of training shards (`dir/train-{000000..000052}.tar`, `https://...`, `pipe:cmd`), or a
            folder / manifest.json written by `gen-lightning shards` (its train split is used).
        val: the same for validation (a folder/manifest uses its val split); None disables validation data.
        image_size: output H = W after resize of the shorter side and crop.
        batch_size: per-rank batch size.
        samples_per_epoch: training samples per epoch over all ranks; None takes the manifest's train count.
        num_workers: DataLoader worker processes per rank.
        shuffle_buffer: samples held for shuffling in each worker (0 or 1 disables).
        random_crop / random_flip: augmentations for training (val always center-crops, never flips).
        seed: base seed of shard resampling and shuffling.
        require_captions: skip (and count) samples whose caption is missing or blank. None: when the model trains on
            captions (text-to-image, CLIP); unconditional models keep such samples, with caption "".
        max_skips_in_a_row: training stops with an error naming data.train after this many unusable samples in a
            row (the resampled stream is endless: data with nothing usable would otherwise hang the run).
        oversample: `{"field=value": factor}` on the samples' json member, e.g. `{"kind=click": 3}`: matching
            training samples are drawn `factor` times as often (data.oversample; epochs keep their length).
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        image_size: int = 32,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        samples_per_epoch: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        random_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        require_captions: bool | None = None,
        max_skips_in_a_row: int = 10_000,
        oversample: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train = train
        self.val = val
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.samples_per_epoch = samples_per_epoch
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed
        self.require_captions = require_captions
        self.max_skips_in_a_row = max_skips_in_a_row
        self.oversample = parse_rules(oversample)
        self._oversample_checked = False
        self.resumed_at = 0
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []

    def _distributed(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def captions_required(self) -> bool:
        if self.require_captions is not None:
            return self.require_captions
        trainer = self.trainer
        return trainer is not None and model_trains_on_captions(trainer.lightning_module)

    def setup(self, stage: str | None = None) -> None:
        if self.train:  # also outside fit: the FID floor reads the training images
            self.train_urls = expand_pattern(split_urls(self.train, "train"))
            if stage in (None, "fit") and self.samples_per_epoch is None:
                self.samples_per_epoch = self._manifest_count(self.train, "train")
            if stage in (None, "fit") and self.oversample and not self._oversample_checked:
                self._check_oversample_rules()
        if self.val:
            self.val_urls = expand_pattern(split_urls(self.val, "val"))
            self._check_every_rank_gets_val_samples()

    def _check_every_rank_gets_val_samples(self) -> None:
        """A rank without val batches never logs val metrics, so it skips the reduction at the epoch's end that the
        other ranks wait in: refused here when the manifest says how many samples each shard holds."""
        if split_urls(self.val, "val") == self.val:
            return  # a URL pattern: shard sizes are unknown until read
        from gen_lightning.data.shard_writer import read_manifest

        sizes = [int(shard["num_samples"]) for shard in read_manifest(Path(self.val))["splits"]["val"]["shards"]]
        _, world = self._distributed()
        counts = val_samples_per_rank(sizes, world, max(1, self.num_workers))
        if 0 in counts:
            raise ShardPatternError(
                f"val shards {self.val!r}: {sum(sizes)} sample(s) in {len(sizes)} shard(s) leave rank "
                f"{counts.index(0)} of {world} without val samples (validation would wait for it forever); use more "
                "val samples or fewer ranks"
            )

    def _check_oversample_rules(self) -> None:
        """Read the first training shard's metadata once: a rule on a field it lacks is refused by name, and the
        mix the rules make is logged."""
        first = self.train_urls[0]
        samples = read_tar_samples([{"url": first}], SkipCounter(f"data.train={self.train!r}"))
        line, every_rule_matched = check_rules_match(self.oversample, samples, first)
        drain_skipped()  # a bad sample here is counted when training reads it, not twice
        (log.info if every_rule_matched else log.warning)(line)
        self._oversample_checked = True

    @staticmethod
    def _manifest_count(source: str, split: str) -> int:
        if split_urls(source, split) == source:
            raise ValueError(f"data.samples_per_epoch is required when data.train is a URL pattern ({source!r})")
        from gen_lightning.data.shard_writer import read_manifest

        return int(read_manifest(Path(source))["splits"][split]["num_samples"])

    def train_dataloader(self) -> DataLoader:
        if not self.train_urls:
            raise ValueError("data.train is not set (or setup('fit') was not run): no training shards")
        rank, world = self._distributed()
        workers = max(1, self.num_workers)
        batches_per_rank = max(1, self.samples_per_epoch // (world * self.batch_size))
        stream = TrainStream(
            self.train_urls,
            ImageTransform(self.image_size, self.random_crop, self.random_flip),
            self.batch_size,
            batches_per_rank=batches_per_rank,
            num_workers=workers,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=rank,
            resumed_at=self.resumed_at,
            require_caption=self.captions_required(),
            max_skips_in_a_row=self.max_skips_in_a_row,
            source=f"data.train={self.train!r}",
            oversample=self.oversample,
        )
        return self._loader(stream)

    def state_dict(self) -> dict[str, Any]:
        """Stored in checkpoints: the step the data stream had reached, so a resumed stream is a new one."""
        return {"stream_step": self.trainer.global_step if self.trainer is not None else 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resumed_at = int(state_dict.get("stream_step", 0))
        # Lightning then warns that a mid-epoch resume with a non-resumable loader "can cause unreliable results":
        # it means replaying the epoch's first samples, which the reseeded stream above does not do.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    def val_sample_count(self) -> int | None:
        """The val split's sample count over all ranks from its manifest when data.val is a shard folder (or its
        manifest.json); None for a URL pattern, which carries no count. For progress lines' ETA only: reading the
        shards reports a real problem."""
        return _split_count(self.val, "val")

    def train_sample_count(self) -> int | None:
        """The same for data.train (the FID floor spreads its images over the whole split with it)."""
        return _split_count(self.train, "train")

    def val_source(self) -> dict[str, Any] | None:
        """What the val shards were made from: the manifest's `source` entry (the recorder's app name and version,
        its frame size, ...) when data.val is a shard folder (or its manifest.json); None for a URL pattern."""
        if not self.val or split_urls(self.val, "val") == self.val:
            return None
        from gen_lightning.data.shard_writer import read_manifest

        source = read_manifest(Path(self.val)).get("source")
        return source if isinstance(source, dict) else None

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        return self._read_once(self.val_urls, self.captions_required(), f"data.val={self.val!r}")

    def train_in_order(self) -> DataLoader:
        """The training split read as the val split is (each sample once over all ranks, in shard order, centre-
        cropped, never flipped), for the FID floor: real training images in place of generated ones."""
        return self._read_once(self.train_urls, False, f"data.train={self.train!r}")

    def _read_once(self, urls: list[str], require_caption: bool, source: str) -> DataLoader:
        rank, world = self._distributed()
        stream = ValStream(
            urls,
            ImageTransform(self.image_size),
            self.val_batch_size,
            rank,
            world,
            require_caption=require_caption,
            source=source,
        )
        return self._loader(stream)

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if self.num_workers > 0 else None,
            worker_init_fn=functools.partial(init_loader_worker, _expected_parent()) if self.num_workers > 0 else None,
        )


def _split_count(source: str | None, split: str) -> int | None:
    """A split's sample count from the manifest of a shard folder; None for a URL pattern or an unreadable manifest."""
    if not source or split_urls(source, split) == source:
        return None
    try:
        return ShardDataModule._manifest_count(source, split)
    except (OSError, ValueError, KeyError, TypeError):
        return None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _expected_parent() -> int | None:
    """The pid a loader worker's parent must have: this process, unless workers start from a forkserver (their parent
    is then the server, which exits when this process does)."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return None if method == "forkserver" else os.getpid()


# What a scheduler sends a job's every process before killing it: SLURM signals all processes of a job step at its
# time limit, on scancel and on preemption (SIGTERM), and ahead of the end with `--signal=SIGUSR1@90` (SlurmRequeue's).
JOB_END_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def init_loader_worker(parent: int | None, worker_id: int) -> None:
    """worker_init_fn: the worker ignores the job-end signals and dies with its parent.

    The fit saves its step on SIGTERM and its requeue checkpoint on SIGUSR1 (callbacks/checkpoint.py, requeue.py).
    A worker killed by the same signal, sent to the whole job (SLURM, `kill -- -PGID`), turned that into PyTorch's
    "DataLoader worker is killed by signal: Terminated" in the main process: a traceback, and no checkpoint, so the
    steps since the last periodic one were lost. The main process ends its workers when it is done with them, and
    the kernel kills them if it dies first (die_with_parent).
    """
    for signum in JOB_END_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent(parent, worker_id)


def die_with_parent(parent: int | None, worker_id: int) -> None:
    """The kernel kills this loader worker when the process that started it dies, however it dies.

    PyTorch's workers look for their parent only between batches (every 5 s when idle), so a worker blocked in a read
    (a stalled `pipe:` or network shard) outlived a SIGKILLed or OOM-killed fit for as long as the read blocked,
    re-parented to init. The signal comes when the *thread* that started the worker ends: Lightning starts them from
    the main thread, which lives as long as the fit. A parent that died before prctl ran (the worker then has another
    parent already) is caught by comparing pids.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("loader worker %d: prctl(PR_SET_PDEATHSIG) failed (errno %d)", worker_id, ctypes.get_errno())
    if parent is not None and os.getppid() != parent:
        os._exit(1)  # not sys.exit: Python's exit handlers could wait on queues to the dead parent
