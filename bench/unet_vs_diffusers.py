"""Our UNet and DDIM sampler vs diffusers' UNet2DModel and DDIMScheduler at an equal configuration, in one run.

    .venv/bin/pip install -e .[bench]      # diffusers: a bench-only extra (pulls no torchvision, no other torch)
    .venv/bin/python -m bench.unet_vs_diffusers [--batch 32] [--size 32] [--repeats 4] [--compile]

Configuration: the `configs/ddpm_emoji.yaml` UNet (widths 32/64/64, one residual block per level, attention only in
the middle block, 4 heads, AdaGN "scale_shift" time conditioning) and diffusers' UNet2DModel with the same widths,
blocks, heads, group norm and time-embedding width; both parameter counts are printed. Each side runs in its
best layout (ours: channels_last as configured; diffusers: its default NCHW and, for fairness, channels_last too).

1. Training step: forward + MSE loss + backward + fused AdamW step, batch `--batch` at `--size`², mean step time
   over `--train-steps` steps after 3 warm-up steps; the three cases take steps in turn (as in 3.).
2. Sampling: 50 DDIM steps (η=0) for `--batch` images: our `DiffusionModel.sample` vs diffusers' DDIMScheduler
   driving its UNet2DModel (the DDIMPipeline loop), plus DDIMScheduler driving OUR UNet to isolate sampler overhead.
3. Sampling in lockstep: the same loops advanced one denoising step each in turn, each side's step times summed.
   A slowdown of the machine that lasts longer than one step (most do) then hits both sides of the ratio alike.
The order of the cases changes each repeat (rotated, and reversed on odd repeats: use an even `--repeats`), so no
case always follows the same other one. Runs alternate between the sides `--repeats` times; each ratio is taken
within a repeat (ours / the best diffusers variant of that repeat) and the median over repeats is reported, so drift
of a shared machine cancels. Goal ≤ 0.9. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator

import torch
from torch import nn

from gen_lightning.diffusion import gaussian_noise, sample_steps
from gen_lightning.models import DiffusionModel

WIDTHS = (32, 64, 64)
HEADS = 4


def ours(size: int) -> DiffusionModel:
    model = DiffusionModel(
        unet={"channels": list(WIDTHS), "num_res_blocks": 1, "attention_levels": [], "num_heads": HEADS},
        image_size=size,
        schedule="linear",
        prediction_type="epsilon",
        channels_last=True,
    )
    return model.to(memory_format=torch.channels_last)


def diffusers_unet(size: int) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=WIDTHS,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(WIDTHS),
        up_block_types=("UpBlock2D",) * len(WIDTHS),
        attention_head_dim=WIDTHS[-1] // HEADS,  # mid-block attention: 4 heads of 16, as ours
        norm_num_groups=32,
        resnet_time_scale_shift="scale_shift",  # AdaGN, as our ResBlock
        add_attention=True,
    )


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def median_time(fn: Callable[[], None], steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_fn(net: Callable, params, x: torch.Tensor, call: Callable) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    t = torch.randint(0, 1000, (x.shape[0],))

    def step() -> None:
        loss = torch.nn.functional.mse_loss(call(net, x, t), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


@torch.no_grad()  # as a decorator, grad mode is set around each step: loops in lockstep do not undo each other's
def scheduler_steps(call: Callable, net: nn.Module, shape: tuple[int, ...], steps: int, channels_last: bool):
    """diffusers' DDIMPipeline loop (DDIMScheduler, eta=0, clip_sample) one step at a time."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = call(net, x, t.expand(shape[0]))
        x = scheduler.step(out, t, x, eta=0.0).prev_sample
        yield


def scheduler_sampling_fn(call: Callable, net: nn.Module, shape: tuple[int, ...], steps: int, channels_last: bool):
    return lambda: deque(scheduler_steps(call, net, shape, steps, channels_last), maxlen=0)


def our_steps(model: DiffusionModel, n: int, steps: int):
    """`DiffusionModel.sample`'s loop (eval mode, the configured DDIM sampler, the raw UNet) one step at a time."""
    with model.evaluating():
        sampler = model.make_sampler("ddim", None)
        noise = gaussian_noise((n, *model.sample_shape), device=model.device)
        yield from sample_steps(model.net, sampler, noise, steps)


def repeated(step: Callable[[], None], times: int) -> Iterator[None]:
    for _ in range(times):
        step()
        yield


def rotated(items: dict, repeat: int) -> dict:
    """`items` in the order of this repeat: rotated by `repeat` places (who goes first) and reversed on odd repeats
    (who follows whom when the cases take turns), so a cost one case leaves behind (cache and allocator state) does
    not always land on the same neighbour."""
    names = list(items)[::-1] if repeat % 2 else list(items)
    by = repeat % len(names)
    return {name: items[name] for name in names[by:] + names[:by]}


def lockstep(loops: dict[str, Iterator]) -> dict[str, float]:
    """Advance the sampling loops one denoising step each in turn and sum each loop's step times, so a slowdown of
    the shared machine lasting more than a step (~0.15 s here) hits every side alike."""
    totals = dict.fromkeys(loops, 0.0)
    running = dict(loops)
    done = object()
    while running:
        for name, loop in list(running.items()):
            start = time.perf_counter()
            stepped = next(loop, done)
            totals[name] += time.perf_counter() - start
            if stepped is done:
                del running[name]
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=15)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--compile", action="store_true", help="torch.compile every UNet (compilation in warm-up)")
    ns = parser.parse_args()
    torch.manual_seed(0)
    model = ours(ns.size)
    unet, theirs = model.net, diffusers_unet(ns.size)
    theirs_cl = diffusers_unet(ns.size).to(memory_format=torch.channels_last)
    if ns.compile:
        for net in (unet, theirs, theirs_cl):
            net.compile()  # in place: parameters and call sites unchanged
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}; batch {ns.batch} at {ns.size}²; compiled: {ns.compile}")  # fmt: skip
    print(f"parameters: ours {count(unet):,}  diffusers UNet2DModel {count(theirs):,}")

    x = torch.randn(ns.batch, 3, ns.size, ns.size)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def call_ours(net, inp, t):
        return net(inp, t)

    def call_diffusers(net, inp, t):
        return net(inp, t).sample

    shape = (ns.batch, 3, ns.size, ns.size)
    train_cases = {
        "train ours (channels_last)": train_step_fn(unet, unet.parameters(), x_cl, call_ours),
        "train diffusers (NCHW)": train_step_fn(theirs, theirs.parameters(), x, call_diffusers),
        "train diffusers (channels_last)": train_step_fn(theirs_cl, theirs_cl.parameters(), x_cl, call_diffusers),
    }
    sample_cases: dict[str, Callable[[], None]] = {
        "sample ours (DiffusionModel.sample, DDIM)": lambda: model.sample(
            ns.batch, steps=ns.sample_steps, sampler="ddim"
        ),
        "sample diffusers (DDIMScheduler + UNet2DModel)": scheduler_sampling_fn(
            call_diffusers, theirs, shape, ns.sample_steps, channels_last=False
        ),
        "sample diffusers (DDIMScheduler + UNet2DModel, channels_last)": scheduler_sampling_fn(
            call_diffusers, theirs_cl, shape, ns.sample_steps, channels_last=True
        ),
        "sample DDIMScheduler + OUR UNet": scheduler_sampling_fn(
            call_ours, unet, shape, ns.sample_steps, channels_last=True
        ),
    }
    results: dict[str, list[float]] = {}

    def record(repeat: int, name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)
        print(f"repeat {repeat} {name}: {seconds:.4f} s")

    for repeat in range(ns.repeats):
        for step in train_cases.values():
            for _ in range(3):  # warm-up
                step()
        steps = {name: repeated(step, ns.train_steps) for name, step in train_cases.items()}
        for name, seconds in lockstep(rotated(steps, repeat)).items():
            record(repeat, name, seconds / ns.train_steps)
        # Whole runs in a rotated order, so no case always runs first after the training steps. (Run back to back,
        # our sampler looked ~10% slower than DDIMScheduler driving the same UNet; in lockstep they are equal.)
        for name, sample in rotated(sample_cases, repeat).items():
            record(repeat, name, median_time(sample, 1, warmup=1))
        totals = lockstep(rotated({
            "lockstep ours": our_steps(model, ns.batch, ns.sample_steps),
            "lockstep diffusers (NCHW)": scheduler_steps(call_diffusers, theirs, shape, ns.sample_steps, False),
            "lockstep diffusers (channels_last)":
                scheduler_steps(call_diffusers, theirs_cl, shape, ns.sample_steps, True),
        }, repeat))  # fmt: skip
        for name, seconds in totals.items():
            record(repeat, name, seconds)
    med = {name: statistics.median(values) for name, values in results.items()}
    print("\n| case | median s | runs |\n|---|---|---|")
    for name, value in med.items():
        print(f"| {name} | {value:.4f} | {', '.join(f'{v:.4f}' for v in results[name])} |")

    def ratios(ours_case: str, *baselines: str) -> list[float]:
        """Per repeat: ours / the best baseline of that repeat (cases of one repeat ran back to back, so a
        machine-wide slowdown affects both sides of each ratio alike)."""
        return [results[ours_case][r] / min(results[b][r] for b in baselines) for r in range(ns.repeats)]

    def report(label: str, values: list[float], goal: str) -> None:
        listed = ", ".join(f"{v:.3f}" for v in values)
        print(f"{label}: median {statistics.median(values):.3f} (per repeat {listed}){goal}")

    print()
    report("train step (steps alternate), ours / best diffusers", ratios("train ours (channels_last)",
           "train diffusers (NCHW)", "train diffusers (channels_last)"), " (goal ≤ 0.9)")  # fmt: skip
    report("50-step DDIM sampling, ours / best diffusers", ratios("sample ours (DiffusionModel.sample, DDIM)",
           "sample diffusers (DDIMScheduler + UNet2DModel)",
           "sample diffusers (DDIMScheduler + UNet2DModel, channels_last)"), " (goal ≤ 0.9)")  # fmt: skip
    report("50-step DDIM sampling in lockstep (steps alternate), ours / best diffusers", ratios("lockstep ours",
           "lockstep diffusers (NCHW)", "lockstep diffusers (channels_last)"), " (goal ≤ 0.9)")  # fmt: skip
    report("same UNet, our sampler / DDIMScheduler", ratios("sample ours (DiffusionModel.sample, DDIM)",
           "sample DDIMScheduler + OUR UNet"), "")  # fmt: skip


if __name__ == "__main__":
    main()
