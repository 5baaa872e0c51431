"""`gen-lightning export`: a trained model as safetensors + a JSON config, and, where diffusers has the same network,
as a folder diffusers loads.

Every export writes `model.safetensors` (one set of weights: the EMA's or the trained ones, under `net.`, plus the
model's other state) and `gen_lightning.json` (class, hyper-parameters, what was exported), which `sample`, `evaluate`
and `play --ckpt DIR` read through models.loading (no pickle). `--format diffusers` adds, beside them:
  DiffusionModel (UNet backbone): model_index.json + unet/ + scheduler/, a DDIMPipeline (interop.diffusers_unet);
  VAEModel (downsample "ldm"):    config.json + diffusion_pytorch_model.safetensors, an AutoencoderKL.
Latent diffusion, the world model and CLIP have no diffusers counterpart and are refused for that format, saying why.
A latent-diffusion model whose VAE or text tower came from a Hugging Face folder gets those files copied into vae/,
text_encoder/ and tokenizer/, so the export is self-contained and can be moved.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gen_lightning.errors import UserInputError
from gen_lightning.interop.folders import EXPORT_MARKER
from gen_lightning.models.base import GenerativeModule
from gen_lightning.models.loading import load_model
from gen_lightning.models.objectives import inner_network

FORMATS = ("safetensors", "diffusers")
WEIGHTS = ("ema", "trained")
NO_DIFFUSERS_EQUIVALENT = {
    "LatentDiffusionModel": "its UNet's cross-attention (a masked attention layer per block) and pooled-text "
    "embedding differ from UNet2DConditionModel's transformer blocks",
    "WorldModel": "its UNet takes the previous frames and an action embedding, which UNet2DModel has no input for",
    "CLIPModel": "diffusers has no CLIP, and its towers are gen_lightning's own, not transformers' CLIPModel",
}


class ExportError(UserInputError):
    """An export that cannot be written as asked; the message says why and what to use instead."""


@dataclass
class ExportSummary:
    out: Path
    files: list[str]
    notes: list[str] = field(default_factory=list)


def export(
    ckpt: str | Path,
    out: str | Path,
    *,
    weights: str | None = None,
    fmt: str = "safetensors",
    scaling_factor: float | None = None,
) -> ExportSummary:
    """Export the model of `ckpt` (a .ckpt or an export folder) into the new folder `out` (written whole, then
    renamed into place, so a failed export leaves nothing)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {FORMATS}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{str(out)!r} exists and is not empty; export writes a new folder")
    model = load_model(ckpt)
    cls = type(model)
    weights = weights or ("ema" if cls.keeps_ema else "trained")
    if weights not in WEIGHTS:
        raise ExportError(f"--weights {weights!r}: expected one of {WEIGHTS}")
    if weights == "ema" and not cls.keeps_ema:
        raise ExportError(f"{cls.__name__} keeps no EMA copy; export its trained weights (--weights trained)")
    if fmt == "diffusers" and (problem := diffusers_problem(model)):
        raise ExportError(
            f"{problem}. Export it with --format safetensors, which gen-lightning sample and evaluate read"
        )

    notes: list[str] = []
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        hparams, relative = carry_parts(model, staging)
        if fmt == "diffusers":
            notes += write_diffusers(model, weights, staging, scaling_factor)
        write_safetensors(model, network_state(model, weights), staging)
        meta = {
            "gen_lightning_export": 1, "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "checkpoint_format": cls.checkpoint_format, "hyper_parameters": hparams, "weights": weights,
            "ema_from_net": cls.keeps_ema, "layouts": ["safetensors", *(["diffusers"] if fmt == "diffusers" else [])],
            "relative_paths": relative, "source": {"checkpoint": str(Path(ckpt).resolve())},
        }  # fmt: skip
        (staging / EXPORT_MARKER).write_text(json.dumps(meta, indent=2, default=_plain) + "\n")
        for path in staging.rglob("*"):  # diffusers writes its files readable by the owner only
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return ExportSummary(out, files, notes)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"hyper-parameter value {value!r} ({type(value).__name__}) cannot be written as JSON")


def network_state(model: GenerativeModule, weights: str) -> dict[str, torch.Tensor]:
    """One set of weights under `net.` (the EMA's or the trained ones) plus the model's other state (latent_scale,
    logvar, a gen_lightning VAE's `vae.`), without the EMA and without weights that live in referenced folders."""
    state = model.state_dict()
    external = model.external_state_prefixes()
    exported: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("ema.") or (external and key.startswith(external)):
            continue
        if weights == "ema" and key.startswith("net."):
            value = state[f"ema.shadow.{key[4:]}"]
        exported[key] = value.detach().clone().contiguous()  # own storage, NCHW (channels_last off)
    return exported


def write_safetensors(model: GenerativeModule, state: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "class": type(model).__name__})


def carry_parts(model: GenerativeModule, out: Path) -> tuple[dict[str, Any], list[str]]:
    """The hyper-parameters to write; Hugging Face parts a latent-diffusion model refers to are copied into `out`
    (only the files that were read) and referred to relative to it."""
    hparams = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_")}
    relative: list[str] = []
    from gen_lightning.interop.clip_text import CLIPTextTower
    from gen_lightning.interop.diffusers_vae import DiffusersAutoencoder

    vae = getattr(model, "vae", None)
    if isinstance(vae, DiffusersAutoencoder):
        _copy(vae.files, out / "vae")
        hparams["vae_checkpoint"] = "vae"
        hparams["vae_config"] = {**hparams["vae_config"], "diffusers_folder": "vae"}
        relative.append("vae_checkpoint")
    text = getattr(inner_network(model.net), "text", None)  # edm: the text network is inside EDMPrecond
    if isinstance(text, CLIPTextTower):
        _copy(text.files, out / "text_encoder")
        _copy(text.tokenizer_files, out / "tokenizer")
        hparams["clip_checkpoint"] = "text_encoder"
        relative.append("clip_checkpoint")
    return hparams, relative


def _copy(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copyfile(path, folder / path.name)


def diffusers_problem(model: GenerativeModule) -> str | None:
    """Why `model` cannot be written as a diffusers folder, or None."""
    from gen_lightning.interop.diffusers_maps import autoencoder_export_problem, unet_export_problem
    from gen_lightning.models.diffusion import DiffusionModel
    from gen_lightning.models.vae import VAEModel
    from gen_lightning.nn.unet import UNet

    name = type(model).__name__
    if name in NO_DIFFUSERS_EQUIVALENT:
        return f"{name} has no diffusers equivalent: {NO_DIFFUSERS_EQUIVALENT[name]}"
    if is_progressive_student(model):  # a DDIM student: the same UNet, sampled by DDIM with its own number of steps
        return unet_export_problem(model.net)
    if type(model) is DiffusionModel:
        if model.objective != "vp":  # DDIMPipeline reads an eps / v / x0 prediction on a VP schedule
            return (
                f"this model was trained with model.objective={model.objective!r}; a diffusers DDIMPipeline samples "
                "the vp objective only"
            )
        if not isinstance(model.net, UNet):
            return (
                f"only the UNet backbone maps onto diffusers' UNet2DModel; this model's is a {type(model.net).__name__}"
            )
        return unet_export_problem(model.net)
    if type(model) is VAEModel:
        return autoencoder_export_problem(model.net)
    return f"{name} has no diffusers equivalent in gen_lightning's export"


def is_progressive_student(model: GenerativeModule) -> bool:
    from gen_lightning.models.distillation import DistilledDiffusionModel
    from gen_lightning.nn.unet import UNet

    progressive = isinstance(model, DistilledDiffusionModel) and model.hparams.method == "progressive"
    return progressive and isinstance(model.net, UNet)


def write_diffusers(model: GenerativeModule, weights: str, out: Path, scaling_factor: float | None) -> list[str]:
    """The diffusers files for `model` in `out` (diffusers_problem(model) is None); notes for the user."""
    from gen_lightning.models.vae import VAEModel

    network = model.ema.shadow if weights == "ema" else model.net
    if isinstance(model, VAEModel):
        from gen_lightning.interop.diffusers_vae import export_autoencoder_kl

        notes = []
        if scaling_factor is None:
            scaling_factor = 1.0
            notes.append("scaling_factor=1.0 written: a gen_lightning VAE does not know its latents' scale; pass "
                         "--scaling-factor (latent diffusion's latent_scale) for diffusers pipelines")  # fmt: skip
        image_size = int(model.hparams.image_size)
        export_autoencoder_kl(network, out, image_size=image_size, scaling_factor=scaling_factor)
        return notes
    from gen_lightning.interop.diffusers_unet import ddim_scheduler_config, export_ddim_pipeline

    hp = model.hparams
    sampler = model.make_sampler("ddim")
    config = ddim_scheduler_config(
        model.schedule, schedule_name=hp.schedule, prediction_type=hp.prediction_type, clip_sample=hp.clip_sample,
        timestep_spacing=sampler.timestep_spacing,
    )  # fmt: skip
    export_ddim_pipeline(network, config, int(hp.image_size), out)
    notes = [
        "DDIMPipeline.from_pretrained(DIR)(..., use_clipped_model_output=True) reproduces gen-lightning sample "
        "--sampler ddim (without it diffusers clips x0 but does not recompute the noise from it: differences ~5e-3)"
    ]
    if is_progressive_student(model):
        notes.append(f"a distilled student: sample with num_inference_steps={hp.sample_steps}, the steps it learned")
    if hp.num_timesteps % hp.sample_steps:
        notes.append(
            f"sample_steps={hp.sample_steps} does not divide num_timesteps={hp.num_timesteps}: diffusers' "
            f"DDIMScheduler steps to t - {hp.num_timesteps}//n, this sampler to its next timestep, so images differ "
            "slightly (~1e-3); step counts that divide it match exactly"
        )
    return notes
