"""Framework overhead: `gen-lightning fit` step time vs a bare PyTorch loop on the same UNet, data and optimizer, and
the ShardDataModule's decode rate vs what the training step consumes.

    .venv/bin/python -m bench.overhead [--steps 80] [--repeats 3] [--data data/emoji]

Both sides use the config's UNet, the same ShardDataModule loader (2 workers), fused AdamW with the same warm-up
schedule, gradient clipping at 1.0 and an EMA update per step. Step time = wall time between consecutive ends of a
training step (so data waiting counts), median over the steps after a warm-up. Each repeat measures two ways:
separate runs (bare, then Lightning), and lockstep: one `gen-lightning fit` whose `LockstepBareLoop` callback runs
one bare-loop step after each fit step, so a slowdown of the shared machine hits both sides (the goal's ratio).
Prints ratios; not a test (no thresholds).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
import yaml

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ddpm_emoji.yaml"
WARMUP = 10


class StepTimer(L.Callback):
    """Records the time between consecutive training-step ends (added to the CLI run by class path)."""

    times: ClassVar[list[float]] = []  # class-level: the CLI builds the instance, the bench reads the result
    parameters: ClassVar[int] = 0  # the trained network's, counted at the start of training

    def __init__(self) -> None:
        self.last: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        StepTimer.parameters = sum(p.numel() for p in pl_module.net.parameters())

    def on_train_batch_end(self, *args) -> None:
        now = time.perf_counter()
        if self.last is not None:
            StepTimer.times.append(now - self.last)
        self.last = now


def model_kwargs() -> dict:
    return yaml.safe_load(CONFIG.read_text())["model"]["init_args"]


def bare_steps(data_dir: str, batch_size: int, image_size: int = 32) -> Iterator[None]:
    """What a user would write by hand: the same pieces, no framework. Yields after each step, forever."""
    from gen_lightning.data.datamodule import ShardDataModule
    from gen_lightning.diffusion import DiffusionLoss, NoiseSchedule
    from gen_lightning.nn.ema import EMA
    from gen_lightning.nn.unet import UNet, UNetConfig

    kw = model_kwargs()
    with torch.random.fork_rng():  # seeded weights without reseeding a `gen-lightning fit` run beside it (lockstep)
        torch.manual_seed(0)
        unet = UNet(UNetConfig.coerce(kw["unet"]))
    channels_last = kw.get("channels_last", False)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    ema = EMA(unet, max_decay=kw["ema_max_decay"])
    schedule = NoiseSchedule.from_name(kw["schedule"])
    loss_fn = DiffusionLoss(schedule, kw["prediction_type"], kw["loss_weighting"])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=kw["lr"], fused=True)
    warmup = kw["warmup_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    data = ShardDataModule(train=data_dir, image_size=image_size, batch_size=batch_size, num_workers=2)
    data.setup("fit")
    while True:
        for batch in data.train_dataloader():
            images = batch["image"]
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(unet, images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            ema.update(unet)
            loss.item()  # the framework logs the loss, which syncs; so does this
            yield


def bare_loop(data_dir: str, steps: int, batch_size: int, image_size: int = 32) -> list[float]:
    """Step times (between consecutive step ends, data waiting included) of `steps` bare steps."""
    times, last = [], None
    loop = bare_steps(data_dir, batch_size, image_size)
    for _ in range(steps):
        next(loop)
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    loop.close()  # stops the loader's workers
    return times


class LockstepBareLoop(L.Callback):
    """Runs one bare-loop step after each `gen-lightning fit` step, in the same process, and times both: the fit
    step is the time from the end of one bare step to the next training-step end (everything Lightning does between
    two steps, data waiting included), the bare step its own call. A slowdown of the shared machine that lasts more
    than a step then hits both sides of the ratio alike."""

    fit_times: ClassVar[list[float]] = []
    bare_times: ClassVar[list[float]] = []

    def __init__(self, data_dir: str, batch_size: int) -> None:
        self.bare = bare_steps(data_dir, batch_size)
        self.last: float | None = None

    def on_train_batch_end(self, *args) -> None:
        now = time.perf_counter()
        if self.last is not None:
            LockstepBareLoop.fit_times.append(now - self.last)
        next(self.bare)
        self.last = time.perf_counter()
        LockstepBareLoop.bare_times.append(self.last - now)

    def on_train_end(self, *args) -> None:
        self.bare.close()


def lightning_fit(data_dir: str, steps: int, batch_size: int, *extra: str, config: Path = CONFIG) -> list[float]:
    """Step times of `gen-lightning fit` on `config` (the demo's by default; + `extra` CLI arguments), in a fresh
    run folder."""
    # The CLI imports this file as `bench.overhead`, a different module object than `__main__`: use that one's class.
    timer = importlib.import_module("bench.overhead").StepTimer
    timer.times = []
    run_fit(data_dir, steps, batch_size, "{class_path: bench.overhead.StepTimer}", *extra, config=config)
    return list(timer.times)


def lockstep_fit(data_dir: str, steps: int, batch_size: int) -> tuple[list[float], list[float]]:
    """(fit step times, bare step times) of one `gen-lightning fit` run with a bare step after each of its steps."""
    lockstep = importlib.import_module("bench.overhead").LockstepBareLoop
    lockstep.fit_times, lockstep.bare_times = [], []
    init_args = {"data_dir": data_dir, "batch_size": batch_size}
    run_fit(
        data_dir,
        steps,
        batch_size,
        json.dumps({"class_path": "bench.overhead.LockstepBareLoop", "init_args": init_args}),
    )
    return list(lockstep.fit_times), list(lockstep.bare_times)


def run_fit(
    data_dir: str, steps: int, batch_size: int, timing_callback: str, *extra: str, config: Path = CONFIG
) -> None:
    from gen_lightning.cli import main

    main(
        [
            "fit",
            "--config",
            str(config),
            f"--trainer.default_root_dir={tempfile.mkdtemp(prefix='bench_fit_')}",  # fresh: nothing to resume
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            f"--data.train={data_dir}",
            "--data.val=null",
            f"--data.batch_size={batch_size}",
            # the grid callback is part of the demo, not of a training step
            f"--trainer.callbacks=[{{class_path: lightning.pytorch.callbacks.LearningRateMonitor}}, {timing_callback}]",
            *extra,
        ]
    )


def data_rate(data_dir: str, batch_size: int, image_size: int = 32, batches: int = 60) -> float:
    """Samples/s decoded by ONE worker process."""
    from gen_lightning.data.datamodule import ShardDataModule

    data = ShardDataModule(train=data_dir, image_size=image_size, batch_size=batch_size, num_workers=1)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    next(loader)  # worker start-up
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    bare, framework, lockstep = [], [], []
    for i in range(args.repeats):
        bare.append(statistics.median(bare_loop(args.data, args.steps, args.batch_size)[WARMUP:]))
        framework.append(statistics.median(lightning_fit(args.data, args.steps, args.batch_size)[WARMUP:]))
        fit_times, bare_times = (times[WARMUP:] for times in lockstep_fit(args.data, args.steps, args.batch_size))
        lockstep.append((statistics.median(fit_times), statistics.median(bare_times), sum(fit_times) / sum(bare_times)))
        print(
            f"repeat {i}: separate runs: bare {bare[-1]:.4f} s/step, gen-lightning fit {framework[-1]:.4f} s/step, "
            f"ratio {framework[-1] / bare[-1]:.3f}; lockstep: fit {lockstep[-1][0]:.4f}, bare {lockstep[-1][1]:.4f}, "
            f"ratio of medians {lockstep[-1][0] / lockstep[-1][1]:.3f}, of means {lockstep[-1][2]:.3f}"
        )
    step = statistics.median(bare)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    separate = statistics.median(f / b for f, b in zip(framework, bare, strict=True))
    print(f"step time ratio gen-lightning fit / bare loop, separate runs: {separate:.3f} (median over repeats)")
    medians = statistics.median(f / b for f, b, _ in lockstep)
    means = statistics.median(m for _, _, m in lockstep)
    print(f"  in lockstep: {medians:.3f} (ratio of median steps), {means:.3f} (ratio of mean steps)  (goal <= 1.03)")
    for size in (32, 64):
        # the same UNet's bare step at this size is what training consumes
        size_step = step if size == 32 else statistics.median(bare_loop(args.data, 30, args.batch_size, size)[WARMUP:])
        per_worker = data_rate(args.data, args.batch_size, size)
        consumption = args.batch_size / size_step
        print(
            f"data at {size}²: {per_worker:.0f} samples/s per worker vs {consumption:.0f} samples/s consumed by "
            f"training ({size_step:.3f} s/step): {per_worker / consumption:.1f}x  (goal >= 5x)"
        )


if __name__ == "__main__":
    main()
