"""Latent diffusion's one network (pure torch): a UNet or a DiT (held as `unet`, the name its checkpoint keys keep)
conditioned on text through cross-attention (and, with
`pooled_text`, the caption's pooled state added to its time embedding), owning its text encoder and the caption
dropout that trains classifier-free guidance's unconditional branch (DiT's LabelEmbedder.token_drop).

    net(x_t, t, tokens=ids)                  training: captions dropped at random, encoded, then the UNet
    net(x_t, t, context=net.encode(ids))     sampling: the prompts and "" encoded once, before the sampler's steps
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gen_lightning.nn.dit import DiT
from gen_lightning.nn.unet import UNet

# (hidden states [N, L, D], mask [N, L] True = real token, pooled caption state [N, D] = the EOT token's)
TextContext = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TextConditionedUNet(nn.Module):
    """Owns no parameter of its own and registers the UNet before the text encoder: that is the parameter order of
    checkpoints written before this module existed (their optimizer state lines up).

    Args:
        unet: context_dim = the text encoder's width; cond_dim = the same with `pooled_text`, else 0.
        text: the text encoder (nn.text.TextEncoder, or any module with its tokenize / padding_mask /
            context_length / width and forward(ids, with_pooled=True) -> (hidden, pooled), e.g.
            interop.clip_text.CLIPTextTower); trainable, or a frozen tower (CLIP's) with `train_text=False`.
        pooled_text: add the caption's pooled state to the backbone's time embedding (the DiT's adaLN input).
        caption_dropout: in training mode, the probability that a caption is replaced by the empty one. The null
            conditioning is the encoding of "" (no learned null embedding).
    """

    def __init__(
        self,
        unet: UNet | DiT,
        text: nn.Module,
        *,
        pooled_text: bool,
        caption_dropout: float = 0.0,
        train_text: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout={caption_dropout}: expected a probability in [0, 1)")
        self.unet = unet
        self.text = text.requires_grad_(train_text)
        self.pooled_text, self.caption_dropout, self.train_text = pooled_text, caption_dropout, train_text

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, context_length], token counts before truncation [N]), on the CPU."""
        return self.text.tokenize(list(captions))

    def token_drop(self, tokens: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Rows replaced by the empty caption: where `drop` [N] is True, or (drop None) at random in training mode."""
        if drop is None:
            if not self.training or self.caption_dropout == 0:
                return tokens
            drop = torch.rand(tokens.shape[0], device=tokens.device) < self.caption_dropout
        null = self.tokenize([""])[0].to(tokens.device)
        return torch.where(drop[:, None].to(tokens.device), null, tokens)

    def encode(self, tokens: torch.Tensor) -> TextContext:
        # Only as many positions as the longest caption: the causal encoder's states of real tokens do not depend on
        # the padding after them, and cross-attention masks it anyway, so this changes no result and halves the text
        # work on short captions (emoji names average ~25 bytes of a 64-byte context).
        # (Hugging Face's CLIP text tower is causal too: interop.clip_text.)
        tokens = tokens[:, : int(self.text.padding_mask(tokens).sum(1).max())]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_text):
            hidden, pooled = self.text(tokens, with_pooled=True)
        return hidden, self.text.padding_mask(tokens), pooled

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        tokens: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        context: TextContext | None = None,
    ) -> torch.Tensor:
        if (tokens is None) == (context is None):
            raise ValueError("TextConditionedUNet takes caption tokens or an encoded context (exactly one of them)")
        if context is None:
            context = self.encode(self.token_drop(tokens, drop))
        hidden, mask, pooled = context
        return self.unet(x, t, hidden, mask, pooled if self.pooled_text else None)

    def train(self, mode: bool = True) -> TextConditionedUNet:
        super().train(mode)
        if not self.train_text:
            self.text.eval()  # a frozen tower keeps inference behaviour
        return self
