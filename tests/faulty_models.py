"""A model and callbacks that go wrong on purpose, for the NaN-guard tests (used by class_path from the CLI)."""

from __future__ import annotations

import math
import os
import signal
from typing import Any

import lightning as L
import torch

from gen_lightning.models.diffusion import DiffusionModel


class NaNLossDiffusion(DiffusionModel):
    """DiffusionModel whose loss is NaN at the given global steps (from `nan_from` on, if set), or whose loss stays
    finite while one element of one gradient is +inf (`inf_grad_steps`)."""

    def __init__(
        self,
        *args: Any,
        nan_steps: list[int] | None = None,
        nan_from: int | None = None,
        inf_grad_steps: list[int] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.nan_steps = set(nan_steps or [])
        self.nan_from = nan_from
        self.inf_grad_steps = set(inf_grad_steps or [])

    def on_after_backward(self) -> None:
        if self.trainer.global_step in self.inf_grad_steps:
            last = [p for p in self.net.parameters() if p.grad is not None][-1]
            last.grad.view(-1)[0] = math.inf

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        step = self.trainer.global_step
        if step in self.nan_steps or (self.nan_from is not None and step >= self.nan_from):
            return loss * math.nan
        return loss


class PoisonWeights(L.Callback):
    """Fills the model's first parameter with NaN at the end of global step `step` (before checkpoints run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(math.nan)


class SignalSelf(L.Callback):
    """Sends this process `signal_name` at the end of global step `step`: a preemption notice at a known step."""

    def __init__(self, step: int, signal_name: str = "SIGUSR1") -> None:
        self.step = step
        self.signum = signal.Signals[signal_name]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
