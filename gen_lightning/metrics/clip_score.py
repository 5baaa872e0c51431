"""CLIP score (Hessel et al. 2021): 100 · max(cos(f(image), g(caption)), 0) per pair, averaged. (torchmetrics'
CLIPScore clamps the average instead; the two differ only when some pairs' cosines are negative.)

The metric runs over any image/text encoder pair that implements `TextImageEncoder` (the project's CLIP model is
meant to; a local Hugging Face CLIP directory can be wrapped the same way). Captions longer than the text encoder's
context are truncated explicitly, and the metric says so once (how many, and an example) instead of scoring a
silently different caption: long captions otherwise lose their tail without anyone noticing.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from gen_lightning.nn.text import TruncationCounter


@runtime_checkable
class TextImageEncoder(Protocol):
    """An image tower and a text tower mapping into one embedding space."""

    context_length: int

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (token ids [N, context_length], truncated to the context; token count before truncation [N])."""
        ...

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """float [-1, 1] NCHW -> [N, D]."""
        ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [N, context_length] -> [N, D]."""
        ...


class CLIPScore(Metric):
    """Mean CLIP score of (image, caption) pairs; states are sums, so it syncs across ranks like any torchmetric."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, encoder: TextImageEncoder, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(encoder, TextImageEncoder):
            raise TypeError(f"{type(encoder).__name__} does not implement TextImageEncoder (see metrics.clip_score)")
        self.__dict__["encoder"] = encoder  # not a state and not a submodule: never synced nor checkpointed
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_pairs", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.truncation = TruncationCounter("CLIP score")

    def update(self, images: torch.Tensor, captions: list[str]) -> None:
        if len(captions) != images.shape[0]:
            raise ValueError(f"CLIPScore got {images.shape[0]} images but {len(captions)} captions")
        tokens, lengths = self.encoder.tokenize(list(captions))
        self.truncation.update(list(captions), lengths, self.encoder.context_length)
        with torch.no_grad():
            image_features = F.normalize(self.encoder.encode_image(images).float(), dim=-1)
            text_features = F.normalize(self.encoder.encode_text(tokens.to(images.device)).float(), dim=-1)
        cosine = (image_features * text_features).sum(dim=-1)
        self.score_sum += (100.0 * cosine.clamp(min=0)).double().sum()
        self.num_pairs += cosine.shape[0]

    def compute(self) -> torch.Tensor:
        if self.num_pairs == 0:
            raise RuntimeError("CLIPScore.compute() before any update")
        return (self.score_sum / self.num_pairs).float()
