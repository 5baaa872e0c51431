"""Prompt adherence of a text-to-image checkpoint, measured with a CLIP: for held-out prompts (the val split's
captions, never seen in training), generate one image per prompt at each guidance weight and report

    CLIP score(image, its own prompt) − CLIP score(image, another prompt)   (mean over prompts)

The second term is a baseline from the same images scored against a derangement of the prompts (every image paired
with a prompt not its own), so a positive gap means the images follow their prompts, and the gap should grow with
the guidance weight. With `--grid PATH`, also writes a grid (one row per prompt, one column per guidance weight) for
the README.

Before sampling it reports how much the model uses the text at all: the denoising loss on held-out latents (fixed
noise, a few fixed t) with each sample's own caption, with a shuffled caption and with the empty caption. A model
that ignores its text has the same loss for all three; "caption use" is 1 − own / empty.

    .venv/bin/python -m bench.prompt_adherence --ldm runs/ldm_emoji/checkpoints/last.ckpt \\
        --clip runs/clip_emoji/checkpoints/last.ckpt --data data/emoji --num-prompts 128 --guidance 1 3
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from gen_lightning.data.datamodule import ShardDataModule
from gen_lightning.evaluation.encoders import load_text_image_encoder
from gen_lightning.evaluation.options import add_clip_sample_option, apply_clip_sample
from gen_lightning.evaluation.reference import val_captions
from gen_lightning.images import make_grid, save_image_atomic
from gen_lightning.metrics.clip_score import CLIPScore
from gen_lightning.models.loading import load_model


def derangement(n: int, seed: int) -> list[int]:
    """A random permutation with no fixed point: a shuffled cycle (i -> next in the shuffled order)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    target = [0] * n
    for a, b in zip(order, order[1:] + order[:1], strict=True):
        target[a] = b
    return target


def clip_score(encoder, images: torch.Tensor, prompts: list[str]) -> float:
    metric = CLIPScore(encoder)
    metric.update(images, prompts)
    return float(metric.compute())


def generate(model, prompts: list[str], weight: float, steps: int, seed: int) -> torch.Tensor:
    """One image per prompt, in chunks of 32, from the same seed for every guidance weight."""
    generator = torch.Generator().manual_seed(seed)
    chunks = (prompts[i : i + 32] for i in range(0, len(prompts), 32))
    return torch.cat([model.sample(len(c), cond=c, guidance=weight, steps=steps, generator=generator) for c in chunks])


@torch.no_grad()
def caption_losses(model, batch: dict, timesteps: list[int], seed: int) -> dict[str, float]:
    """Mean denoising loss over `timesteps` with own / shuffled / empty captions (same latents, t and noise)."""
    x0 = model.diffusion_input(batch)
    captions = list(batch["caption"])
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    variants = {
        "own": captions,
        "shuffled": [captions[j] for j in derangement(len(captions), seed)],
        "empty": [""] * len(captions),
    }
    losses = {}
    for name, variant in variants.items():
        cond = model.condition(dict(batch, caption=variant), training=False)
        per_t = [
            model.loss_fn.per_sample(
                model.ema.shadow, x0, torch.full((len(captions),), t), noise, extra_args=cond
            ).mean()
            for t in timesteps
        ]
        losses[name] = float(torch.stack(per_t).mean())
    losses["caption use"] = 1.0 - losses["own"] / losses["empty"]
    losses["samples"] = float(len(captions))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ldm", required=True, help="LatentDiffusionModel checkpoint")
    parser.add_argument("--clip", required=True, help="CLIP checkpoint or local HF CLIP directory")
    parser.add_argument("--data", required=True, help="shard folder whose val split gives the held-out prompts")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-prompts", nargs="*", default=[], help="prompts for the grid (default: the first 8)")
    parser.add_argument("--grid", default=None, help="PNG path of the prompt × guidance grid")
    parser.add_argument("--out", default=None, help="JSON report path")
    add_clip_sample_option(parser)
    args = parser.parse_args()

    model = load_model(args.ldm)
    apply_clip_sample(model, args)
    encoder = load_text_image_encoder(args.clip)
    data = ShardDataModule(val=args.data, image_size=int(model.hparams.image_size), batch_size=128, num_workers=0)
    data.setup("validate")
    losses = caption_losses(model.eval(), next(iter(data.val_dataloader())), [300, 500, 700, 850], args.seed)
    held_out = ", ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "samples")
    print(f"denoising loss on {losses['samples']:.0f} held-out samples: {held_out}")
    prompts = val_captions(data.val_dataloader())
    prompts = random.Random(args.seed).sample(prompts, min(args.num_prompts, len(prompts)))
    other = [prompts[j] for j in derangement(len(prompts), args.seed)]
    report: dict = {"ldm": args.ldm, "clip": args.clip, "num_prompts": len(prompts), "steps": args.steps}
    report["clip_sample"] = model.hparams.clip_sample
    report["caption_losses"] = losses
    for weight in args.guidance:
        images = generate(model, prompts, weight, args.steps, args.seed)
        own, shuffled = clip_score(encoder, images, prompts), clip_score(encoder, images, other)
        report[f"w={weight:g}"] = {"own": own, "shuffled": shuffled, "gap": own - shuffled}
        print(f"guidance {weight:g}: CLIP score own {own:.2f}, shuffled {shuffled:.2f}, gap {own - shuffled:+.2f}")
    if args.grid:
        grid_prompts = args.grid_prompts or prompts[:8]
        columns = [generate(model, grid_prompts, weight, args.steps, args.seed) for weight in args.guidance]
        images = torch.stack(columns, dim=1).flatten(0, 1)  # row = prompt, column = guidance weight
        save_image_atomic(make_grid(images, nrow=len(args.guidance)), args.grid)
        report["grid"] = {"path": args.grid, "rows": grid_prompts, "columns": [f"w={w:g}" for w in args.guidance]}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
