"""Each speed feature switched on/off from config, measured as `gen-lightning fit` step time in one run.

    .venv/bin/python -m bench.speed_features [--steps 40] [--repeats 2] [--data data/emoji]
    .venv/bin/python -m bench.speed_features --model world [--steps 40] [--repeats 2]   # data/ui, batch 16, 64²

Baseline: `configs/ddpm_emoji.yaml` as shipped (channels_last, fused AdamW, SDPA attention, no compile, no
activation checkpointing, fp32) at batch 32, 32²; with `--model world`, `configs/world_model_ui.yaml` as shipped at
its batch 16, 64². Each row flips one switch with a CLI flag and reports the median step time after a warm-up
(compilation and the first steps excluded) and the ratio to the baseline of the same repeat. Runs alternate so
drift of a shared machine hits all rows. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from bench.overhead import CONFIG, lightning_fit

WARMUP = 10
BASELINE = "baseline (config as shipped)"
FEATURES: dict[str, list[str]] = {
    BASELINE: [],
    "channels_last off": ["--model.init_args.channels_last=false"],
    "fused AdamW off": ["--model.init_args.fused_adamw=false"],
    "attention: math instead of SDPA": ["--model.init_args.unet.attention=math"],
    "torch.compile on": ["--model.init_args.compile=true"],
    "activation checkpointing on": ["--model.init_args.unet.gradient_checkpointing=true"],
    "bf16-mixed": ["--trainer.precision=bf16-mixed"],
}
# The world model at 64²: the UNet's patch size (its first level's resolution) and the key kernels.
WORLD_CONFIG = CONFIG.parent / "world_model_ui.yaml"
WORLD_FEATURES: dict[str, list[str]] = {
    BASELINE: [],
    "full-resolution first level, widths 32/64/96, no key kernels (make world until session 19)": [
        "--model.init_args.unet.patch_size=1",
        "--model.init_args.unet.channels=[32, 64, 96]",
        "--model.init_args.key_kernels=0",
    ],
    "key_kernels 0": ["--model.init_args.key_kernels=0"],
    "bf16-mixed": ["--trainer.precision=bf16-mixed"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "world"), default="demo")
    parser.add_argument("--data", help="default: data/emoji (demo), data/ui (world)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help="default: 32 (demo), 16 (world: its config's)")
    ns = parser.parse_args()
    world = ns.model == "world"
    config, features = (WORLD_CONFIG, WORLD_FEATURES) if world else (CONFIG, FEATURES)
    data = ns.data or ("data/ui" if world else "data/emoji")
    batch_size, size = ns.batch_size or (16 if world else 32), 64 if world else 32
    os.environ.setdefault("WANDB_MODE", "disabled")  # the logger stays (the LR monitor needs one), writing nothing
    times: dict[str, list[float]] = {name: [] for name in features}
    for repeat in range(ns.repeats):
        for name, flags in features.items():
            steps = lightning_fit(data, ns.steps, batch_size, *flags, config=config)
            times[name].append(statistics.median(steps[WARMUP:]))
            print(f"repeat {repeat} {name}: {times[name][-1]:.4f} s/step", flush=True)
    base = times[BASELINE]
    setting = f"{config.name}, batch {batch_size} at {size}², {ns.steps} steps"
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, {setting}")
    print("| feature | s/step (median) | ratio to baseline (per repeat) |\n|---|---|---|")
    for name, values in times.items():
        ratios = ", ".join(f"{v / b:.2f}" for v, b in zip(values, base, strict=True))
        print(f"| {name} | {statistics.median(values):.4f} | {ratios} |")


if __name__ == "__main__":
    main()
