"""Run by test_val_split in a subprocess: Trainer.validate of a tiny VAE (seeded, so every process holds the same
weights) on a val shard set, first in this process without loader workers, then with Lightning's DDP on WORLD real
gloo ranks × WORKERS loader workers (Lightning starts ranks 1.. as copies of this command, as it does for
`gen-lightning fit --trainer.devices=N`). Each rank of each run writes the val keys it saw, its number of val batches
and the metrics Lightning logged (reduced over ranks) to OUT_DIR/world{W}_rank{R}.json.

    python tests/val_split_probe.py SHARDS OUT_DIR WORLD WORKERS
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

BATCH_SIZE = 3  # odd, so readers with different sample counts end with different numbers of batches
IMAGE_SIZE = 16


class ValRecorder(L.Callback):
    def __init__(self) -> None:
        self.keys: list[str] = []
        self.batches = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.keys += batch["__key__"]
        self.batches += 1


def validate(shards: str, out_dir: str, world: int, workers: int) -> None:
    from gen_lightning.data.datamodule import ShardDataModule
    from gen_lightning.models.vae import VAEModel

    torch.manual_seed(0)
    model = VAEModel(autoencoder={"channels": [8, 8], "latent_channels": 4, "num_heads": 1}, image_size=IMAGE_SIZE)
    data = ShardDataModule(val=shards, image_size=IMAGE_SIZE, batch_size=BATCH_SIZE, num_workers=workers)
    recorder = ValRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        default_root_dir=out_dir,
    )
    trainer.validate(model, datamodule=data, verbose=False)
    report: dict[str, Any] = {
        "keys": recorder.keys,
        "batches": recorder.batches,
        "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
    }
    Path(out_dir, f"world{world}_rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    shards, out_dir, world, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if "LOCAL_RANK" not in os.environ:  # the launching process (rank 0): the one-process reference first
        validate(shards, out_dir, world=1, workers=0)
    validate(shards, out_dir, world, workers)
