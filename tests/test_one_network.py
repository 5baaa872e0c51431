"""Each model holds one trainable network, `self.net`, and (the generative ones) `self.ema = EMA(self.net)`; frozen
parts are plain networks. Nothing is registered twice (FSDP wraps a module where it first finds it, and a second
path would stay unwrapped), no LightningModule sits inside another, and the optimizer trains the network's
parameters in the network's own order (the order old checkpoints' optimizer state is keyed by)."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import pytest
import torch

from gen_lightning.models import DiffusionModel, GenerativeModule, VAEModel
from gen_lightning.nn.ema import EMA
from tests.conftest import save_checkpoint
from tests.test_clip import tiny_clip
from tests.test_latent_diffusion import tiny_ldm
from tests.test_world_model import tiny_world_model

UNET = {"channels": [8, 16], "attention_levels": [1], "num_heads": 2}


@pytest.fixture(scope="module")
def families(tiny_vae_checkpoint, tmp_path_factory) -> dict[str, Callable[[], GenerativeModule]]:
    clip_checkpoint = save_checkpoint(tiny_clip(), tmp_path_factory.mktemp("clip") / "clip.ckpt")
    return {
        "diffusion": lambda: DiffusionModel(unet=UNET, image_size=16),
        "vae": lambda: VAEModel(autoencoder={"channels": [8], "latent_channels": 2}, image_size=16),
        "clip": tiny_clip,
        "world model": tiny_world_model,
        "latent diffusion": lambda: tiny_ldm(tiny_vae_checkpoint),
        "latent diffusion, CLIP text": lambda: tiny_ldm(tiny_vae_checkpoint, clip_checkpoint=str(clip_checkpoint)),
    }


class FakeTrainer:
    """What configure_optimizers reads from a Trainer."""

    estimated_stepping_batches = 10
    precision = "32-true"
    gradient_clip_val = None


def optimized(model: GenerativeModule) -> list[torch.nn.Parameter]:
    model.trainer = FakeTrainer()  # type: ignore[assignment]
    return [p for group in model.configure_optimizers()["optimizer"].param_groups for p in group["params"]]


def test_every_network_is_registered_once_and_no_model_holds_a_model(families):
    for name, build in families.items():
        model = build()
        assert len(list(model.named_modules(remove_duplicate=False))) == len(list(model.named_modules())), name
        assert len(list(model.named_parameters(remove_duplicate=False))) == len(list(model.named_parameters())), name
        assert not [m for m in model.modules() if isinstance(m, L.LightningModule) and m is not model], name
        emas = [m for m in model.modules() if isinstance(m, EMA)]
        assert emas == ([] if name == "clip" else [model.ema]), name  # CLIP: DeepSpeed presets, which refuse an EMA


def test_the_optimizer_trains_the_network_in_its_own_order(families):
    for name, build in families.items():
        model = build()
        trained = [id(p) for p in model.net.parameters() if p.requires_grad]
        params = [id(p) for p in optimized(model)]
        if name == "vae":
            trained.append(id(model.logvar))  # the likelihood's scale: its own group, after the network
        if name == "clip":  # two groups (weight decay or not), each in the network's order
            assert sorted(params) == sorted(trained) and params.index(id(model.net.logit_scale)) > 0
            continue
        assert params == trained, name
    frozen = families["latent diffusion, CLIP text"]()
    assert not any(p.requires_grad for p in [*frozen.vae.parameters(), *frozen.net.text.parameters()])
