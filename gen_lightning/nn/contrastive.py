"""CLIP's symmetric contrastive loss across ranks, after open_clip's `loss.py` (gather_features + ClipLoss).

Every rank sees the features of the global batch, so each image competes against all texts of all ranks (the number
of negatives, not the per-GPU batch, is what makes CLIP work).

- `gather_with_grad=True` (default): `torch.distributed.nn.all_gather` back-propagates into every rank's features.
  With DDP averaging the gradients, the step equals the single-process step on the concatenated batch, with or
  without `local_loss` (tests/test_clip.py checks loss and gradients on 2 processes).
- `gather_with_grad=False`: gathered copies carry no gradient; the rank's own slice is put back as the live local
  tensor. Cheaper, but the gradient is not the single-process one: without local_loss it is 1/world_size of it (AdamW
  is nearly scale-invariant, so this mostly acts on epsilon), with local_loss the terms of other ranks' rows are lost.
  open_clip documents the same: use --gather-with-grad with --local-loss for 1:1 equivalence.

`local_loss=True` computes only the rows of the rank's own samples against all gathered columns (O(n·N) instead of
O(N²) logits per rank); the labels are offset by rank·n.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor, gather_with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, D] per rank -> [world·n, D] in rank order (every rank must pass the same n)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_features, text_features
    if gather_with_grad:
        import torch.distributed.nn.functional as dist_nn

        return torch.cat(dist_nn.all_gather(image_features)), torch.cat(dist_nn.all_gather(text_features))
    rank = dist.get_rank()
    gathered = []
    for local in (image_features, text_features):
        parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.detach().contiguous())
        parts[rank] = local  # keep this rank's slice differentiable
        gathered.append(torch.cat(parts))
    return gathered[0], gathered[1]


class ClipLoss(nn.Module):
    """(CE(image→text) + CE(text→image)) / 2 over the (gathered) batch; features must be L2-normalised."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        all_images, all_texts = gather_features(image_features, text_features, self.gather_with_grad)
        n = image_features.shape[0]
        if self.local_loss and all_images.shape[0] > n:
            rank = dist.get_rank()
            logits_per_image = logit_scale * image_features @ all_texts.T
            logits_per_text = logit_scale * text_features @ all_images.T
            labels = torch.arange(n, device=image_features.device) + rank * n
        else:
            logits_per_image = logit_scale * all_images @ all_texts.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(all_images.shape[0], device=image_features.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
