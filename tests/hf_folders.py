"""Tiny random Hugging Face folders, built offline inside a test and written by save_pretrained: an AutoencoderKL,
a CLIPTextModel with a lower-case-letters BPE tokenizer (Stable Diffusion's tokenizer/ layout), and a pipeline root
holding both (vae/, text_encoder/, tokenizer/, model_index.json). Each is well under 1 MB."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CONTEXT = 16


def tiny_clip_tokenizer(folder: Path) -> Path:
    """vocab.json, merges.txt and tokenizer_config.json as SD 1.x ships them (pads with EOS, lower-cases)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(LETTERS)}
    vocab |= {c + "</w>": i + len(LETTERS) for i, c in enumerate(LETTERS)}
    vocab |= {"re": len(vocab), "red</w>": len(vocab) + 1, "<|startoftext|>": len(vocab) + 2}
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    config = {"model_max_length": CONTEXT, "tokenizer_class": "CLIPTokenizer", "pad_token": "<|endoftext|>",
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "do_lower_case": True}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_clip_text(folder: Path, layers: int = 3, width: int = 32) -> Path:
    import transformers

    vocab = json.loads((tiny_clip_tokenizer(folder.parent / "tokenizer") / "vocab.json").read_text())
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=CONTEXT, projection_dim=16,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(str(folder))
    return folder


def tiny_autoencoder_kl(
    folder: Path, *, quant_conv: bool = True, scaling_factor: float = 0.5, shift_factor: float | None = None
) -> Path:
    """SD-like (quant convs, no shift) by default; quant_conv=False with a shift is the SD3/FLUX layout."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=32,
        sample_size=16, scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )  # fmt: skip
    with torch.no_grad():  # non-zero q/k/v biases, as SD's VAE has: ours could not hold them
        for name, p in model.named_parameters():
            if name.endswith(("to_q.bias", "to_k.bias", "to_v.bias")):
                p.normal_(0, 0.1)
    model.save_pretrained(str(folder))
    return folder


def sd_pipeline_root(root: Path) -> Path:
    """A Stable Diffusion pipeline's layout, with only the parts latent diffusion reads."""
    tiny_autoencoder_kl(root / "vae")
    tiny_clip_text(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


@pytest.fixture
def offline(monkeypatch):
    """Loading must need no network: the hub is told so, and any internet socket connection fails the test (local
    Unix sockets, W&B's offline service, stay allowed)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    connect = socket.socket.connect

    def refuse_internet(sock, address, *args, **kwargs):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return connect(sock, address, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse_internet)
    monkeypatch.setattr(socket, "create_connection", refuse)
