"""Run by test_clip in a subprocess: 2 gloo ranks wrap a tiny CLIPModel in DDP, each computes the CLIP loss on its
half of a batch (features gathered across ranks), back-propagates (DDP averages the gradients) and saves the
loss and gradients, which the test compares with one process on the whole batch."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel


class Step(torch.nn.Module):
    """forward = one CLIP loss, so DDP sees every parameter used in forward (its gradient hooks need that)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        image_features, text_features = self.model.embed(images, captions)
        return self.model.loss_fn(image_features, text_features, self.model.net.logit_scale.exp())


def rank_main(rank: int, world: int, batch_path: str, out_dir: str, port: int, local_loss: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: `tests` imports
    from tests.test_clip import tiny_clip

    data = torch.load(batch_path)
    model = tiny_clip(local_loss=local_loss)
    model.load_state_dict(data["state_dict"])
    step = DistributedDataParallel(Step(model))
    n = data["images"].shape[0] // world
    rows = slice(rank * n, (rank + 1) * n)
    loss = step(data["images"][rows], data["captions"][rows])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    del step  # as in distill_dist_probe: drop DDP, then leave together
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    batch_path, out_dir, port, local_loss = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "local"
    mp.spawn(rank_main, args=(2, batch_path, out_dir, port, local_loss), nprocs=2, join=True)
