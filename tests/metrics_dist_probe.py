"""Run by the metric tests in a subprocess: 2 gloo ranks each feed their share of the data to a metric (torchmetrics
syncs the states at compute()); each rank writes what it computed.

    python tests/metrics_dist_probe.py generative|world DATA.pt OUT_DIR PORT

generative: GenerativeMetrics on features {"real", "fake"}, halves per rank (or the real side from {"cache",
"key"}). world: WorldMetrics on frames {"predicted", "real", "last"} (one step) and {"rollout_predicted",
"rollout_real", "start"} (rollouts), split unevenly (rank 0 takes the first `split` samples), as the last batch of
an epoch splits over ranks."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def generative(rank: int, world: int, data: dict) -> dict:
    from gen_lightning.metrics.generative import GenerativeMetrics

    metrics = GenerativeMetrics(extractor=torch.nn.Identity(), kid_subset_size=data["kid_subset_size"], kid_subsets=20)
    if "cache" in data:  # the reference from the cache, loaded as GenerativeEvaluation loads it
        assert metrics.load_real(data["cache"], data["key"], rank, world)
    else:
        metrics.update_features(data["real"].chunk(world)[rank], real=True)
    metrics.update_features(data["fake"].chunk(world)[rank], real=False)
    torch.manual_seed(rank)  # each rank's global RNG differs, as in training: KID must not depend on it
    return metrics.compute()


def world_metrics(rank: int, world: int, data: dict) -> dict:
    from gen_lightning.metrics.world import WorldMetrics

    def share(tensor: torch.Tensor) -> torch.Tensor:
        split = data["split"]
        return tensor[:split] if rank == 0 else tensor[split:]

    metrics = WorldMetrics(rollout_steps=data["rollout_real"].shape[1])
    metrics.update_one_step(share(data["predicted"]), share(data["real"]), share(data["last"]))
    metrics.update_rollout(share(data["rollout_predicted"]), share(data["rollout_real"]), share(data["start"]))
    return metrics.compute()


KINDS = {"generative": generative, "world": world_metrics}


def rank_main(rank: int, world: int, kind: str, data_path: str, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = KINDS[kind](rank, world, torch.load(data_path))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()  # leave together (see distill_dist_probe)
    dist.destroy_process_group()


if __name__ == "__main__":
    kind, data_path, out_dir, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    mp.spawn(rank_main, args=(2, kind, data_path, out_dir, port), nprocs=2, join=True)
