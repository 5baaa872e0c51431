"""Run by test_presets in a subprocess: 2 gloo ranks wrap models with torch's FSDP exactly as
configs/trainer/fsdp.yaml does (its auto_wrap_policy classes, use_orig_params), take two training steps (gradients
clipped by norm) with EMA updates, sample through the EMA copy, and rank 0 compares the gathered weights and the
samples with the same steps in one process. Three models, in one process group:
- "unet": a UNet and its EMA (what DiffusionModel's FSDP units are);
- "ldm_text", "ldm_clip": a whole LatentDiffusionModel, trainable text encoder or CLIP's frozen text tower, its
  frozen VAE encoder run inside the root forward and its decoder when sampling;
- "ldm_dit": the same with the DiT backbone (each DiTBlock a unit: cross-attention to the text, pooled text to
  adaLN) and the flow objective.

    python tests/fsdp_probe.py OUT.json PORT VAE.ckpt CLIP.ckpt
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
PROMPTS = ["red circle", "blue square"]


def preset_wrap_classes() -> set[type]:
    preset = yaml.safe_load((REPO / "configs" / "trainer" / "fsdp.yaml").read_text())
    paths = preset["trainer"]["strategy"]["init_args"]["auto_wrap_policy"]
    return {getattr(importlib.import_module(path.rpartition(".")[0]), path.rpartition(".")[2]) for path in paths}


def shard(module: nn.Module) -> FullyShardedDataParallel:
    return FullyShardedDataParallel(
        module,
        auto_wrap_policy=ModuleWrapPolicy(preset_wrap_classes()),
        use_orig_params=True,
        device_id=torch.device("cpu"),  # FSDP runs on CPU with gloo when told so
    )


def clipped_step(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    loss.backward()
    # The configs clip at norm 1; FSDP must take the norm over every rank's shard (GenerativeModule does so).
    if isinstance(model, FullyShardedDataParallel):
        norm = model.clip_grad_norm_(CLIP_NORM)
    else:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    assert norm > CLIP_NORM  # the clip is active
    optimizer.step()


def chunk(tensors: tuple[torch.Tensor, ...], rank: int, world: int) -> tuple[torch.Tensor, ...]:
    return tuple(part.chunk(world)[rank] for part in tensors)


# --- a UNet and its EMA ---------------------------------------------------------------------------------------------
class Diffusion(nn.Module):
    """The parts of DiffusionModel that FSDP sees: the UNet and the EMA holding its copy."""

    def __init__(self) -> None:
        super().__init__()
        from gen_lightning.nn.ema import EMA
        from gen_lightning.nn.unet import UNet

        torch.manual_seed(0)
        self.net = UNet(UNET)
        torch.nn.init.normal_(self.net.out_conv.weight, std=0.1)  # zero-initialised: nothing would train at step 1
        self.ema = EMA(self.net)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, context)  # training steps run through the root, as Lightning's do


def train_unet(model: nn.Module, rank: int, world: int) -> torch.Tensor:
    """Two steps, each followed by the EMA update (DiffusionModel does it in optimizer_step), then one denoising
    call of the EMA copy on the whole batch, as sample() and the sample-grid callback make it (not through the
    root)."""
    inner = getattr(model, "module", model)
    optimizer = torch.optim.SGD(inner.net.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    whole = torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 1000, (4,), generator=generator)
    whole = (*whole, torch.randn(4, 5, 6, generator=generator))
    x, t, context = chunk(whole, rank, world)
    for _ in range(2):
        clipped_step(model, (model(x, t, context) - x).square().mean(), optimizer)
        inner.ema.update(inner.net)
    with torch.no_grad():
        return inner.ema.shadow(*whole)


# --- latent diffusion -----------------------------------------------------------------------------------------------
class LatentRoot(nn.Module):
    """What Lightning wraps, and what its training step runs through the root: the model's loss. `drop` forces
    which captions are dropped (DiT's force_drop_ids), so 1 and 2 processes drop the same rows."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, drop: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        x0 = self.model.diffusion_input({"image": images})  # the frozen VAE encoder, inside the root forward
        cond = {"tokens": tokens, "drop": drop}
        return self.model.loss_fn.per_sample(self.model.net, x0, t, noise, extra_args=cond).mean()


DIT = {"patch_size": 2, "width": 16, "depth": 2, "num_heads": 2}


def latent_diffusion(vae: str, clip: str | None, **options: Any) -> nn.Module:
    from gen_lightning.models.latent_diffusion import LatentDiffusionModel
    from gen_lightning.nn.text import TextConfig

    torch.manual_seed(0)
    model = LatentDiffusionModel(
        vae_checkpoint=vae, unet={"channels": [8, 16], "attention_levels": [1], "num_heads": 2},
        text=None if clip else TextConfig(16, 16, 1, 2), clip_checkpoint=clip, image_size=16, latent_scale=1.0,
        caption_dropout=0.5, sample_steps=2, **options,
    )  # fmt: skip
    with torch.no_grad():  # zero-initialised output layers would hide the text: every trainable weight moves
        for param in model.net.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    model.ema.copy_from(model.net)
    return LatentRoot(model)


def train_latent(root: nn.Module, rank: int, world: int) -> torch.Tensor:
    """Two clipped steps with EMA updates, then sample() with guidance through the EMA copy on every rank."""
    model = getattr(root, "module", root).model
    optimizer = torch.optim.SGD([p for p in model.net.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    tokens = model.net.tokenize(["red circle", "blue square", "green circle", "yellow square"])[0]
    drop = torch.tensor([False, True, False, False])
    t = torch.randint(0, 1000, (4,), generator=generator)
    if model.objective == "flow":  # flow times lie in [0, 1]
        t = t / 1000
    noise = torch.randn(4, *model.sample_shape, generator=generator)
    batch = chunk((images, tokens, drop, t, noise), rank, world)
    for _ in range(2):
        clipped_step(root, root(*batch), optimizer)
        model.ema.update(model.net)
    return model.sample(2, PROMPTS, steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0))


# --- the comparison -------------------------------------------------------------------------------------------------
def full_state(sharded: FullyShardedDataParallel) -> dict[str, torch.Tensor]:
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(sharded, StateDictType.FULL_STATE_DICT, config):
        return sharded.state_dict()


def largest_diff(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], part: str) -> float:
    diffs = [float((state[k].float() - v.float()).abs().max()) for k, v in expected.items() if part in k and k in state]
    return max(diffs)


def compare(
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module, int, int], torch.Tensor],
    rank: int,
    world: int,
    moved: str,
    frozen: tuple[str, ...] = (),
) -> dict[str, Any] | None:
    """Train `build()` sharded on every rank and in one process on rank 0; rank 0's report."""
    reference = build()
    initial = copy.deepcopy(reference.state_dict())
    sharded = shard(copy.deepcopy(reference))
    output = train(sharded, rank, world)
    outputs = [torch.zeros_like(output) for _ in range(world)]
    dist.all_gather(outputs, output.contiguous())
    state = full_state(sharded)
    if rank != 0:
        return None
    expected_output = train(reference, 0, 1)  # the whole batch in one process: the same mean gradient
    expected = reference.state_dict()
    report = {
        "missing": sorted(set(expected) - set(state)),
        "max_weight_diff": largest_diff(state, expected, "net."),
        "max_ema_diff": largest_diff(state, expected, "ema.shadow."),
        "ema_moved": float((expected[moved] - initial[moved]).abs().max()),
        "max_output_diff": max(float((o - expected_output).abs().max()) for o in outputs),  # every rank's
    }
    for part in frozen:  # frozen networks: not one bit moved, sharded or not
        report[f"frozen_diff {part}"] = max(largest_diff(state, initial, part), largest_diff(expected, initial, part))
    return report


def rank_main(rank: int, world: int, out: str, port: int, vae: str, clip: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    reports = {
        "unet": compare(Diffusion, train_unet, rank, world, moved="ema.shadow.out_conv.weight"),
        "ldm_text": compare(
            lambda: latent_diffusion(vae, None), train_latent, rank, world,
            moved="model.ema.shadow.unet.out_conv.weight", frozen=("model.vae.",),
        ),
        "ldm_clip": compare(
            lambda: latent_diffusion(vae, clip), train_latent, rank, world,
            moved="model.ema.shadow.unet.out_conv.weight",
            frozen=("model.vae.", "model.net.text.", "model.ema.shadow.text."),
        ),
        "ldm_dit": compare(
            lambda: latent_diffusion(vae, None, backbone="dit", dit=DIT, objective="flow"), train_latent, rank, world,
            moved="model.ema.shadow.unet.final.linear.weight", frozen=("model.vae.",),
        ),
    }  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps(reports))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out, port, vae, clip = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sys.path.insert(0, str(REPO))
    mp.spawn(rank_main, args=(2, out, port, vae, clip), nprocs=2, join=True)
