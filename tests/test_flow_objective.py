"""Rectified flow as DiffusionModel's objective (and so its subclasses'): the flow loss and samplers are wired in, CFG
and the world model's conditioning go through them, and options or samplers of the other objective are refused by
name."""

from __future__ import annotations

import pytest
import torch

from gen_lightning.callbacks import SampleGrid
from gen_lightning.diffusion import (
    DiffusionLoss,
    EulerSampler,
    FlowEulerSampler,
    FlowMatchingLoss,
    gaussian_noise,
    sample_loop,
)
from gen_lightning.errors import UserInputError
from gen_lightning.models import DiffusionModel
from gen_lightning.sampler_names import FLOW_SAMPLER_NAMES
from tests.test_latent_diffusion import tiny_ldm
from tests.test_model_samplers import UNET, perturbed
from tests.test_world_model import tiny_world_model


def flow_model(**kwargs) -> DiffusionModel:
    torch.manual_seed(0)
    return perturbed(DiffusionModel(unet=UNET, image_size=16, objective="flow", sample_steps=3, **kwargs))


def test_the_flow_objective_trains_on_the_velocity_with_its_time_law():
    model = flow_model(time_sampling="uniform", time_shift=3.0)
    assert isinstance(model.loss_fn, FlowMatchingLoss) and model.loss_fn.shift == 3.0
    assert model.loss_fn.time_sampling == "uniform"
    assert isinstance(DiffusionModel(unet=UNET, image_size=16).loss_fn, DiffusionLoss)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    t, noise = torch.tensor([0.25, 0.75]), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        x_t = (1 - t.view(2, 1, 1, 1)) * x0 + t.view(2, 1, 1, 1) * noise
        by_hand = (model.net(x_t, 1000 * t) - (noise - x0)).pow(2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(model.loss_fn.per_sample(model.net, x0, t, noise), by_hand)
    # training_step goes through it (a scalar with a gradient for the network)
    loss = model.loss_fn(model.net, x0)  # what training_step computes
    loss.backward()
    assert loss.ndim == 0 and model.net.out_conv.weight.grad.abs().sum() > 0


def test_flow_sampling_is_the_shifted_flow_ode():
    model = flow_model(time_shift=2.0)
    assert model.sampling_defaults() == {"sampler": "flow_euler", "steps": 3, "time_shift": 2.0}
    drawn = model.sample(2, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    with model.evaluating():
        by_hand = sample_loop(
            model.ema.shadow, FlowEulerSampler(shift=2.0), gaussian_noise((2, 3, 16, 16), generator), 3
        )
    torch.testing.assert_close(drawn, by_hand.clamp(-1, 1))
    unshifted = model.sample(2, sampler=FlowEulerSampler(), generator=torch.Generator().manual_seed(0))
    assert (unshifted - drawn).abs().max() > 1e-4


def test_every_family_samples_with_every_flow_sampler(tiny_vae_checkpoint):
    world = perturbed(tiny_world_model(objective="flow"))
    world.start_frames.copy_(torch.rand_like(world.start_frames) * 2 - 1)
    latent = perturbed(tiny_ldm(tiny_vae_checkpoint, latent_scale=1.0, objective="flow", sample_steps=2))
    for model in (flow_model(), latent, world):
        for name in FLOW_SAMPLER_NAMES:
            images = model.sample(2, steps=2, sampler=name, generator=torch.Generator().manual_seed(0))
            assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all(), (type(model).__name__, name)
    # classifier-free guidance of the velocity: w = 3 differs from w = 1
    guided, plain = (
        latent.sample(2, ["red circle", "sun"], guidance=w, generator=torch.Generator().manual_seed(0)) for w in (3, 1)
    )
    assert (guided - plain).abs().max() > 1e-3


def test_the_other_objectives_options_and_samplers_are_refused_by_name():
    with pytest.raises(UserInputError, match=r"model.prediction_type='v' is an option of model.objective='vp'"):
        DiffusionModel(unet=UNET, objective="flow", prediction_type="v")
    with pytest.raises(UserInputError, match=r"model.time_shift=3.0 is an option of model.objective='flow'"):
        DiffusionModel(unet=UNET, time_shift=3.0)
    with pytest.raises(UserInputError, match=r"model.objective='score': expected one of vp, flow, edm"):
        DiffusionModel(unet=UNET, objective="score")
    with pytest.raises(UserInputError, match=r"sampler 'ddim' integrates model.objective='vp'.*valid: flow_euler"):
        DiffusionModel(unet=UNET, objective="flow", sampler="ddim")
    flow, vp = flow_model(), DiffusionModel(unet=UNET, image_size=16)
    with pytest.raises(UserInputError, match=r"sampler 'flow_heun' integrates model.objective='flow'"):
        vp.sample(1, sampler="flow_heun")
    with pytest.raises(UserInputError, match=r"EulerSampler samples model.objective='vp'"):
        flow.sample(1, sampler=EulerSampler(vp.schedule))
    with pytest.raises(UserInputError, match=r"model.objective='flow'"):
        SampleGrid(sampler="dpm++").on_fit_start(None, flow)  # a callback's sampler is checked when the fit starts
    with pytest.raises(ValueError, match="'lms'"):
        SampleGrid(sampler="lms")
