"""A scripted session on the real app next to the world model's rollout of the same actions (the README's strip).

The script clicks the toggle, the checkbox, the entry (then types), opens the menu and picks a colour, and switches
things back. The real app (data.ui_source, on a private Xvfb) records the true frames; the model starts from the
same first context and is fed only the actions, each generated frame becoming part of its next context.

    python -m bench.world_rollout_demo --ckpt runs/world_model_ui/checkpoints/last.ckpt --out docs/world_rollout.png

Prints the per-step PSNR of the rollout and of the copy-the-first-frame baseline.
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from PIL import Image, ImageDraw

from gen_lightning.data.decode import ImageTransform, decode_sample
from gen_lightning.data.ui_policy import ReplayPolicy
from gen_lightning.data.ui_source import iter_ui_samples, virtual_display
from gen_lightning.images import make_grid
from gen_lightning.metrics.world import psnr
from gen_lightning.models.loading import load_model
from gen_lightning.models.world_model import WorldModel

SCRIPT = [
    ("move", "toggle", ""),
    ("click", "toggle", ""),
    ("move", "checkbox", ""),
    ("click", "checkbox", ""),
    ("click", "entry", ""),
    ("key", None, "h"),
    ("key", None, "i"),
    ("click", "menu", ""),
    ("click", "menu:blue", ""),
    ("click", "toggle", ""),
    ("click", "checkbox", ""),
    ("click", "menu", ""),
    ("click", "menu:red", ""),
]


def label(step: tuple[str, str | None, str]) -> str:
    kind, target, key = step
    return f"key {key}" if kind == "key" else f"{kind} {(target or '').removeprefix('menu:')}"


def record(size: int, context: int) -> list[dict]:
    """The script on the real app, decoded like training samples."""
    with virtual_display() as display:
        policy = ReplayPolicy(SCRIPT)
        raw = list(iter_ui_samples(display, [0], len(SCRIPT), context, size, policy_for=lambda _: policy))
    transform, rng = ImageTransform(size), random.Random(0)
    encoded = [{k: json.dumps(v).encode() if isinstance(v, dict) else v for k, v in s.items()} for s in raw]
    return [decode_sample(sample, transform, rng) for sample in encoded]


def strip(real: torch.Tensor, predicted: torch.Tensor, scale: int) -> Image.Image:
    """Two rows (real above, model below), upscaled, with each column's action written above it."""
    grid = make_grid(torch.cat([real, predicted]), nrow=len(real))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    header, margin = 14, 40
    out = Image.new("RGB", (grid.width + margin, grid.height + header), "white")
    out.paste(grid, (margin, header))
    draw = ImageDraw.Draw(out)
    cell = grid.width // len(real)
    for column, step in enumerate(SCRIPT):
        draw.text((margin + column * cell + 4, 1), label(step), fill="black")
    for row, name in enumerate(("app", "model")):
        draw.text((2, header + row * grid.height // 2 + grid.height // 4), name, fill="black")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sampler", default=None, help="sampler name (default: the model's), e.g. dpm++ or edm_euler")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps per frame (default: the model's)")
    parser.add_argument("--guide-ckpt", default=None, help="autoguidance: an earlier checkpoint of the same run")
    parser.add_argument("--guidance", type=float, default=None, help="the autoguidance weight (with --guide-ckpt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=2)
    ns = parser.parse_args()
    if (ns.guide_ckpt is None) != (ns.guidance is None):
        parser.error("--guide-ckpt and --guidance go together")
    model = load_model(ns.ckpt, expected=WorldModel)
    if ns.guide_ckpt is not None:
        model.set_autoguidance(load_model(ns.guide_ckpt, expected=WorldModel))
    model.make_sampler(ns.sampler)  # a sampler that does not fit the model's objective fails before the recording
    size, context = int(model.hparams.image_size), int(model.hparams.context_frames)
    samples = record(size, context)
    real = torch.stack([s["image"] for s in samples])
    actions = torch.stack([s["action"] for s in samples])[None]
    generator = torch.Generator().manual_seed(ns.seed)
    predicted = model.rollout(
        samples[0]["frames"][None], actions, steps=ns.steps, guidance=ns.guidance, sampler=ns.sampler,
        generator=generator,
    )[0]  # fmt: skip
    strip(real, predicted, ns.scale).save(ns.out)
    model_psnr, copy_psnr = psnr(predicted, real), psnr(samples[0]["frames"][-1:].expand_as(real), real)
    print(f"wrote {ns.out}")
    print("step  action            PSNR model  PSNR copy-first-frame")
    for t, step in enumerate(SCRIPT):
        print(f"{t + 1:>4}  {label(step):<16}  {model_psnr[t]:>10.2f}  {copy_psnr[t]:>10.2f}")
    print(f"mean  {'':<16}  {model_psnr.mean():>10.2f}  {copy_psnr.clamp(max=100).mean():>10.2f}")


if __name__ == "__main__":
    main()
