"""Run by tests/test_distillation.py in a subprocess: 2 gloo ranks distil one batch under DistributedDataParallel,
each rank its half with its own generator; each rank writes the all-reduced loss and the student's weights after one
SGD step.

    python tests/distill_dist_probe.py TEACHER.ckpt METHOD DATA.pt OUT_DIR PORT
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel


def build_student(teacher: str, method: str) -> Any:
    from gen_lightning.models.distillation import DistilledDiffusionModel

    return DistilledDiffusionModel(teacher, method=method, teacher_steps=8, rounds=2, grid_steps=8)


def half_loss(model: Any, student: Any, images: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank `rank`'s loss on its half of the batch, drawn from a generator seeded by the rank (the single-process
    reference draws both halves the same way)."""
    generator = torch.Generator().manual_seed(100 + rank)
    return model.distillation_loss(student, {"image": images}, generator)


def rank_main(rank: int, world: int, teacher: str, method: str, data_path: str, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build_student(teacher, method)
    images = torch.load(data_path)["images"].chunk(world)[rank]
    student = DistributedDataParallel(model.net)
    optimizer = torch.optim.SGD(model.net.parameters(), lr=0.1)
    loss = half_loss(model, student, images, rank)
    loss.backward()  # DDP averages the gradients over the ranks
    optimizer.step()
    reduced = loss.detach().clone()
    dist.all_reduce(reduced)
    torch.save(model.net.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"loss": float(reduced) / world}, f)
    # Once rank 0 left, a rank still inside a collective, or tearing down its DDP reducer after the group is gone,
    # aborted ("terminate called without an active exception", 1 CI run): drop DDP, then leave together.
    del student
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    teacher, method, data_path, out_dir, port = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    mp.spawn(rank_main, args=(2, teacher, method, data_path, out_dir, port), nprocs=2, join=True)
