"""Retrieval and zero-shot classification scores for a CLIP model's features (pure torch)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def same_caption(captions: Sequence[str]) -> torch.Tensor:
    """relevant[i, j]: caption j is the same text as caption i (so image j is a right answer for text i)."""
    index = {caption: i for i, caption in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[caption] for caption in captions])
    return ids[:, None] == ids[None, :]


def recall_at_k(
    similarity: torch.Tensor, relevant: torch.Tensor | None = None, ks: Iterable[int] = (1, 5, 10)
) -> dict[int, float]:
    """similarity[i, j] between query i and candidate j; relevant[i, j] marks right answers (default: j == i).

    Recall@k: the fraction of queries with a right answer among the k best candidates. A wrong candidate that ties
    the best right one counts as ranked above it, so a constant model scores 0, not 1.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"recall_at_k needs a square similarity matrix, got {tuple(similarity.shape)}")
    if relevant is None:
        relevant = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    best_right = similarity.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)
    wrong_above = ((similarity >= best_right) & ~relevant).sum(dim=1)
    return {k: float((wrong_above < k).float().mean()) for k in ks}


def zero_shot_accuracy(
    image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """(top-1 accuracy, chance) of classifying each image as the class whose text feature is most similar."""
    predictions = (image_features @ class_features.T).argmax(dim=1)
    return float((predictions == labels).float().mean()), 1.0 / class_features.shape[0]
