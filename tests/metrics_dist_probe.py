"""Run by test_metrics in a subprocess: 2 gloo ranks each feed half of the real and fake features to
GenerativeMetrics; torchmetrics syncs the states at compute(); each rank writes what it computed."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank: int, world: int, features_path: str, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from gen_lightning.metrics.generative import GenerativeMetrics

    data = torch.load(features_path)
    metrics = GenerativeMetrics(extractor=torch.nn.Identity(), kid_subset_size=8, kid_subsets=20)
    for name, real in (("real", True), ("fake", False)):
        metrics.update_features(data[name].chunk(world)[rank], real=real)
    result = metrics.compute()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    features_path, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mp.spawn(rank_main, args=(2, features_path, out_dir, port), nprocs=2, join=True)
