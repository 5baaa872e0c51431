"""Small collectives that work the same with and without an initialised process group."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...]; [obj] when not distributed. For small, unequal-sized per-rank results
    (validation features of a few thousand samples), where tensor all_gather would need padding."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def rank_count(total: int, world: int, rank: int) -> int:
    """This rank's part of `total` items split as evenly as possible: the parts add up to `total` (a metric over N
    samples must see N), and each rank has at least one."""
    base, extra = divmod(total, world)
    return max(1, base + (rank < extra))
