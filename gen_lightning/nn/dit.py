"""DiT, the diffusion transformer of Peebles & Xie 2023, with the UNet's call signature so a config can swap them.

The image is cut into p x p patches, each a token; tokens get a 2-D position embedding (fixed sin-cos, or learned),
pass `depth` transformer blocks conditioned by adaLN-Zero (§3.2: the timestep embedding, plus an optional per-sample
vector such as a pooled text embedding, regresses each block's LayerNorm shift/scale and a per-channel gate on each
residual branch; the gates start at zero so every block starts as the identity), and a final adaLN-modulated linear
layer (zero at initialisation) maps them back to patches. For text, each block can cross-attend to the context tokens
after its self-attention (as PixArt-alpha; ungated, with its output projection zero at initialisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gen_lightning.nn.config import NetConfig
from gen_lightning.nn.layers import Attention, timestep_embedding

POSITION_EMBEDDINGS = ("sincos", "learned")
TIME_FREQUENCIES = 256  # width of the sinusoidal timestep features fed to the time MLP (DiT's choice)


@dataclass
class DiTConfig(NetConfig):
    """Shape of the DiT. width must divide by num_heads and by 4 (the 2-D sin-cos embedding).

    out_channels: None = in_channels; learn_sigma doubles it (the prediction, then the variance interpolation, as DiT).
    input_size: the image side the learned position embedding is made for (the sin-cos one takes any size divisible
    by patch_size). context_dim: width of the text tokens to cross-attend to (None: no cross-attention). cond_dim:
    width of a per-sample vector added to the time embedding (pooled text, class, action); 0 disables it.
    attention: "sdpa" or "math" (as the UNet). gradient_checkpointing: recompute each block in backward.
    """

    in_channels: int = 3
    out_channels: int | None = None
    learn_sigma: bool = False
    input_size: int = 32
    patch_size: int = 2
    width: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    context_dim: int | None = None
    cond_dim: int = 0
    position_embedding: str = "sincos"
    gradient_checkpointing: bool = False
    attention: str = "sdpa"

    @property
    def output_channels(self) -> int:
        channels = self.in_channels if self.out_channels is None else self.out_channels
        return 2 * channels if self.learn_sigma else channels


def sincos_position_embedding(height: int, width: int, dim: int) -> torch.Tensor:
    """[height * width, dim] fixed embedding of a row-major grid: the first dim/2 channels encode the row, the rest the
    column, each as sin/cos of the position at dim/4 frequencies 10000^(-k / (dim/4)) (MAE / DiT)."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    freqs = 10_000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width)
    cols = torch.arange(width, dtype=torch.float64).repeat(height)
    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: a per-sample shift/scale [N, D] applied to every token of x [N, L, D]; scale around 1."""
    return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
    """p x p patches -> tokens: a stride-p convolution, i.e. one shared linear map of each flattened patch."""

    def __init__(self, in_channels: int, width: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, h*w, D], row-major


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (possibly fractional) timestep, then a 2-layer SiLU MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, TIME_FREQUENCIES)  # float32
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # bf16 weights (DeepSpeed, FSDP) take bf16 inputs


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block (an FSDP / checkpointing unit): gated self-attention, optional cross-attention
    to context tokens, gated MLP; c [N, D] gives the six shift/scale/gate vectors."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None, attention: str = "sdpa"
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, backend=attention)
        self.cross_norm = nn.LayerNorm(width, eps=1e-6) if context_dim else None
        self.cross_attn = Attention(width, heads, context_dim, attention) if context_dim else None
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this DiT was built with cross-attention (context_dim set) but got no context")
            x = x + self.cross_attn(self.cross_norm(x), context, context_mask)
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of each token to its patch's p*p*C output values."""

    def __init__(self, width: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """eps/v/x0/velocity predictor: forward(x [N,C,H,W], t [N], context [N,L,D] | None, context_mask [N,L] | None,
    cond [N,cond_dim] | None), the UNet's signature; H and W divisible by patch_size."""

    def __init__(self, config: DiTConfig | dict[str, Any]) -> None:
        super().__init__()
        config = DiTConfig.coerce(config)
        self.config = config
        if config.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"dit.position_embedding {config.position_embedding!r}: expected {POSITION_EMBEDDINGS}")
        if config.width % 4 or config.width % config.num_heads:
            raise ValueError(f"dit.width {config.width} must divide by 4 and by num_heads={config.num_heads}")
        if config.input_size % config.patch_size:
            raise ValueError(f"dit.input_size {config.input_size} is not divisible by patch_size {config.patch_size}")
        width, patch = config.width, config.patch_size
        self.patch_embed = PatchEmbed(config.in_channels, width, patch)
        self.time_embed = TimestepEmbedder(width)
        self.cond_proj = nn.Linear(config.cond_dim, width) if config.cond_dim else None
        grid = config.input_size // patch
        self.position = (
            nn.Parameter(sincos_position_embedding(grid, grid, width)[None])
            if config.position_embedding == "learned"
            else None
        )
        self.blocks = nn.ModuleList(
            DiTBlock(width, config.num_heads, config.mlp_ratio, config.context_dim, config.attention)
            for _ in range(config.depth)
        )
        self.final = FinalLayer(width, patch, config.output_channels)
        self._sincos_cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}
        self._initialise()

    def _initialise(self) -> None:
        # DiT's initialisation: xavier-uniform linears (the patch convolution as the linear map it is), N(0, 0.02)
        # time MLP, then adaLN-Zero: every modulation and the final projection zero, so each block is the identity
        # and the output is 0. The self-attention's output projection must NOT stay zero (layers.Attention zeroes
        # it): with its gate also zero, neither would get a gradient. The ungated cross-attention's output stays 0.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        conv = self.patch_embed.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zeroed = [self.final.modulation[-1], self.final.linear]
        for block in self.blocks:
            zeroed.append(block.modulation[-1])
            if block.cross_attn is not None:
                zeroed.append(block.cross_attn.out)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _position_embedding(self, rows: int, cols: int, x: torch.Tensor) -> torch.Tensor:
        if self.position is not None:
            grid = self.config.input_size // self.config.patch_size
            if (rows, cols) != (grid, grid):
                raise ValueError(
                    f"a learned position embedding is made for {self.config.input_size}² inputs; got "
                    f"{rows * self.config.patch_size}x{cols * self.config.patch_size} (use position_embedding='sincos')"
                )
            return self.position
        key = (rows, cols, x.device, x.dtype)
        if key not in self._sincos_cache:
            table = sincos_position_embedding(rows, cols, self.config.width)
            self._sincos_cache[key] = table.to(device=x.device, dtype=x.dtype)[None]
        return self._sincos_cache[key]

    def unpatchify(self, tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[N, rows*cols, p*p*C] -> [N, C, rows*p, cols*p]."""
        p, channels = self.config.patch_size, self.config.output_channels
        patches = tokens.reshape(tokens.shape[0], rows, cols, p, p, channels)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], channels, rows * p, cols * p)

    def _run_block(self, block: DiTBlock, x, c, context, context_mask) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute the block's activations in backward: memory of one block instead of depth blocks.
            return checkpoint(block, x, c, context, context_mask, use_reentrant=False)
        return block(x, c, context, context_mask)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be divisible by patch_size {p}")
        rows, cols = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.patch_embed(x)
        tokens = tokens + self._position_embedding(rows, cols, tokens)
        c = self.time_embed(t.expand(x.shape[0]) if t.ndim == 0 else t)
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("this DiT was built with cond_dim > 0 but got no cond embedding")
            c = c + self.cond_proj(cond)
        c = c.to(tokens.dtype)
        for block in self.blocks:
            tokens = self._run_block(block, tokens, c, context, context_mask)
        return self.unpatchify(self.final(tokens, c), rows, cols)


def dit_forward_flops(
    config: DiTConfig | dict[str, Any], height: int, width: int, context_length: int = 0, batch: int = 1
) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass, as torch.utils.flop_counter counts them: linears, the
    patch convolution and the attention products QK^T and AV; norms, activations and the sinusoids are not counted.
    A training step (forward + backward) is about 3x this."""
    config = DiTConfig.coerce(config)
    d, p = config.width, config.patch_size
    tokens = (height // p) * (width // p)
    hidden = int(d * config.mlp_ratio)
    per_sample = tokens * config.in_channels * p * p * d  # patch embedding
    per_sample += TIME_FREQUENCIES * d + d * d + config.cond_dim * d  # time MLP, cond projection
    block = 6 * d * d  # adaLN
    block += tokens * (4 * d * d) + 2 * tokens * tokens * d  # q, k, v, out projections; QK^T and AV
    block += tokens * 2 * d * hidden  # MLP
    if config.context_dim:
        block += tokens * 2 * d * d + context_length * 2 * config.context_dim * d  # q, out; k, v of the context
        block += 2 * tokens * context_length * d  # QK^T and AV
    per_sample += config.depth * block
    per_sample += 2 * d * d + tokens * d * p * p * config.output_channels  # final adaLN and projection
    return 2 * batch * per_sample
