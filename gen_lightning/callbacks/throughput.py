"""Training samples/s and the count of skipped (corrupt) samples, logged for every model family."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class DataThroughput(L.Callback):
    """Logs `train/samples_per_sec` (this rank, wall clock between batch ends, smoothed) and `data/skipped_samples`
    (running total over all ranks and workers; each batch carries the count its worker skipped since its last batch)."""

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = smoothing
        self._last_time: float | None = None
        self._rate: float | None = None
        self._skipped_local = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_time = None  # the epoch boundary (validation, worker start) is not training time

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_: Any):
        if not isinstance(batch, dict):
            return
        now = time.perf_counter()
        size = len(batch.get("__key__", ())) or int(batch["image"].shape[0])
        if self._last_time is not None and now > self._last_time:
            rate = size / (now - self._last_time)
            self._rate = rate if self._rate is None else self.smoothing * self._rate + (1 - self.smoothing) * rate
            pl_module.log("train/samples_per_sec", self._rate, on_step=True, on_epoch=False, batch_size=size)
        self._last_time = now
        self._skipped_local += int(batch.get("skipped", 0))

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_):
        if isinstance(batch, dict):
            self._skipped_local += int(batch.get("skipped", 0))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # One all-reduce per epoch (not per step): the total over all ranks and workers so far.
        local = torch.tensor(float(self._skipped_local), device=pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum")
        pl_module.log("data/skipped_samples", total, on_step=False, on_epoch=True, rank_zero_only=True)
