"""`gen-lightning play` (a world model behind a page on localhost) and `gen-lightning export` (safetensors and
diffusers folders)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def play_main(args: Sequence[str]) -> None:
    from gen_lightning.evaluation.options import default_device
    from gen_lightning.sampler_names import ALL_SAMPLER_NAMES

    parser = argparse.ArgumentParser(
        prog="gen-lightning play",
        description="Drive a world model from a web page: each mouse/keyboard event is one generated frame.",
    )
    parser.add_argument("--ckpt", required=True, help="WorldModel checkpoint written by `gen-lightning fit`, or a "
                        "folder written by `gen-lightning export`")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps per frame (default: the model's)")
    help_text = "sampler per frame (default: the model's; e.g. dpm++ with --steps 4 for speed)"
    parser.add_argument("--sampler", choices=ALL_SAMPLER_NAMES, default=None, help=help_text)
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

    session = load_session(
        ns.ckpt, ns.device, steps=ns.steps, seed=ns.seed, use_ema=not ns.no_ema, scale=ns.scale, sampler=ns.sampler
    )
    serve(make_server(session, ns.host, ns.port))


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
