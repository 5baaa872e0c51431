"""The exact key maps onto diffusers' networks (interop.diffusers_maps): our UNet is UNet2DModel and our VAE (with
`downsample="ldm"`) is AutoencoderKL, weight for weight; shapes that diffusers cannot represent are refused in words."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from gen_lightning.interop.diffusers_maps import (  # noqa: E402
    autoencoder_export_problem,
    autoencoder_key_map,
    autoencoder_kl_config,
    unet2d_config,
    unet_export_problem,
    unet_key_map,
)
from gen_lightning.nn.autoencoder import Autoencoder, AutoencoderConfig  # noqa: E402
from gen_lightning.nn.unet import UNet, UNetConfig  # noqa: E402

UNET_SHAPES = [
    {"channels": (32, 64), "attention_levels": (1,), "num_heads": 2},  # attention at the inner level only
    {"channels": (32, 64, 64), "attention_levels": (), "num_heads": 4},  # the demo's: mid attention only
    {"channels": (32, 32), "num_res_blocks": 2, "attention_levels": (0, 1), "num_heads": 1},
]


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised output layers would make every comparison 0 = 0."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


@pytest.mark.parametrize("shape", UNET_SHAPES, ids=["attn-inner", "mid-only", "two-blocks"])
def test_unet_maps_onto_unet2dmodel(shape):
    torch.manual_seed(0)
    ours = randomised(UNet(UNetConfig(**shape)))
    assert unet_export_problem(ours) is None
    key_map = unet_key_map(ours)
    state = key_map.to_diffusers(ours.state_dict())
    theirs = diffusers.UNet2DModel(**unet2d_config(ours, 16)).eval()
    theirs.load_state_dict(state, strict=True)  # every tensor of theirs is given, none is left over
    back = key_map.from_diffusers(theirs.state_dict())
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    with torch.no_grad():
        expected = ours(x, t)
        assert (expected - theirs(x, t).sample).abs().max() < 1e-5
        assert expected.abs().max() > 0.1


@pytest.mark.parametrize("mid_attention", [True, False])
def test_ldm_padded_autoencoder_maps_onto_autoencoder_kl(mid_attention):
    torch.manual_seed(0)
    ours = randomised(Autoencoder(AutoencoderConfig(channels=(32, 32), mid_attention=mid_attention)))
    assert ours.config.downsample == "ldm" and autoencoder_export_problem(ours) is None
    key_map = autoencoder_key_map(ours)
    theirs = diffusers.AutoencoderKL(**autoencoder_kl_config(ours, 16, 0.5)).eval()
    theirs.load_state_dict(key_map.to_diffusers(ours.state_dict()), strict=True)
    back = key_map.from_diffusers(theirs.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior, theirs_posterior = ours.encode(x), theirs.encode(x).latent_dist
        assert (posterior.mean - theirs_posterior.mean).abs().max() < 1e-5
        assert (posterior.logvar - theirs_posterior.logvar).abs().max() < 1e-5
        assert (ours.decode(posterior.mean) - theirs.decode(posterior.mean).sample).abs().max() < 1e-5


def test_the_old_padding_would_not_match():
    """Why the option exists: with padding on all sides the same weights encode something else."""
    torch.manual_seed(0)
    ldm = randomised(Autoencoder(AutoencoderConfig(channels=(32, 32))))
    same = Autoencoder(AutoencoderConfig(channels=(32, 32), downsample="same")).eval()
    same.load_state_dict(ldm.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert (ldm.encode(x).mean - same.encode(x).mean).abs().max() > 1e-2
    assert "downsample='same'" in autoencoder_export_problem(same)


def test_shapes_diffusers_cannot_represent_are_named():
    mixed_groups = UNet(UNetConfig(channels=(8, 16), attention_levels=()))
    assert "GroupNorm layers use 8 and 16" in unet_export_problem(mixed_groups)
    two_head_widths = UNet(UNetConfig(channels=(32, 64), attention_levels=(0, 1), num_heads=4))
    assert "heads of 8 and 16" in unet_export_problem(two_head_widths)
    cross = UNet(UNetConfig(channels=(32, 32), attention_levels=(), context_dim=16))
    assert "context" in unet_export_problem(cross)
    patched = UNet(UNetConfig(channels=(32, 32), attention_levels=(), patch_size=2))
    assert "unet.patch_size" in unet_export_problem(patched)
    heads = Autoencoder(AutoencoderConfig(channels=(32, 32), num_heads=4))
    assert "4 heads" in autoencoder_export_problem(heads)
