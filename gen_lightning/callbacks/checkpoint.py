"""Checkpoints under `<default_root_dir>/checkpoints` (not inside the logger's folder), so a run's files and its
resume point are found from the one directory the user chose."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose default dirpath is `<trainer.default_root_dir>/checkpoints` and that keeps `last.ckpt`."""

    def __init__(self, *args, save_last: bool = True, **kwargs) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)
