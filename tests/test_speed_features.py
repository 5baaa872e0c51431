"""The speed switches (bench/speed_features.py measures them) change speed only, not results."""

from __future__ import annotations

import pytest
import torch

from gen_lightning.models import DiffusionModel
from gen_lightning.nn.unet import UNet

TINY = {"channels": [8, 16], "attention_levels": [1], "num_heads": 2, "context_dim": 8}


def test_math_attention_equals_sdpa_with_padding_mask():
    torch.manual_seed(0)
    sdpa = UNet(TINY)
    math = UNet({**TINY, "attention": "math"})
    math.load_state_dict(sdpa.state_dict())
    for p in [*sdpa.parameters(), *math.parameters()]:  # the zero-initialised output layers would hide attention
        torch.nn.init.normal_(p, std=0.2)
    math.load_state_dict(sdpa.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    context, mask = torch.randn(2, 5, 8), torch.tensor([[True] * 5, [True, True, False, False, False]])
    expected = sdpa(x, t, context, mask)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(math(x, t, context, mask), expected, rtol=1e-4, atol=1e-5)


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="attention backend 'flash3'"):
        UNet({**TINY, "attention": "flash3"})


def test_compile_and_fused_adamw_switches():
    model = DiffusionModel(unet=TINY | {"context_dim": None}, image_size=8, compile=True, fused_adamw=False)
    names = list(model.state_dict())
    model.configure_model()
    assert model.net._compiled_call_impl is not None
    assert list(model.state_dict()) == names  # compiled in place: checkpoints keep their keys
    model.trainer = type("T", (), {"estimated_stepping_batches": 10})()  # only read for the cosine schedule
    assert model.configure_optimizers()["optimizer"].defaults["fused"] is False
    assert (
        DiffusionModel(unet=TINY | {"context_dim": None})
        .adamw_with_warmup([torch.nn.Parameter(torch.ones(1))])["optimizer"]
        .defaults["fused"]
    )
