"""diffusers' AutoencoderKL in and out.

In: a Stable Diffusion VAE folder becomes latent diffusion's frozen first stage by wrapping diffusers' own module
behind our first-stage interface (`encode` -> DiagonalGaussian, `decode`), not by loading its weights into our
Autoencoder: SD 1/2/XL's VAEs have quant convs and q/k/v biases ours lacks, SD3/FLUX's a shift, and the wrapper takes
every variant with no code per variant. The first stage is frozen, so training speed does not argue for our layers.
Out: a gen_lightning VAE with `downsample="ldm"` is AutoencoderKL weight for weight (interop.diffusers_maps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gen_lightning.interop.diffusers_maps import autoencoder_key_map, autoencoder_kl_config
from gen_lightning.interop.folders import (
    PretrainedFolderError,
    check_loading_info,
    component_folder,
    quiet_hf_logs,
    read_config,
    require_hf,
    safetensors_weights,
)
from gen_lightning.nn.autoencoder import Autoencoder, DiagonalGaussian


class DiffusersAutoencoder(nn.Module):
    """A diffusers AutoencoderKL, frozen, in fp32, with the interface latent diffusion's first stage has (the one
    nn.autoencoder's encode_fp32/decode_fp32 call)."""

    def __init__(self, model: nn.Module, folder: Path, files: list[Path]) -> None:
        super().__init__()
        self.model = model.float().eval().requires_grad_(False)
        config = model.config
        self.folder, self.files = folder, files  # what an export copies
        self.latent_channels = int(config.latent_channels)
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.shift_factor or 0.0)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (self.latent_channels, image_size // self.downsample_factor, image_size // self.downsample_factor)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        # diffusers' posterior holds the same [mean, logvar] moments ours reads (and clamps logvar alike)
        return DiagonalGaussian(self.model.encode(x).latent_dist.parameters)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z).sample

    def train(self, mode: bool = True) -> DiffusersAutoencoder:
        return super().train(False)  # frozen: inference behaviour always


def load_autoencoder_kl(path: str | Path) -> DiffusersAutoencoder:
    """An AutoencoderKL folder (save_pretrained layout, safetensors) or a pipeline root (its vae/), checked: the
    config names AutoencoderKL, the weights are safetensors, and they fit the config exactly."""
    folder = component_folder(path, "vae")
    config = read_config(folder, "vae")
    if config.get("_class_name") != "AutoencoderKL":
        raise PretrainedFolderError(
            f"{str(folder / 'config.json')!r} describes a {config.get('_class_name') or 'model of no named class'}, "
            "not an AutoencoderKL: pass the VAE's folder (a Stable Diffusion pipeline's vae/ folder, or the pipeline "
            "folder itself)"
        )
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        raise PretrainedFolderError(
            f"{str(folder / 'config.json')!r} sets latents_mean/latents_std (per-channel latent normalisation), which "
            "gen_lightning does not apply; use a VAE without them"
        )
    files = safetensors_weights(folder, "vae")
    diffusers = require_hf(folder, "diffusers")
    with quiet_hf_logs():
        try:
            model, info = diffusers.AutoencoderKL.from_pretrained(
                str(folder), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False,
                torch_dtype=torch.float32, output_loading_info=True,
            )  # fmt: skip
        except (OSError, ValueError, RuntimeError) as err:
            raise PretrainedFolderError(f"{str(folder)!r}: diffusers cannot load this AutoencoderKL: {err}") from err
    check_loading_info(files[0], info)
    return DiffusersAutoencoder(model, folder, [folder / "config.json", *files])


def export_autoencoder_kl(autoencoder: Autoencoder, out: Path, *, image_size: int, scaling_factor: float) -> None:
    """`autoencoder` as an AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) in `out`, after a
    self-check that diffusers' module computes what ours does (autoencoder_export_problem(autoencoder) is None)."""
    diffusers = require_hf(out, "diffusers")
    with quiet_hf_logs():
        theirs = diffusers.AutoencoderKL(**autoencoder_kl_config(autoencoder, image_size, scaling_factor))
    state = autoencoder_key_map(autoencoder).to_diffusers(autoencoder.state_dict())
    theirs.load_state_dict({k: v.detach().contiguous() for k, v in state.items()}, strict=True)
    theirs.eval()
    probe = torch.rand(
        2, autoencoder.config.in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ours_posterior = autoencoder.encode(probe * 2 - 1)
        gap = max(
            (ours_posterior.mean - theirs.encode(probe * 2 - 1).latent_dist.mean).abs().max().item(),
            (autoencoder.decode(ours_posterior.mean) - theirs.decode(ours_posterior.mean).sample).abs().max().item(),
        )
    self_check(gap, "AutoencoderKL", "VAE")
    theirs.save_pretrained(str(out), safe_serialization=True)


def self_check(gap: float, theirs: str, ours: str, limit: float = 1e-4) -> None:
    if not gap <= limit:
        raise PretrainedFolderError(
            f"export self-check failed: diffusers' {theirs} differs from this model's {ours} by {gap:.1e} on a probe "
            f"batch (limit {limit:.0e}); nothing was written"
        )


def autoencoder_kl_summary(model: DiffusersAutoencoder) -> dict[str, Any]:
    """What latent diffusion stores about a folder VAE in its hyper-parameters (for people reading checkpoints)."""
    return {
        "diffusers_folder": str(model.folder.resolve()),
        "latent_channels": model.latent_channels,
        "downsample_factor": model.downsample_factor,
        "scaling_factor": model.scaling_factor,
        "shift_factor": model.shift_factor,
    }
