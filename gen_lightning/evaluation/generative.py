"""Evaluation of an image generator: generate -> FID Inception features -> FID / KID against the reference, and the
CLIP score of text-to-image samples against their prompts."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from gen_lightning.distributed import rank_count
from gen_lightning.evaluation.encoders import clip_score_for
from gen_lightning.evaluation.generate import generate, resolved_settings
from gen_lightning.evaluation.reference import FIDAgainstReference, Reference, val_captions
from gen_lightning.metrics.clip_score import CLIPScore


class GenerativeEvaluator:
    """FID / KID (+ CLIP score) of `num_samples` images over all ranks, each rank generating its share. Text-to-image
    models are prompted with the reference's captions (this rank's share, cycled), so both sides show the same
    subjects.

    Args:
        kid / weights / cache_dir / max_real: the FID set-up (evaluation.reference.FIDAgainstReference).
        clip: the CLIP that scores prompt adherence: a gen_lightning CLIP checkpoint or a local Hugging Face CLIP
            directory (evaluation.encoders); None skips the score with one log line. `clip_option` names the
            setting in that line.
        batch_size: images generated at once.
        steps / guidance / sampler: sampling settings (None: the model's defaults).
    """

    def __init__(
        self,
        *,
        kid: bool = True,
        weights: str | None = None,
        cache_dir: str | None = None,
        max_real: int | None = None,
        clip: str | None = None,
        clip_option: str = "--clip",
        batch_size: int = 64,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
    ) -> None:
        self.fid = FIDAgainstReference(kid=kid, weights=weights, cache_dir=cache_dir, max_real=max_real)
        self.clip, self.clip_option = clip, clip_option
        self.batch_size = batch_size
        self.sampling: dict[str, Any] = {"steps": steps, "guidance": guidance, "sampler": sampler}
        self.clip_score: CLIPScore | None = None
        self.prompts: list[str] | None = None

    def setup(self, model: Any) -> None:
        """Metrics on the model's device, and the CLIP score when the model takes prompts."""
        self.fid.to(model.device)
        self.clip_score = clip_score_for(model, self.clip, self.clip_option)

    @torch.no_grad()
    def __call__(
        self,
        model: Any,
        reference: Reference,
        num_samples: int,
        generator: torch.Generator,
        rank: int = 0,
        world: int = 1,
    ) -> tuple[dict[str, float], dict[str, Image.Image]]:
        """fid, kid, kid_std (and clip_score), the same on every rank, beside fid_floor, kid_floor, kid_std_floor (real
        training images in place of samples, when the reference knows training shards); no images to show. The
        reference statistics, the floor and a text-to-image model's prompts are read at the first call."""
        self.fid.load_reference(reference, rank, world)
        floor = self.fid.floor(reference, num_samples, rank, world)  # the metric's floor at this count
        if self.prompts is None and model.kind == "text-to-image":
            self.prompts = val_captions(reference.batches())
        share = rank_count(num_samples, world, rank)
        for images, prompts in generate(
            model, share, self.prompts, batch_size=self.batch_size, generator=generator, rank=rank, **self.sampling
        ):
            self.fid.update(images)
            if self.clip_score is not None and prompts is not None:
                self.clip_score.update(images, prompts)
        results = {**self.fid.compute(), **floor}  # states summed over ranks
        if self.clip_score is not None and self.prompts is not None:
            results["clip_score"] = float(self.clip_score.compute())
            self.clip_score.reset()
        return results, {}

    def report(self, model: Any) -> dict[str, Any]:
        """What the numbers were measured with (the settings resolved to the model's defaults)."""
        clip = {"clip": self.clip} if self.clip_score is not None else {}
        return {**self.fid.report(), **clip, **resolved_settings(model, **self.sampling)}
