"""CLIP's network (Radford et al. 2021), pure torch: a ViT image tower and a causal byte-level text tower, each
projected into one embedding space, and the learnable temperature. Implements metrics.clip_score.TextImageEncoder
(tokenize / encode_image / encode_text), so a trained one scores prompt adherence; its `text` tower conditions latent
diffusion."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gen_lightning.nn.text import TextConfig, TextEncoder
from gen_lightning.nn.vision import VisionConfig, VisionTransformer


class CLIPNet(nn.Module):
    """forward(images, tokens) -> (image, text) embeddings, L2-normalised; `logit_scale` is the log inverse
    temperature the contrastive loss multiplies the similarities by."""

    def __init__(
        self,
        vision: VisionConfig | dict[str, Any],
        text: TextConfig | dict[str, Any],
        embed_dim: int,
        init_logit_scale: float,
    ) -> None:
        super().__init__()
        vision, text = VisionConfig.coerce(vision), TextConfig.coerce(text)
        self.visual = VisionTransformer(vision)
        self.visual_projection = nn.Linear(vision.width, embed_dim, bias=False)
        self.text = TextEncoder(text)
        self.text_projection = nn.Linear(text.width, embed_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=vision.width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=text.width**-0.5)
        # One element, not a 0-dim tensor: DeepSpeed's engine broadcasts each parameter viewed as bytes, which a 0-dim
        # tensor cannot be. Being this module's own parameter, it comes first in parameters(), as it did when it
        # belonged to CLIPModel (checkpoint format 1): the optimizer state of old checkpoints stays in order.
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text.tokenize(texts)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """float [-1, 1] NCHW (any size) -> unnormalised embeddings [N, embed_dim]."""
        return self.visual_projection(self.visual(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [N, context_length] -> unnormalised embeddings [N, embed_dim]."""
        return self.text_projection(TextEncoder.pool(tokens, self.text(tokens)))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.encode_image(images), dim=-1), F.normalize(self.encode_text(tokens), dim=-1)
