"""Fit progress without a terminal: plain lines in place of Lightning's redrawn progress bar."""

from __future__ import annotations

import math
import statistics
import sys
import time
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from tqdm import tqdm

# Lightning's stock bars, which it adds when no progress bar is configured; a bar the user chose another way stays.
STOCK_BARS = (RichProgressBar, TQDMProgressBar)


def interactive() -> bool:
    """Lightning's bar draws on stdout and our lines go to stderr: a terminal only when both are one."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, dict):
        if batch.get("__key__") is not None:
            return len(batch["__key__"])
        return int(next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0])
    first = batch[0] if isinstance(batch, list | tuple) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else 0


class FitProgress(L.Callback):
    """Without a terminal (an sbatch log, a pipe): switches off Lightning's stock progress bar, whose `\\r` redraws
    fill a log file with fragments, and prints on global rank 0, every `every_n_steps` optimizer steps and at the
    end of training, a line to stderr:

        train: step STEP/TOTAL (PERCENT%), loss LOSS, RATE samples/s, MM:SS elapsed, ETA MM:SS

    loss: the mean training loss over the batches since the last line; samples/s: the median rate of those batches
    (batch end to batch end), over all ranks (this rank's times the world size: every rank gets the same number of
    batches), so a batch that also validated, sampled or evaluated does not skew it; ETA: from the steps per second
    since this launch started training, all of that included. After each validation a line with the `val/*`
    numbers. On a terminal it stands aside and Lightning's bar shows.

    The CLI adds one with the defaults; one listed in `trainer.callbacks` replaces it (the first one found acts)."""

    def __init__(self, every_n_steps: int = 50, force: bool | None = None, file: IO[str] | None = None) -> None:
        """force: True prints lines even on a terminal, False never; None decides by the terminal."""
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.force = force
        self.file = file
        self.active = False
        self._last_batch_end: float | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._rates: list[float] = []

    def _print(self, line: str) -> None:
        print(line, file=self.file or sys.stderr, flush=True)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        first = next(cb for cb in trainer.callbacks if isinstance(cb, FitProgress))
        lines = not interactive() if self.force is None else self.force
        self.active = stage == "fit" and first is self and lines
        if self.active and isinstance(trainer.progress_bar_callback, STOCK_BARS):
            trainer.progress_bar_callback.disable()
        self.active = self.active and trainer.is_global_zero

    def total_steps(self, trainer: L.Trainer) -> int | None:
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self._start_time, self._start_step = time.perf_counter(), trainer.global_step
        self._last_step = trainer.global_step
        self._last_batch_end = None  # the first batch's time includes starting the loader workers
        total = self.total_steps(trainer)
        until = f"to step {total}" if total is not None else "without a step limit"
        self._print(f"train: from step {trainer.global_step} {until}, a line every {self.every_n_steps} steps")
        self._reset_window()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_
    ) -> None:
        if not self.active:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach().float()  # summed on the device: no synchronisation until a line is printed
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1
        now = time.perf_counter()
        if self._last_batch_end is not None and now > self._last_batch_end:
            self._rates.append(batch_size_of(batch) / (now - self._last_batch_end))
        self._last_batch_end = now
        step = trainer.global_step
        if step != self._last_step and (step % self.every_n_steps == 0 or step == trainer.max_steps):
            self._print_step(trainer)  # the last step's line before any end-of-training sampling or evaluation

    def _print_step(self, trainer: L.Trainer) -> None:
        now = time.perf_counter()
        step, total = trainer.global_step, self.total_steps(trainer)
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        if self._loss_count:
            parts.append(f"loss {float(self._loss_sum) / self._loss_count:.4g}")
        if self._rates:
            parts.append(f"{statistics.median(self._rates) * trainer.world_size:.1f} samples/s")
        elapsed = now - self._start_time
        parts.append(f"{tqdm.format_interval(elapsed)} elapsed")
        done = step - self._start_step
        if total and done > 0:
            parts.append(f"ETA {tqdm.format_interval((total - step) * elapsed / done)}")
        self._print("train: " + ", ".join(parts))
        self._last_step = step
        self._reset_window()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active or trainer.sanity_checking:
            return
        seconds = time.perf_counter() - self._validation_start
        numbers = [
            f"{name} {float(value):.4g}"
            for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith("val/") and isinstance(value, torch.Tensor) and value.numel() == 1
        ]
        summary = ", ".join(numbers) or "done"
        self._print(f"validation at step {trainer.global_step}: {summary} ({tqdm.format_interval(seconds)})")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and trainer.global_step != self._last_step:
            self._print_step(trainer)
