"""Exact key maps between gen_lightning's networks and diffusers' (pure torch: diffusers is not imported here).

Our UNet is, op for op, diffusers' `UNet2DModel` with `resnet_time_scale_shift="scale_shift"` (AdaGN), a sinusoidal
time embedding with cos first, GroupNorm eps 1e-6 and one GroupNorm group count; our Autoencoder with
`downsample="ldm"` is `AutoencoderKL` without quant convs. The only parameters diffusers has and we lack are the
attention's q/k/v biases, written as zeros (ours have none); our fused `to_kv` is their `to_k` and `to_v` stacked.
What cannot be written that way (mixed group counts, several head widths, cross-attention, an extra conditioning
embedding) is reported by `unet_export_problem` / `autoencoder_export_problem` in words a user can act on.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from gen_lightning.nn.autoencoder import Autoencoder
from gen_lightning.nn.layers import Downsample, SpatialAttention, Upsample
from gen_lightning.nn.unet import ATTENTION, PLAIN, UNet

Prefixes = list[tuple[str, str]]  # (our prefix, their prefix), both ending in "."
_RESBLOCK = (("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"), ("norm2", "norm2"),
             ("conv2", "conv2"), ("skip", "conv_shortcut"))  # fmt: skip


def _resblock(ours: str, theirs: str) -> Prefixes:
    return [(f"{ours}{a}.", f"{theirs}{b}.") for a, b in _RESBLOCK]


class KeyMap:
    """Plain renames by prefix, plus attention layers (q/kv fused here, q/k/v with biases there)."""

    def __init__(self) -> None:
        self.renames: Prefixes = []
        self.attentions: Prefixes = []

    def to_diffusers(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        for ours, theirs in self.attentions:
            kv = state[f"{ours}self_attn.to_kv.weight"]
            k, v = kv.chunk(2, dim=0)
            out |= {f"{theirs}group_norm.weight": state[f"{ours}norm.weight"],
                    f"{theirs}group_norm.bias": state[f"{ours}norm.bias"],
                    f"{theirs}to_q.weight": state[f"{ours}self_attn.to_q.weight"],
                    f"{theirs}to_k.weight": k, f"{theirs}to_v.weight": v,
                    f"{theirs}to_out.0.weight": state[f"{ours}self_attn.out.weight"],
                    f"{theirs}to_out.0.bias": state[f"{ours}self_attn.out.bias"]}  # fmt: skip
            out |= {f"{theirs}{name}.bias": kv.new_zeros(k.shape[0]) for name in ("to_q", "to_k", "to_v")}
            used |= {key for key in state if key.startswith(ours)}
        for key, value in state.items():
            if key not in used:
                out[_rename(key, self.renames, "gen_lightning")] = value
        return out

    def from_diffusers(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        for ours, theirs in self.attentions:
            for name in ("to_q", "to_k", "to_v"):
                if state[f"{theirs}{name}.bias"].any():
                    raise ValueError(f"{theirs}{name}.bias is not zero: gen_lightning's attention has no q/k/v bias")
            out |= {f"{ours}norm.weight": state[f"{theirs}group_norm.weight"],
                    f"{ours}norm.bias": state[f"{theirs}group_norm.bias"],
                    f"{ours}self_attn.to_q.weight": state[f"{theirs}to_q.weight"],
                    f"{ours}self_attn.to_kv.weight": torch.cat([state[f"{theirs}to_k.weight"],
                                                                state[f"{theirs}to_v.weight"]]),
                    f"{ours}self_attn.out.weight": state[f"{theirs}to_out.0.weight"],
                    f"{ours}self_attn.out.bias": state[f"{theirs}to_out.0.bias"]}  # fmt: skip
            used |= {key for key in state if key.startswith(theirs)}
        inverse = [(theirs, ours) for ours, theirs in self.renames]
        for key, value in state.items():
            if key not in used:
                out[_rename(key, inverse, "diffusers")] = value
        return out


def _rename(key: str, prefixes: Prefixes, side: str) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(f"{side} key {key!r} has no counterpart in the other layout")


def group_count(network: nn.Module) -> int | None:
    """The one GroupNorm group count of `network` (diffusers' norm_num_groups), or None when it uses several."""
    counts = {m.num_groups for m in network.modules() if isinstance(m, nn.GroupNorm)}
    return counts.pop() if len(counts) == 1 else None


def _group_problem(network: nn.Module, what: str) -> str | None:
    counts = sorted({m.num_groups for m in network.modules() if isinstance(m, nn.GroupNorm)})
    if len(counts) == 1:
        return None
    return (
        f"this {what} cannot be written as a diffusers {'UNet2DModel' if what == 'UNet' else 'AutoencoderKL'}: its "
        f"GroupNorm layers use {' and '.join(map(str, counts))} groups (gen_lightning takes gcd(width, 32) per layer), "
        "diffusers one count for all; widths that are multiples of 32 map exactly. Use --format safetensors"
    )


# --- UNet <-> UNet2DModel ---------------------------------------------------------------------------------------------
def unet_export_problem(unet: UNet) -> str | None:
    """Why `unet` has no exact UNet2DModel counterpart, or None."""
    config = unet.config
    if config.context_dim or config.cond_dim:
        return "this UNet takes a context or a conditioning embedding, for which UNet2DModel has no input"
    if config.patch_size > 1:
        return (
            f"this UNet folds {config.patch_size}×{config.patch_size} pixel patches into channels (unet.patch_size), "
            "which UNet2DModel does not do. Use --format safetensors"
        )
    if problem := _group_problem(unet, "UNet"):
        return problem
    attention = [m for m in unet.modules() if isinstance(m, SpatialAttention)]
    head_widths = sorted({m.self_attn.to_q.in_features // m.self_attn.heads for m in attention})
    if len(head_widths) > 1:
        widths = sorted({m.self_attn.to_q.in_features for m in attention})
        return (
            f"this UNet cannot be written as a diffusers UNet2DModel: its attention layers are "
            f"{' and '.join(map(str, widths))} wide with {config.num_heads} heads each (heads of "
            f"{' and '.join(map(str, head_widths))}), and UNet2DModel uses one head width everywhere. "
            "Use --format safetensors"
        )
    return None


def unet2d_config(unet: UNet, sample_size: int) -> dict:
    """The UNet2DModel(**config) that computes what `unet` does (unet_export_problem(unet) must be None)."""
    config = unet.config
    levels = range(len(config.channels))
    groups = group_count(unet)
    return {
        "sample_size": sample_size, "in_channels": config.in_channels, "out_channels": config.out_channels,
        "block_out_channels": list(config.channels), "layers_per_block": config.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if lvl in config.attention_levels else "DownBlock2D" for lvl in levels],
        "up_block_types": ["AttnUpBlock2D" if lvl in config.attention_levels else "UpBlock2D"
                           for lvl in reversed(levels)],
        "attention_head_dim": config.channels[-1] // config.num_heads, "norm_num_groups": groups,
        "attn_norm_num_groups": groups, "norm_eps": 1e-6, "resnet_time_scale_shift": "scale_shift",
        "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "add_attention": True,
        "dropout": config.dropout, "act_fn": "silu", "time_embedding_type": "positional",
    }  # fmt: skip


def unet_key_map(unet: UNet) -> KeyMap:
    """Walks the UNet's blocks in the order UNet.__init__ builds them."""
    config, key_map = unet.config, KeyMap()
    key_map.renames += [("stem.", "conv_in."), ("time_mlp.0.", "time_embedding.linear_1."),
                        ("time_mlp.2.", "time_embedding.linear_2."), ("out_norm.", "conv_norm_out."),
                        ("out_conv.", "conv_out.")]  # fmt: skip

    def blocks(ours: str, modules: nn.ModuleList, per_level: int, theirs: str) -> None:
        index = 0
        for position in range(len(config.channels)):  # diffusers numbers up blocks from the innermost level
            for j in range(per_level):
                key_map.renames += _resblock(f"{ours}.{index}.0.", f"{theirs}.{position}.resnets.{j}.")
                if ATTENTION in modules[index].kinds:
                    key_map.attentions.append((f"{ours}.{index}.1.", f"{theirs}.{position}.attentions.{j}."))
                index += 1
            if index < len(modules) and modules[index].kinds == (PLAIN,):  # a Downsample / Upsample
                sampler = "downsamplers" if ours == "down" else "upsamplers"
                key_map.renames.append((f"{ours}.{index}.0.conv.", f"{theirs}.{position}.{sampler}.0.conv."))
                index += 1

    blocks("down", unet.down, config.num_res_blocks, "down_blocks")
    key_map.renames += _resblock("mid.0.", "mid_block.resnets.0.") + _resblock("mid.2.", "mid_block.resnets.1.")
    key_map.attentions.append(("mid.1.", "mid_block.attentions.0."))
    blocks("up", unet.up, config.num_res_blocks + 1, "up_blocks")
    return key_map


# --- Autoencoder <-> AutoencoderKL ------------------------------------------------------------------------------------
def autoencoder_export_problem(autoencoder: Autoencoder) -> str | None:
    """Why `autoencoder` has no exact AutoencoderKL counterpart, or None."""
    config = autoencoder.config
    if config.downsample != "ldm":
        return (
            "this VAE downsamples with padding on all sides (autoencoder.downsample='same', gen_lightning's VAEs "
            "before format 3), and diffusers' AutoencoderKL pads right and bottom only, so its encoder would compute "
            "something else. Use --format safetensors, or retrain with autoencoder.downsample='ldm' (the default now)"
        )
    if config.mid_attention and config.num_heads != 1:
        return (
            f"this VAE's mid-block attention has {config.num_heads} heads; AutoencoderKL's has one. "
            "Use --format safetensors"
        )
    return _group_problem(autoencoder, "VAE")


def autoencoder_kl_config(autoencoder: Autoencoder, sample_size: int, scaling_factor: float) -> dict:
    """The AutoencoderKL(**config) that computes what `autoencoder` does (no quant convs: ours has none)."""
    config = autoencoder.config
    levels = len(config.channels)
    return {
        "in_channels": config.in_channels, "out_channels": config.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(config.channels), "layers_per_block": config.num_res_blocks,
        "latent_channels": config.latent_channels, "norm_num_groups": group_count(autoencoder),
        "sample_size": sample_size, "scaling_factor": scaling_factor, "shift_factor": None, "force_upcast": True,
        "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": config.mid_attention,
        "act_fn": "silu",
    }  # fmt: skip


def autoencoder_key_map(autoencoder: Autoencoder) -> KeyMap:
    config, key_map = autoencoder.config, KeyMap()
    for side in ("encoder", "decoder"):
        key_map.renames += [(f"{side}.conv_in.", f"{side}.conv_in."), (f"{side}.out.0.", f"{side}.conv_norm_out."),
                            (f"{side}.out.2.", f"{side}.conv_out.")]  # fmt: skip
        last = 2 if config.mid_attention else 1
        key_map.renames += _resblock(f"{side}.mid.0.", f"{side}.mid_block.resnets.0.")
        key_map.renames += _resblock(f"{side}.mid.{last}.", f"{side}.mid_block.resnets.1.")
        if config.mid_attention:
            key_map.attentions.append((f"{side}.mid.1.", f"{side}.mid_block.attentions.0."))
    for side, modules, per_level, blocks, sampler in (
        ("encoder.down", autoencoder.encoder.down, config.num_res_blocks, "encoder.down_blocks", "downsamplers"),
        ("decoder.up", autoencoder.decoder.up, config.num_res_blocks + 1, "decoder.up_blocks", "upsamplers"),
    ):
        index = 0
        for position in range(len(config.channels)):
            for j in range(per_level):
                key_map.renames += _resblock(f"{side}.{index}.", f"{blocks}.{position}.resnets.{j}.")
                index += 1
            if index < len(modules) and isinstance(modules[index], Downsample | Upsample):
                key_map.renames.append((f"{side}.{index}.conv.", f"{blocks}.{position}.{sampler}.0.conv."))
                index += 1
    return key_map
