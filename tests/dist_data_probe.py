"""Run by test_datamodule in a subprocess: 2 real gloo ranks × 2 DataLoader workers read the same shards and report
what each rank saw (val keys, train batch count) as JSON."""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist
import torch.multiprocessing as mp

# 45 batches of 4 per rank and 3 samples over: an odd count, so 2 workers cannot each take the same share
SAMPLES_PER_EPOCH = 2 * 4 * 45 + 3


def rank_main(rank: int, world: int, shards: str, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from gen_lightning.data.datamodule import ShardDataModule

    data = ShardDataModule(
        train=shards, val=shards, image_size=16, batch_size=4, num_workers=2, shuffle_buffer=16,
        samples_per_epoch=SAMPLES_PER_EPOCH,
    )  # fmt: skip
    data.setup("fit")
    val_keys = [key for batch in data.val_dataloader() for key in batch["__key__"]]
    train_batches = [len(batch["__key__"]) for batch in data.train_dataloader()]
    second_epoch = sum(1 for _ in data.train_dataloader())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"val_keys": val_keys, "train_batches": train_batches, "second_epoch": second_epoch}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    shards, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mp.spawn(rank_main, args=(2, shards, out_dir, port), nprocs=2, join=True)
