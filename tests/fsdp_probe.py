"""Run by test_presets in a subprocess: 2 gloo ranks wrap a UNet and its EMA with torch's FSDP exactly as
configs/trainer/fsdp.yaml does (its auto_wrap_policy classes, use_orig_params), take two training steps (gradients
clipped by norm) with EMA updates, sample through the EMA copy, and rank 0 compares the gathered weights with the
same steps in one process.

    python tests/fsdp_probe.py OUT.json PORT
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

REPO = Path(__file__).resolve().parents[1]
UNET = {"channels": [8, 16], "attention_levels": [1], "num_heads": 2, "context_dim": 6, "in_channels": 3}
CLIP_NORM = 0.05


def preset_wrap_classes() -> set[type]:
    preset = yaml.safe_load((REPO / "configs" / "trainer" / "fsdp.yaml").read_text())
    paths = preset["trainer"]["strategy"]["init_args"]["auto_wrap_policy"]
    return {getattr(importlib.import_module(path.rpartition(".")[0]), path.rpartition(".")[2]) for path in paths}


class Diffusion(nn.Module):
    """The parts of DiffusionModel that FSDP sees: the UNet and the EMA holding its copy."""

    def __init__(self) -> None:
        super().__init__()
        from gen_lightning.nn.ema import EMA
        from gen_lightning.nn.unet import UNet

        torch.manual_seed(0)
        self.unet = UNet(UNET)
        torch.nn.init.normal_(self.unet.out_conv.weight, std=0.1)  # zero-initialised: nothing would train at step 1
        self.ema = EMA(self.unet)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context)  # training steps run through the root, as Lightning's do


def batch(rank: int, world: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 5, 6, generator=generator)
    t = torch.randint(0, 1000, (4,), generator=generator)
    return tuple(part.chunk(world)[rank] for part in (x, t, context))


def train(model: nn.Module, rank: int, world: int) -> torch.Tensor:
    """Two steps, each followed by the EMA update (DiffusionModel does it in optimizer_step), then one denoising
    call of the EMA copy, as sample() and the sample-grid callback make it (not through the root)."""
    inner = getattr(model, "module", model)
    optimizer = torch.optim.SGD(inner.unet.parameters(), lr=0.1)
    x, t, context = batch(rank, world)
    for _ in range(2):
        loss = (model(x, t, context) - x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        # The configs clip at norm 1; FSDP must take the norm over every rank's shard (GenerativeModule does so).
        if isinstance(model, FullyShardedDataParallel):
            norm = model.clip_grad_norm_(CLIP_NORM)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        assert norm > CLIP_NORM  # the clip is active
        optimizer.step()
        inner.ema.update(inner.unet)
    with torch.no_grad():
        return inner.ema.shadow(x, t, context)


def rank_main(rank: int, world: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    reference = Diffusion()
    sharded = FullyShardedDataParallel(
        copy.deepcopy(reference),
        auto_wrap_policy=ModuleWrapPolicy(preset_wrap_classes()),
        use_orig_params=True,
        device_id=torch.device("cpu"),  # FSDP runs on CPU with gloo when told so
    )
    outputs = [torch.zeros(2, 3, 8, 8) for _ in range(world)]
    dist.all_gather(outputs, train(sharded, rank, world))
    full = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(sharded, StateDictType.FULL_STATE_DICT, full):
        state = sharded.state_dict()
    if rank == 0:
        expected_output = train(reference, 0, 1)  # the whole batch in one process: the same mean gradient
        expected = reference.state_dict()
        diffs = {name: float((state[name] - expected[name]).abs().max()) for name in expected if name in state}
        moved = float((expected["ema.shadow.out_conv.weight"] - Diffusion().state_dict()["ema.shadow.out_conv.weight"])
                      .abs().max())  # fmt: skip
        report = {
            "missing": sorted(set(expected) - set(state)),
            "max_weight_diff": max(diffs.values()),
            "max_ema_diff": max(v for k, v in diffs.items() if k.startswith("ema.")),
            "ema_moved": moved,
            "max_output_diff": float((torch.cat(outputs) - expected_output).abs().max()),
        }
        Path(out).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out, port = sys.argv[1], int(sys.argv[2])
    sys.path.insert(0, str(REPO))
    mp.spawn(rank_main, args=(2, out, port), nprocs=2, join=True)
