"""CLIPScore over a small real encoder pair (byte tokenizer + conv image tower + embedding text tower)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gen_lightning.metrics.clip_score import CLIPScore


class ByteCLIP(nn.Module):
    """UTF-8 byte tokens (context 8, 0 = padding), a conv image tower and a mean-pooled text tower, width 16."""

    context_length = 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.text = nn.EmbeddingBag(257, 16, mode="mean", padding_idx=0)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [list(t.encode("utf-8")) for t in texts]
        tokens = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, ids in zip(tokens, encoded, strict=True):
            kept = [i + 1 for i in ids[: self.context_length]]
            row[: len(kept)] = torch.tensor(kept)
        return tokens, torch.tensor([len(ids) for ids in encoded])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)


def test_score_is_100_times_clamped_cosine():
    encoder = ByteCLIP()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    captions = ["red", "blue", "a cat"]
    metric = CLIPScore(encoder)
    metric.update(images, captions)
    with torch.no_grad():
        cosine = F.cosine_similarity(encoder.encode_image(images), encoder.encode_text(encoder.tokenize(captions)[0]))
    expected = (100 * cosine.clamp(min=0)).mean()
    torch.testing.assert_close(metric.compute(), expected)


def test_long_captions_are_truncated_explicitly_and_warned_once(caplog):
    encoder = ByteCLIP()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    metric = CLIPScore(encoder)
    with caplog.at_level(logging.WARNING, logger="gen_lightning"):
        metric.update(images, ["woman pilot medium-dark skin tone", "red"])
        metric.update(images, ["another caption far over eight bytes", "blue"])
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "8-token context" in warnings[0].getMessage()
    assert metric.truncation.count == 2
    # the long caption is scored exactly as its first 8 bytes: truncation, not something else
    alone, truncated = CLIPScore(encoder), CLIPScore(encoder)
    alone.update(images[:1], ["woman pilot medium-dark skin tone"])
    truncated.update(images[:1], ["woman pi"])
    torch.testing.assert_close(alone.compute(), truncated.compute())


def test_rejects_what_is_not_an_encoder_pair_and_mismatched_batches():
    with pytest.raises(TypeError, match="TextImageEncoder"):
        CLIPScore(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        CLIPScore(ByteCLIP()).update(torch.zeros(2, 3, 8, 8), ["one"])
