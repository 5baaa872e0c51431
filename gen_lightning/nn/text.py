"""Text encoding without downloads: a byte-level tokenizer (nothing to ship but this file) and a CLIP-style causal
text transformer. The same `TextEncoder` is CLIP's text tower and latent diffusion's trainable text encoder.

Why bytes: any caption in any script tokenizes, no vocabulary file has to be downloaded or versioned, and emoji-scale
captions ("woman pilot medium-dark skin tone") fit a 64-byte context. The price is longer sequences than BPE.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass

import torch
from torch import nn

from gen_lightning.nn.config import NetConfig
from gen_lightning.nn.transformer import Transformer

log = logging.getLogger(__name__)

PAD, SOT, EOT = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


def normalize_caption(text: str) -> str:
    """NFC, lower case, single spaces (CLIP's tokenizer lower-cases and collapses whitespace too)."""
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


class ByteTokenizer:
    """Caption -> [SOT, utf-8 bytes..., EOT, PAD...] of exactly `context_length` ids.

    A caption that does not fit is cut explicitly: its bytes are truncated and EOT stays the last id (as open_clip
    does), and `__call__` also returns each caption's length before the cut so callers can count and warn.
    """

    def __init__(self, context_length: int) -> None:
        if context_length < 3:
            raise ValueError(f"context_length={context_length}: need room for SOT, one byte and EOT")
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        lengths = torch.empty(len(texts), dtype=torch.long)
        for row, text in enumerate(texts):
            data = [b + BYTE_OFFSET for b in normalize_caption(text).encode("utf-8")]
            lengths[row] = len(data) + 2
            data = [SOT, *data[: self.context_length - 2], EOT]
            ids[row, : len(data)] = torch.tensor(data)
        return ids, lengths

    def decode(self, ids: torch.Tensor) -> str:
        data = bytes(int(i) - BYTE_OFFSET for i in ids.tolist() if int(i) >= BYTE_OFFSET)
        return data.decode("utf-8", errors="replace")


@dataclass
class TextConfig(NetConfig):
    context_length: int = 64
    width: int = 256
    layers: int = 4
    heads: int = 4


class TextEncoder(nn.Module):
    """Token ids [N, L] -> hidden states [N, L, width] (final LayerNorm applied); `pool()` takes the EOT state."""

    def __init__(self, config: TextConfig | dict) -> None:
        super().__init__()
        self.config = config = TextConfig.coerce(config)
        self.tokenizer = ByteTokenizer(config.context_length)
        self.token_embedding = nn.Embedding(VOCAB_SIZE, config.width)
        self.positional_embedding = nn.Parameter(torch.randn(config.context_length, config.width) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.transformer = Transformer(config.width, config.layers, config.heads)
        self.ln_final = nn.LayerNorm(config.width)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    @property
    def width(self) -> int:
        return self.config.width

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(texts)

    def forward(self, ids: torch.Tensor, with_pooled: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [N, L, width]; with_pooled: (hidden states, pooled state [N, width]), what any text tower of
        latent diffusion gives (interop.clip_text.CLIPTextTower too). One call through forward, so that a wrapper
        (an FSDP unit gathering its weights) sees it."""
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        # Causal: the state at EOT summarises the caption, and padding after EOT cannot leak into real tokens.
        hidden = self.ln_final(self.transformer(x, causal=True))
        return (hidden, self.pool(ids, hidden)) if with_pooled else hidden

    @staticmethod
    def pool(ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden state at each row's EOT token, [N, width]."""
        eot = (ids == EOT).int().argmax(dim=1)
        return hidden[torch.arange(ids.shape[0], device=ids.device), eot]

    @staticmethod
    def padding_mask(ids: torch.Tensor) -> torch.Tensor:
        """True for real tokens (SOT..EOT): what cross-attention may attend to."""
        return ids != PAD


class TruncationCounter:
    """Counts captions cut to the context and warns once (how many, one example): a caption that silently loses its
    tail trains or scores a different text than the user wrote."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.count = 0
        self._warned = False

    def update(self, texts: list[str], lengths: torch.Tensor, context_length: int) -> None:
        over = lengths > context_length
        if not over.any():
            return
        self.count += int(over.sum())
        if not self._warned:
            self._warned = True
            log.warning(
                "%s: %d caption(s) longer than the text encoder's %d-token context were truncated (e.g. %r); "
                "warned once per run",
                self.where,
                int(over.sum()),
                context_length,
                texts[int(over.nonzero()[0])][:120],
            )
