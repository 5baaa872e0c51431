"""Every sampler name through every diffusion family: `sample(sampler=...)` takes any name of ALL_SAMPLER_NAMES that
fits the model's objective, or a sampler object of any kind, and classifier-free guidance goes through the same loop."""

from __future__ import annotations

import pytest
import torch

from gen_lightning.diffusion import CFGDenoiser, EulerSampler, gaussian_noise, sample_loop
from gen_lightning.models import DiffusionModel
from gen_lightning.sampler_names import VP_SAMPLER_NAMES
from tests.test_latent_diffusion import tiny_ldm
from tests.test_world_model import tiny_world_model

UNET = {"channels": [8, 16], "attention_levels": [1], "num_heads": 2}


def perturbed(model):
    """A zero-initialised output layer samples the same from any sampler: give the EMA network some output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.ema.copy_from(model.net)
    return model


def families(vae_checkpoint) -> dict[str, DiffusionModel]:
    world = tiny_world_model()
    world.start_frames.copy_(torch.rand_like(world.start_frames) * 2 - 1)
    return {
        "diffusion": perturbed(DiffusionModel(unet=UNET, image_size=16, sample_steps=2)),
        "latent diffusion": perturbed(tiny_ldm(vae_checkpoint, latent_scale=1.0, sample_steps=2)),
        "world model": perturbed(world),
    }


def test_each_family_samples_with_each_sampler_name(tiny_vae_checkpoint):
    for family, model in families(tiny_vae_checkpoint).items():
        drawn = {}
        for name in VP_SAMPLER_NAMES:
            images = model.sample(2, steps=3, sampler=name, generator=torch.Generator().manual_seed(0))
            assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all(), (family, name)
            assert images.abs().max() <= 1, (family, name)
            drawn[name] = images
        # Each name is its own sampler: no two of them integrate alike in 3 steps.
        for a in VP_SAMPLER_NAMES:
            for b in VP_SAMPLER_NAMES[VP_SAMPLER_NAMES.index(a) + 1 :]:
                assert (drawn[a] - drawn[b]).abs().max() > 1e-4, (family, a, b)


def test_guided_latent_model_with_dpm_solver_goes_through_cfg(tiny_vae_checkpoint):
    model = perturbed(tiny_ldm(tiny_vae_checkpoint, latent_scale=1.0, sample_steps=4))
    prompts = ["red circle", "sun"]

    def draw(weight: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return model.sample(2, prompts, guidance=weight, sampler="dpm++", generator=generator)

    guided, plain = draw(3.0), draw(1.0)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3
    # By hand: the same loop, DPM-Solver++ and CFGDenoiser on the EMA network, then the VAE decoder.
    with model.evaluating(), torch.no_grad():
        hidden, mask, pooled = model.ema.shadow.encode(model.tokenize([*prompts, ""]))
        cond, uncond = (
            {"context": (hidden[:-1], mask[:-1], pooled[:-1])},
            {"context": (hidden[-1:], mask[-1:], pooled[-1:])},
        )
        generator = torch.Generator().manual_seed(0)
        noise = gaussian_noise((2, *model.sample_shape), generator)
        denoiser = CFGDenoiser(model.ema.shadow, 3.0)
        latents = sample_loop(denoiser, model.make_sampler("dpm++"), noise, 4, {"cond": cond, "uncond": uncond})
        by_hand = model.vae.decode(latents / model.latent_scale).clamp(-1, 1)
    torch.testing.assert_close(guided, by_hand, rtol=1e-4, atol=1e-4)


def test_a_sampler_object_of_any_kind_is_used_as_given():
    model = perturbed(DiffusionModel(unet=UNET, image_size=16, sample_steps=3))
    karras = EulerSampler(model.schedule, "epsilon", clip_sample=1.0)
    spaced = EulerSampler(model.schedule, "epsilon", clip_sample=1.0, timestep_spacing="trailing")
    seeded = lambda: {"generator": torch.Generator().manual_seed(0)}  # noqa: E731
    torch.testing.assert_close(
        model.sample(2, sampler=karras, **seeded()), model.sample(2, sampler="euler", **seeded())
    )
    assert (
        model.sample(2, sampler=spaced, **seeded()) - model.sample(2, sampler="euler", **seeded())
    ).abs().max() > 1e-4


def test_bad_sampler_settings_are_refused():
    model = DiffusionModel(unet=UNET, image_size=16)
    with pytest.raises(ValueError, match="'lms'"):
        model.sample(1, sampler="lms")
    with pytest.raises(ValueError, match="eta is DDIM's"):
        model.make_sampler("heun", eta=0.5)
    with pytest.raises(ValueError, match="'lms'"):
        DiffusionModel(unet=UNET, image_size=16, sampler="lms")
