"""The DiT backbone: shapes, adaLN-Zero's identity at initialisation (and that it still trains), cross-attention
masking, activation checkpointing, its FLOP count and its UNet-compatible signature."""

import inspect

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gen_lightning.nn.dit import DiT, DiTConfig, dit_forward_flops, sincos_position_embedding
from gen_lightning.nn.unet import UNet

SMALL = {"width": 32, "depth": 2, "num_heads": 4}


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, so zero-initialised branches (gates, cross-attention, output) take part."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


@pytest.mark.parametrize(
    ("patch", "height", "width", "out_channels", "learn_sigma", "expected_channels"),
    [(2, 32, 32, None, False, 4), (4, 32, 16, None, True, 8), (1, 8, 8, 3, False, 3), (8, 64, 64, 2, True, 4)],
)
def test_output_has_the_input_size_and_the_asked_channels(
    patch: int, height: int, width: int, out_channels: int | None, learn_sigma: bool, expected_channels: int
) -> None:
    net = _randomise(DiT({**SMALL, "in_channels": 4, "patch_size": patch, "out_channels": out_channels,
                          "learn_sigma": learn_sigma}))  # fmt: skip
    out = net(torch.randn(2, 4, height, width), torch.tensor([3.0, 999.0]))
    assert out.shape == (2, expected_channels, height, width)
    assert out.abs().sum() > 0


def test_unpatchify_inverts_patchify() -> None:
    net = DiT({**SMALL, "in_channels": 3, "patch_size": 4})
    x = torch.randn(2, 3, 16, 8)
    p = 4
    tokens = x.reshape(2, 3, 4, p, 2, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 8, p * p * 3)  # row-major patches
    assert torch.equal(net.unpatchify(tokens, 4, 2), x)


def test_adaln_zero_blocks_are_the_identity_and_the_output_is_zero_at_init() -> None:
    net = DiT({**SMALL, "context_dim": 16, "cond_dim": 8})
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0.0, 500.0, 999.0])
    context, mask = torch.randn(3, 5, 16), torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4])
    cond = torch.randn(3, 8)
    assert torch.equal(net(x, t, context, mask, cond), torch.zeros_like(x))
    tokens, c = torch.randn(3, 64, 32), torch.randn(3, 32)
    for block in net.blocks:
        assert torch.equal(block(tokens, c, context, mask), tokens)


def test_it_still_learns_from_the_zero_init() -> None:
    # adaLN-Zero's gates start at 0; their gradient is the branch's output, so the branch must not start at 0 too
    # (our Attention zero-initialises its output projection; the DiT re-initialises it for self-attention).
    torch.manual_seed(0)
    net = DiT({**SMALL, "context_dim": 16})
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, t, context = torch.randn(4, 3, 8, 8), torch.tensor([1.0, 10.0, 100.0, 900.0]), torch.randn(4, 5, 16)
    target = torch.randn(4, 3, 8, 8)
    # step 1 moves the zero output layer, step 2 the gates, step 3 sees gradients everywhere (as DiT itself)
    for _ in range(3):
        optimizer.zero_grad()
        (net(x, t, context) - target).pow(2).mean().backward()
        optimizer.step()
    width = SMALL["width"]
    for block in net.blocks:
        gate_rows = block.modulation[-1].weight.grad[2 * width : 3 * width]  # gate of the self-attention branch
        assert gate_rows.abs().sum() > 0
        assert block.attn.out.weight.grad.abs().sum() > 0
        assert block.cross_attn.out.weight.grad.abs().sum() > 0
        assert block.mlp[0].weight.grad.abs().sum() > 0


def test_padding_tokens_do_not_change_the_output() -> None:
    net = _randomise(DiT({**SMALL, "context_dim": 16})).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 50.0])
    real = torch.randn(2, 3, 16)
    padded = torch.cat([real, torch.randn(2, 4, 16)], dim=1)
    repadded = torch.cat([real, 100 * torch.randn(2, 4, 16)], dim=1)
    mask = torch.tensor([[True] * 3 + [False] * 4] * 2)
    reference = net(x, t, real)
    torch.testing.assert_close(net(x, t, padded, mask), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(x, t, repadded, mask), reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(net(x, t, padded), reference, atol=1e-3)  # unmasked, the padding does count


def test_activation_checkpointing_gives_the_same_output_and_gradients() -> None:
    config = {**SMALL, "context_dim": 16, "cond_dim": 8}
    plain = _randomise(DiT(config)).train()
    checkpointed = DiT({**config, "gradient_checkpointing": True}).train()
    checkpointed.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 50.0])
    context, mask, cond = (
        torch.randn(2, 4, 16),
        torch.tensor([[True] * 4, [True, True, False, False]]),
        torch.randn(2, 8),
    )
    outputs = []
    for net in (plain, checkpointed):
        out = net(x, t, context=context, context_mask=mask, cond=cond)
        out.pow(2).sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize(
    ("config", "height", "width", "context_length"),
    [
        ({**SMALL}, 16, 16, 0),
        ({**SMALL, "patch_size": 4, "in_channels": 4, "learn_sigma": True}, 32, 16, 0),
        ({**SMALL, "context_dim": 24, "cond_dim": 8, "mlp_ratio": 2.0}, 8, 8, 7),
    ],
)
def test_flop_count_matches_torch_flop_counter(config: dict, height: int, width: int, context_length: int) -> None:
    # "math" attention is plain matmuls, which the counter sees on CPU (it has no formula for CPU flash attention).
    net = DiT({**config, "attention": "math"})
    batch = 3
    x = torch.randn(batch, net.config.in_channels, height, width)
    kwargs = {}
    if context_length:
        kwargs = {"context": torch.randn(batch, context_length, config["context_dim"]), "cond": torch.randn(batch, 8)}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, torch.full((batch,), 7.0), **kwargs)
    assert dit_forward_flops(net.config, height, width, context_length, batch) == counter.get_total_flops()


def test_flop_count_by_hand_for_one_block() -> None:
    # width 8, patch 2, one 2x2-patch image = 1 token, 1 block, mlp 4x, 1 channel in and out:
    # patch 1*4*8, time MLP 256*8 + 8*8, adaLN 6*8*8, attention 4*8*8 + 2*1*1*8, MLP 2*8*32, final 2*8*8 + 8*4.
    macs = 32 + 2048 + 64 + 384 + 256 + 16 + 512 + 128 + 32
    config = {"width": 8, "depth": 1, "num_heads": 2, "patch_size": 2, "in_channels": 1}
    assert dit_forward_flops(config, 2, 2) == 2 * macs


def test_signature_matches_the_unet_so_configs_can_swap_them() -> None:
    dit_params = list(inspect.signature(DiT.forward).parameters)
    assert dit_params == list(inspect.signature(UNet.forward).parameters)
    assert DiTConfig.coerce(DiTConfig(**SMALL).as_dict()) == DiTConfig(**SMALL)


def test_position_embeddings() -> None:
    table = sincos_position_embedding(3, 4, 16)
    assert table.shape == (12, 16)
    rows, cols = table[:, :8].reshape(3, 4, 8), table[:, 8:].reshape(3, 4, 8)
    assert torch.equal(rows[:, :1].expand(3, 4, 8), rows) and torch.equal(cols[:1].expand(3, 4, 8), cols)
    assert len({tuple(r.tolist()) for r in table}) == 12  # every position distinct
    learned = DiT({**SMALL, "position_embedding": "learned", "input_size": 16})
    assert learned(torch.randn(1, 3, 16, 16), torch.tensor([1.0])).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="learned position embedding"):
        learned(torch.randn(1, 3, 8, 8), torch.tensor([1.0]))
    sincos = DiT(SMALL)
    for side in (8, 12, 20):  # the fixed embedding takes any size
        assert sincos(torch.randn(1, 3, side, side), torch.tensor([1.0])).shape == (1, 3, side, side)


def test_bad_configs_and_inputs_raise() -> None:
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiT(SMALL)(torch.randn(1, 3, 7, 8), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="num_heads"):
        DiT({**SMALL, "num_heads": 5})
    with pytest.raises(ValueError, match="position_embedding"):
        DiT({**SMALL, "position_embedding": "rope"})
    with pytest.raises(ValueError, match="no context"):
        DiT({**SMALL, "context_dim": 8})(torch.randn(1, 3, 8, 8), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="no cond"):
        DiT({**SMALL, "cond_dim": 8})(torch.randn(1, 3, 8, 8), torch.tensor([1.0]))
