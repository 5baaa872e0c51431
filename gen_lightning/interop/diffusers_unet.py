"""A pixel-space diffusion model out as a diffusers DDIMPipeline folder (model_index.json, unet/, scheduler/).

The UNet maps onto UNet2DModel exactly (interop.diffusers_maps); the scheduler config carries our beta table itself
(`trained_betas`, float64 -> exact for every schedule, zero terminal SNR included), the prediction type, the x0 clip
and the timestep spacing. `DDIMPipeline.from_pretrained(DIR)(..., use_clipped_model_output=True)` then reproduces
gen_lightning's DDIM sample from the same noise: our sampler recomputes ε from the clipped x̂0, which diffusers does
only with that flag. Step counts that do not divide num_train_timesteps differ slightly (diffusers steps to
t - T // n, our sampler to its next listed timestep).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gen_lightning.diffusion.schedule import NoiseSchedule
from gen_lightning.interop.diffusers_maps import unet2d_config, unet_key_map
from gen_lightning.interop.diffusers_vae import self_check
from gen_lightning.interop.folders import PretrainedFolderError, quiet_hf_logs, require_hf
from gen_lightning.nn.unet import UNet

PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}
SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def ddim_scheduler_config(
    schedule: NoiseSchedule, *, schedule_name: str, prediction_type: str, clip_sample: float | None,
    timestep_spacing: str,
) -> dict:  # fmt: skip
    if prediction_type not in PREDICTION_TYPES:
        raise PretrainedFolderError(
            f"prediction_type {prediction_type!r} has no DDIMScheduler counterpart (it knows "
            f"{', '.join(PREDICTION_TYPES)}); export with --format safetensors"
        )
    return {
        "num_train_timesteps": schedule.num_timesteps,
        "beta_schedule": SCHEDULE_NAMES.get(schedule_name, "linear"),  # for readers: trained_betas wins
        "trained_betas": schedule.betas.tolist(),
        "prediction_type": PREDICTION_TYPES[prediction_type],
        "clip_sample": clip_sample is not None,
        "clip_sample_range": float(clip_sample or 1.0),
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": timestep_spacing,
        "rescale_betas_zero_snr": False,  # already in the table
        "thresholding": False,
    }


def export_ddim_pipeline(unet: UNet, scheduler_config: dict, sample_size: int, out: Path) -> None:
    """`unet` + the scheduler as a DDIMPipeline folder in `out`, after a self-check on a probe batch
    (unet_export_problem(unet) must be None)."""
    diffusers = require_hf(out, "diffusers")
    with quiet_hf_logs():
        theirs = diffusers.UNet2DModel(**unet2d_config(unet, sample_size))
        scheduler = diffusers.DDIMScheduler(**scheduler_config)
    state = unet_key_map(unet).to_diffusers(unet.state_dict())
    theirs.load_state_dict({k: v.detach().contiguous() for k, v in state.items()}, strict=True)
    theirs.eval()
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, unet.config.in_channels, sample_size, sample_size, generator=generator)
    last = scheduler_config["num_train_timesteps"] - 1
    with torch.no_grad():
        gap = max(
            (unet(probe, torch.full((2,), t)) - theirs(probe, torch.full((2,), t)).sample).abs().max().item()
            for t in (0, last // 2, last)
        )
    self_check(gap, "UNet2DModel", "UNet")
    pipeline = diffusers.DDIMPipeline(unet=theirs, scheduler=scheduler)
    pipeline.save_pretrained(str(out), safe_serialization=True)
