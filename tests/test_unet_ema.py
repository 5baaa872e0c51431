"""The UNet's shapes and conditioning paths, and the EMA warm-up."""

from __future__ import annotations

import pytest
import torch

from gen_lightning.nn.ema import EMA, ema_decay
from gen_lightning.nn.unet import UNet, UNetConfig


def tiny(**overrides) -> UNet:
    config = {"channels": (8, 16), "attention_levels": (1,), "num_heads": 2, **overrides}
    return UNet(UNetConfig(**config))


def test_output_shape_and_zero_init_output():
    unet = tiny(num_res_blocks=2, channels=(8, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    out = unet(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv: the untrained net predicts exactly 0


def perturb(unet: UNet) -> UNet:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def test_time_embedding_changes_output():
    unet = perturb(tiny())
    x = torch.randn(1, 3, 8, 8)
    assert not torch.allclose(unet(x, torch.tensor([10])), unet(x, torch.tensor([500])))


def test_cross_attention_uses_context_and_respects_mask():
    unet = perturb(tiny(context_dim=12))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 5])
    context = torch.randn(2, 4, 12)
    base = unet(x, t, context=context)
    assert not torch.allclose(base, unet(x, t, context=torch.randn(2, 4, 12)))
    mask = torch.tensor([[True, True, False, False]] * 2)
    changed_padding = context.clone()
    changed_padding[:, 2:] = torch.randn(2, 2, 12)
    # tokens masked out as padding must not influence the output
    torch.testing.assert_close(unet(x, t, context, mask), unet(x, t, changed_padding, mask))
    with pytest.raises(ValueError, match="got no context"):
        unet(x, t)


def test_cond_embedding_and_errors():
    unet = perturb(tiny(cond_dim=5))
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([3])
    assert not torch.allclose(unet(x, t, cond=torch.zeros(1, 5)), unet(x, t, cond=torch.ones(1, 5)))
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(torch.randn(1, 3, 9, 9), t, cond=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="attention_levels"):
        tiny(attention_levels=(3,))


def test_patch_size_runs_the_unet_on_folded_pixels_and_unfolds_its_output():
    """patch_size p is a UNet with p² times the channels in and out, on pixel-unshuffled input, shuffled back: the
    same weights compute the same thing, and every output pixel keeps its own value."""
    patched = perturb(tiny(patch_size=2, cond_dim=5))
    folded = tiny(in_channels=12, out_channels=12, cond_dim=5)
    folded.load_state_dict(patched.state_dict())
    x, t, cond = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.randn(2, 5)
    out = patched(x, t, cond=cond)
    assert out.shape == x.shape
    expected = torch.nn.functional.pixel_shuffle(folded(torch.nn.functional.pixel_unshuffle(x, 2), t, cond=cond), 2)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out[..., 0::2, 0::2], out[..., 0::2, 1::2])  # not one value per patch
    with pytest.raises(ValueError, match="patch_size 2"):
        patched(torch.randn(1, 3, 10, 10), t[:1], cond=cond[:1])  # 10 is not a multiple of 2 (patch) × 2 (levels)
    with pytest.raises(ValueError, match="patch_size=0"):
        tiny(patch_size=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = perturb(tiny())
    checkpointed = tiny(gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    plain(x, t).square().sum().backward()
    checkpointed(x, t).square().sum().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_config_round_trips_through_plain_dict():
    config = UNetConfig(channels=(8, 16), attention_levels=(1,), context_dim=4)
    assert UNetConfig.coerce(config.as_dict()) == config
    with pytest.raises(TypeError, match="bogus"):
        UNetConfig.coerce({"bogus": 1})


def test_ema_decay_warms_up():
    assert ema_decay(0) == 0.0  # first update copies the weights
    assert ema_decay(1000) == pytest.approx(1 - 1001 ** (-2 / 3))
    assert ema_decay(10**9, max_decay=0.999) == 0.999
    assert ema_decay(10) < ema_decay(100) < ema_decay(1000)


def test_ema_tracks_weights():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay 0: exact copy
    torch.testing.assert_close(ema.shadow.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(3.0)
    decay = ema.update(model)
    torch.testing.assert_close(ema.shadow.weight, torch.full((3, 3), decay * 1.0 + (1 - decay) * 3.0))
    assert not any(p.requires_grad for p in ema.parameters())
