"""One generation interface on every generative model: sample(n, cond=None, *, steps=None, guidance=None,
sampler=None, generator=None), where None is the model's default (sampling_defaults says what that is). The CLI,
the evaluation and the sample grid call nothing else."""

from __future__ import annotations

import inspect

import pytest
import torch

from gen_lightning.models import CLIPModel, DiffusionModel, LatentDiffusionModel, VAEModel, WorldModel
from gen_lightning.models.base import GenerativeModule
from gen_lightning.models.world_model import NextFrame
from tests.test_clip import tiny_clip
from tests.test_latent_diffusion import tiny_ldm
from tests.test_world_model import tiny_world_model

UNET = {"channels": [8, 16], "attention_levels": [1], "num_heads": 2}


def generative_models(vae_checkpoint) -> dict[str, GenerativeModule]:
    torch.manual_seed(0)
    world = tiny_world_model()
    world.start_frames.copy_(torch.rand_like(world.start_frames) * 2 - 1)  # as the first training batch fills it
    return {
        "diffusion": DiffusionModel(unet=UNET, image_size=16, sample_steps=2),
        "vae": VAEModel(autoencoder={"channels": [8], "latent_channels": 2}, image_size=16),
        "latent diffusion": tiny_ldm(vae_checkpoint, latent_scale=1.0, sample_steps=2),
        "world model": world,
    }


@pytest.mark.parametrize("cls", [DiffusionModel, VAEModel, LatentDiffusionModel, WorldModel, CLIPModel])
def test_every_model_has_the_one_signature(cls):
    contract = inspect.signature(GenerativeModule.sample)
    assert list(contract.parameters) == ["self", "n", "cond", "steps", "guidance", "sampler", "generator"]
    assert all(p.kind == p.KEYWORD_ONLY and p.default is None for p in list(contract.parameters.values())[3:])
    signature = inspect.signature(cls.sample)
    assert [(p.name, p.kind, p.default) for p in signature.parameters.values()] == [
        (p.name, p.kind, p.default) for p in contract.parameters.values()
    ]


def test_defaults_draw_images_in_range(tiny_vae_checkpoint):
    for name, model in generative_models(tiny_vae_checkpoint).items():
        images = model.sample(2, generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1, name
        again = model.sample(2, generator=torch.Generator().manual_seed(0))
        assert torch.equal(images, again), name  # the generator decides every draw
        assert model.kind in ("image", "text-to-image", "next-frame"), name


def test_none_means_the_models_default_and_a_given_value_is_used(tiny_vae_checkpoint):
    def draw(model, **options) -> torch.Tensor:
        return model.sample(2, ["red circle", "sun"], steps=2, generator=torch.Generator().manual_seed(0), **options)

    plain = tiny_ldm(tiny_vae_checkpoint, latent_scale=1.0, guidance=1.0)
    with torch.no_grad():  # an untrained UNet's cross-attention output is zero: make the prompt matter
        for p in plain.net.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        plain.ema.copy_from(plain.net)
    assert plain.sampling_defaults()["guidance"] == 1.0
    torch.testing.assert_close(draw(plain), draw(plain, guidance=1.0))
    guided = tiny_ldm(tiny_vae_checkpoint, latent_scale=1.0, guidance=3.0)
    guided.load_state_dict(plain.state_dict())
    # A text model asked for w = 1 samples at w = 1, not at its default 3 (the old 1.0-means-default rule)
    torch.testing.assert_close(draw(guided, guidance=1.0), draw(plain))
    assert (draw(guided) - draw(plain)).abs().max() > 1e-4


def test_a_sampler_object_carries_settings_a_name_cannot(tiny_vae_checkpoint):
    model = DiffusionModel(unet=UNET, image_size=16, sample_steps=3)
    with torch.no_grad():
        torch.nn.init.normal_(model.net.out_conv.weight, std=0.1)
        model.ema.copy_from(model.net)
    seeded = {"generator": torch.Generator().manual_seed(0)}
    deterministic = model.sample(2, **seeded)
    assert model.sampling_defaults()["sampler"] == "ddim" and model.sampling_defaults()["eta"] == 0.0
    seeded = {"generator": torch.Generator().manual_seed(0)}
    noisy = model.sample(2, sampler=model.make_sampler("ddim", eta=1.0), **seeded)
    assert (noisy - deterministic).abs().max() > 1e-3


def test_conditioning_is_typed_and_refused_where_it_means_nothing(tiny_vae_checkpoint):
    models = generative_models(tiny_vae_checkpoint)
    for name in ("diffusion", "vae", "world model"):
        with pytest.raises(ValueError, match="guidance"):
            models[name].sample(2, guidance=1.0)
    for name in ("diffusion", "vae"):
        with pytest.raises(ValueError, match="unconditional"):
            models[name].sample(2, "a prompt")
    world = models["world model"]
    frames = world.start_context(2)
    by_dicts = world.sample(2, NextFrame(frames, [{"x": 0.2, "y": 0.3}, {"x": 0.9, "y": 0.1, "click": 1}]))
    assert by_dicts.shape == (2, 3, 16, 16)
    with pytest.raises(TypeError, match="NextFrame"):
        world.sample(2, {"frames": frames, "action": [{}, {}]})
    with pytest.raises(TypeError, match="does not generate"):
        tiny_clip().sample(2)
