"""Each speed feature switched on/off from config, measured as `gen-lightning fit` step time in one run.

    .venv/bin/python -m bench.speed_features [--steps 40] [--repeats 2] [--data data/emoji]

Baseline: `configs/ddpm_emoji.yaml` as shipped (channels_last, fused AdamW, SDPA attention, no compile, no
activation checkpointing, fp32) at batch 32, 32². Each row flips one switch with a CLI flag and reports the median
step time after a warm-up (compilation and the first steps excluded) and the ratio to the baseline of the same
repeat. Runs alternate so drift of a shared machine hits all rows. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from bench.overhead import lightning_fit

WARMUP = 10
FEATURES: dict[str, list[str]] = {
    "baseline (config as shipped)": [],
    "channels_last off": ["--model.init_args.channels_last=false"],
    "fused AdamW off": ["--model.init_args.fused_adamw=false"],
    "attention: math instead of SDPA": ["--model.init_args.unet.attention=math"],
    "torch.compile on": ["--model.init_args.compile=true"],
    "activation checkpointing on": ["--model.init_args.unet.gradient_checkpointing=true"],
    "bf16-mixed": ["--trainer.precision=bf16-mixed"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    ns = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")  # the logger stays (the LR monitor needs one), writing nothing
    times: dict[str, list[float]] = {name: [] for name in FEATURES}
    for repeat in range(ns.repeats):
        for name, flags in FEATURES.items():
            steps = lightning_fit(ns.data, ns.steps, ns.batch_size, *flags)
            times[name].append(statistics.median(steps[WARMUP:]))
            print(f"repeat {repeat} {name}: {times[name][-1]:.4f} s/step", flush=True)
    base = times["baseline (config as shipped)"]
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, batch {ns.batch_size} at 32², {ns.steps} steps")
    print("| feature | s/step (median) | ratio to baseline (per repeat) |\n|---|---|---|")
    for name, values in times.items():
        ratios = ", ".join(f"{v / b:.2f}" for v, b in zip(values, base, strict=True))
        print(f"| {name} | {statistics.median(values):.4f} | {ratios} |")


if __name__ == "__main__":
    main()
