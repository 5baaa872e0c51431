"""`gen-lightning shards`: webdataset shards from a source, and VAE latents added to a shard folder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from gen_lightning.interrupts import sigterm_as_interrupt


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
