"""The DiT as the backbone of every diffusion family (model.backbone=dit): it gets the channels, text width and cond
width the model fixes, the text reaches it through cross-attention and adaLN, the world model's context through its
input channels and the action through adaLN, and a checkpoint rebuilds it weights-only."""

from __future__ import annotations

import pytest
import torch

from gen_lightning.errors import UserInputError
from gen_lightning.models import DiffusionModel
from gen_lightning.models.loading import load_model
from gen_lightning.models.world_model import COND_DIM, NextFrame
from gen_lightning.nn.dit import DiT
from tests.conftest import save_checkpoint
from tests.test_latent_diffusion import tiny_ldm
from tests.test_model_samplers import perturbed
from tests.test_world_model import tiny_world_model

DIT = {"patch_size": 2, "width": 16, "depth": 2, "num_heads": 2}


def test_pixel_model_with_a_dit_trains_and_samples_with_every_objective():
    for objective, sampler in (("vp", "dpm++"), ("flow", "flow_heun")):
        torch.manual_seed(0)
        model = DiffusionModel(image_size=16, backbone="dit", dit=DIT, objective=objective, sample_steps=2)
        assert isinstance(model.net, DiT) and model.net.config.in_channels == model.net.config.out_channels == 3
        loss = model.loss_fn(model.net, torch.rand(2, 3, 16, 16) * 2 - 1)
        loss.backward()
        assert model.net.final.linear.weight.grad.abs().sum() > 0  # adaLN-Zero: the final layer learns first
        images = perturbed(model).sample(2, sampler=sampler, generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_latent_dit_cross_attends_to_the_text_and_takes_the_pooled_caption(tiny_vae_checkpoint):
    model = perturbed(tiny_ldm(tiny_vae_checkpoint, latent_scale=1.0, backbone="dit", dit=DIT, sample_steps=2))
    dit = model.net.unet
    assert isinstance(dit, DiT) and dit.config.in_channels == 4 and dit.config.input_size == 8
    assert dit.config.context_dim == dit.config.cond_dim == model.net.text.width  # cross-attention and adaLN
    assert all(block.cross_attn is not None for block in dit.blocks)
    draw = lambda prompts: model.sample(2, prompts, guidance=3.0, generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert (draw(["red circle", "sun"]) - draw(["blue square", "cat"])).abs().max() > 1e-3


def test_world_dit_sees_the_context_frames_and_the_action(tmp_path):
    model = perturbed(tiny_world_model(backbone="dit", dit=DIT))
    dit = model.net.unet
    assert isinstance(dit, DiT) and dit.config.cond_dim == COND_DIM
    assert dit.config.in_channels == 3 * (model.hparams.context_frames + 1) + 1  # next frame, context, cursor
    frames = torch.rand(2, model.hparams.context_frames, 3, 16, 16) * 2 - 1
    still, moved = ({"x": 0.5, "y": 0.5}, {"x": 0.5, "y": 0.5}), ({"x": 0.1, "y": 0.9}, {"x": 0.9, "y": 0.1})
    draw = lambda cond: model.sample(2, cond, generator=torch.Generator().manual_seed(0))  # noqa: E731
    base = draw(NextFrame(frames, still))
    assert (base - draw(NextFrame(frames, moved))).abs().max() > 1e-4
    assert (base - draw(NextFrame(-frames, still))).abs().max() > 1e-4
    # a checkpoint rebuilds the same network from its plain hyper-parameters (weights-only loading)
    model.start_frames.copy_(frames[0])
    loaded = load_model(save_checkpoint(model, tmp_path / "world_dit.ckpt"))
    assert isinstance(loaded.net.unet, DiT) and loaded.hparams.backbone == "dit"
    torch.testing.assert_close(draw(NextFrame(frames, still)), loaded.sample(2, NextFrame(frames, still),
                               generator=torch.Generator().manual_seed(0)))  # fmt: skip


def test_backbone_options_are_checked():
    with pytest.raises(UserInputError, match=r"model.backbone='transformer'"):
        DiffusionModel(backbone="transformer")
    with pytest.raises(UserInputError, match=r"model.dit is set but model.backbone='unet'"):
        DiffusionModel(dit=DIT)
    with pytest.raises(UserInputError, match=r"model.dit.learn_sigma"):
        DiffusionModel(backbone="dit", dit={**DIT, "learn_sigma": True})
    checkpointed = DiffusionModel(image_size=16, backbone="dit", dit={**DIT, "gradient_checkpointing": True})
    assert checkpointed.net.config.gradient_checkpointing


def test_sample_cli_on_a_flow_dit_checkpoint(tmp_path, capsys):
    from gen_lightning.cli import main

    torch.manual_seed(0)
    model = perturbed(DiffusionModel(image_size=16, backbone="dit", dit=DIT, objective="flow", sample_steps=2))
    ckpt = str(save_checkpoint(model, tmp_path / "flow_dit.ckpt"))
    main(["sample", "--ckpt", ckpt, "--sampler", "flow_heun", "--steps", "3", "--n=4", f"--out={tmp_path / 'g.png'}"])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "g.png").is_file()
    with pytest.raises(UserInputError, match=r"sampler 'dpm\+\+' integrates model.objective='vp'"):
        main(["sample", "--ckpt", ckpt, "--sampler", "dpm++", f"--out={tmp_path / 'x.png'}"])
