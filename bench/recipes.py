"""The demo's recipes at equal CPU time (#22): each recipe's parameter count and `gen-lightning fit` step time, and
the number of steps that costs what the demo's 1,400 steps of `configs/ddpm_emoji.yaml` cost.

    .venv/bin/python -m bench.recipes [--steps 40] [--repeats 2] [--data data/emoji]
        [--vae runs/vae_emoji/checkpoints/last.ckpt --latent-data data/emoji_latents]

Each recipe is a config (+ CLI flags) trained on the same data at batch 32, 32². Recipes alternate within a repeat, so
drift of a shared machine hits all of them; the ratio is taken against the demo recipe of the same repeat. The
printed budget is what the comparison trains each recipe for (`--trainer.max_steps`); FIDs then come from
`bench/fid_vs_nfe.py` (bench/RESULTS.md, "Recipes at equal CPU time"). With --vae and --latent-data, also the
latent DiT of configs/ldm_dit_emoji.yaml on those pre-encoded latents at its own batch of 64 (the VAE's training is
not counted: it is a pretrained part, as Stable Diffusion's VAE would be). Not a test.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
from pathlib import Path

import torch

from bench.overhead import lightning_fit

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WARMUP = 10
DEMO = "UNet + v/min-SNR (demo)"
DEMO_STEPS = 1400  # configs/ddpm_emoji.yaml's max_steps: ~10 minutes on 2 cores
RECIPES: dict[str, tuple[str, list[str]]] = {
    DEMO: ("ddpm_emoji.yaml", []),
    "UNet + flow": ("flow_unet_emoji.yaml", []),
    "UNet + edm": ("edm_unet_emoji.yaml", []),
    "DiT + flow (96×7, patch 4)": ("flow_dit_emoji.yaml", []),
    "DiT + flow (256×8, patch 4)": (
        "flow_dit_emoji.yaml",
        ["--model.init_args.dit.width=256", "--model.init_args.dit.depth=8"],
    ),
}
LATENT = "latent DiT + flow, text (192×6, patch 1, batch 64)"
LATENT_BATCH = 64  # configs/ldm_dit_emoji.yaml's: its steps are counted at that batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vae", help="VAE checkpoint the latents were encoded with (adds the latent DiT)")
    parser.add_argument("--latent-data", help="pre-encoded latent shards (`gen-lightning shards encode`)")
    ns = parser.parse_args()
    recipes = dict(RECIPES)
    if bool(ns.vae) != bool(ns.latent_data):
        parser.error("--vae and --latent-data go together")
    if ns.vae:
        latent_flags = [f"--model.init_args.vae_checkpoint={ns.vae}", f"--data.train={ns.latent_data}"]
        recipes[LATENT] = ("ldm_dit_emoji.yaml", [*latent_flags, f"--data.batch_size={LATENT_BATCH}"])
    os.environ.setdefault("WANDB_MODE", "disabled")  # the logger stays (the LR monitor needs one), writing nothing
    timer = importlib.import_module("bench.overhead").StepTimer  # the class the CLI's callback writes to
    times: dict[str, list[float]] = {name: [] for name in recipes}
    parameters: dict[str, int] = {}
    for repeat in range(ns.repeats):
        for name, (config, flags) in recipes.items():
            steps = lightning_fit(ns.data, ns.steps, 32, *flags, config=CONFIGS / config)
            times[name].append(statistics.median(steps[WARMUP:]))
            parameters[name] = timer.parameters
            print(f"repeat {repeat} {name}: {times[name][-1]:.4f} s/step", flush=True)
    demo = times[DEMO]
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, batch 32 at 32², {ns.steps} steps")
    print("| recipe | parameters (M) | s/step (median) | ratio to the demo (per repeat) | steps at the demo's budget |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        ratios = [v / d for v, d in zip(values, demo, strict=True)]
        budget = round(DEMO_STEPS / statistics.median(ratios))
        ratio_text = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"| {name} | {parameters[name] / 1e6:.2f} | {statistics.median(values):.4f} | {ratio_text} | {budget} |")


if __name__ == "__main__":
    main()
