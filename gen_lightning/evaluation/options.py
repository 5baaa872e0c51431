"""Command-line options for sampling from a checkpoint, shared by `gen-lightning sample`, `gen-lightning evaluate`
and the benchmarks. Light to import (argparse only until a model is loaded), so `--help` stays fast."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from gen_lightning.sampler_names import ALL_SAMPLER_NAMES

if TYPE_CHECKING:
    from gen_lightning.models.base import GenerativeModule


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and how to sample from it; settings left out are the model's (its sampling_defaults)."""
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `gen-lightning fit`, or a folder "
                        "written by `gen-lightning export`")  # fmt: skip
    help_text = "default: the model's; flow_* for models trained with objective=flow, edm_* for edm, the others for vp"
    parser.add_argument("--sampler", choices=ALL_SAMPLER_NAMES, default=None, help=help_text)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight (model "
                        "default); with --guide-ckpt, the autoguidance weight")  # fmt: skip
    parser.add_argument("--guide-ckpt", default=None, help="autoguidance (Karras et al. 2024): a weaker checkpoint of "
                        "the same model, e.g. an earlier one of the same run, that --guidance W extrapolates away "
                        "from (unconditional image models and world models)")  # fmt: skip
    parser.add_argument("--guidance-interval", nargs=2, type=float, metavar=("LOW", "HIGH"), default=None,
                        help="guide only at noise levels LOW < sigma <= HIGH (EDM's sigma for every "
                        "objective; Kynkäänniemi et al. 2024: 0.28 5.42); default: the model's, else at every "
                        "level")  # fmt: skip
    add_clip_sample_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="images generated at once")
    parser.add_argument("--device", default=default_device(), help="default: cuda if available")


def add_clip_sample_option(parser: argparse.ArgumentParser) -> None:
    """--clip-sample: override the checkpoint's bound on the sampler's predicted x0 (a number, or `none`). Latent
    diffusion checkpoints written before it defaulted to none carry 1.0, which clips latents like pixels."""
    help_text = "clip the predicted x0 to ±this, or 'none' (default: the checkpoint's clip_sample)"
    parser.add_argument("--clip-sample", type=clip_bound, default=argparse.SUPPRESS, help=help_text)


def clip_bound(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        if (value := float(text)) > 0:  # NaN is not
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number or 'none'")


def apply_clip_sample(model: GenerativeModule, ns: argparse.Namespace) -> None:
    if "clip_sample" in ns:
        model.hparams.clip_sample = ns.clip_sample


def load_for_sampling(ns: argparse.Namespace) -> GenerativeModule:
    """The checkpoint's model on --device, with --clip-sample and --guidance-interval applied and the --guide-ckpt
    model set as its guide."""
    from gen_lightning.errors import UserInputError
    from gen_lightning.models.loading import load_model

    model = load_model(ns.ckpt).to(ns.device)
    apply_clip_sample(model, ns)
    apply_guidance_interval(model, ns)
    if getattr(ns, "guide_ckpt", None) is not None:
        if ns.guidance is None:
            raise UserInputError("--guide-ckpt needs --guidance W, the autoguidance weight (1: no guidance; 1.5-3)")
        if not hasattr(model, "set_autoguidance"):
            raise UserInputError(f"--guide-ckpt: {ns.ckpt} holds a {type(model).__name__}, not a diffusion model")
        guide = load_model(ns.guide_ckpt).to(ns.device)
        apply_clip_sample(guide, ns)
        model.set_autoguidance(guide)
    elif getattr(ns, "guidance", None) is not None and hasattr(model, "set_autoguidance") and model.kind == "image":
        # An unconditional diffusion model has no classifier-free branch: its only guidance is autoguidance.
        raise UserInputError(
            f"--guidance: {ns.ckpt} is an unconditional {type(model).__name__}; its guidance is autoguidance, which "
            "needs --guide-ckpt (a weaker checkpoint of the same run, e.g. an earlier one)"
        )
    return model


def apply_guidance_interval(model: GenerativeModule, ns: argparse.Namespace) -> None:
    """--guidance-interval LOW HIGH over the checkpoint's guidance_interval; refused by name where nothing is guided:
    a model that is not a diffusion model, or an unconditional one without --guide-ckpt."""
    from gen_lightning.errors import UserInputError

    interval = getattr(ns, "guidance_interval", None)
    if interval is None:
        return
    flag = f"--guidance-interval {interval[0]:g} {interval[1]:g}"
    if not hasattr(model, "guidance_interval"):
        raise UserInputError(f"{flag}: {ns.ckpt} holds a {type(model).__name__}, not a diffusion model")
    if model.kind in ("image", "next-frame") and getattr(ns, "guide_ckpt", None) is None:
        raise UserInputError(f"{flag}: {ns.ckpt} is guided only by autoguidance, which needs --guide-ckpt")
    model.hparams.guidance_interval = list(interval)
    try:
        model.guidance_interval()
    except UserInputError as err:
        raise UserInputError(f"{flag}: {err.__cause__}") from err


def default_device() -> str:
    # Only asked when --device is left to default, and not for --help: avoids importing torch there.
    if "--device" in sys.argv or "-h" in sys.argv or "--help" in sys.argv:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
