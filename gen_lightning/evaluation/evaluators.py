"""The evaluator for a model, chosen by what the model declares itself to be (`model.kind`), never by probing it."""

from __future__ import annotations

from typing import Any

from gen_lightning.errors import UserInputError
from gen_lightning.evaluation.generative import GenerativeEvaluator
from gen_lightning.evaluation.world import WorldEvaluator


def evaluator_for(model: Any, **options: Any) -> GenerativeEvaluator | WorldEvaluator:
    """A world model's evaluator (one-step predictions, rollouts) or an image generator's (FID/KID/CLIP score),
    built with `options`."""
    if model.kind == "next-frame":
        return WorldEvaluator(**options)
    if model.kind in ("image", "text-to-image"):
        return GenerativeEvaluator(**options)
    raise UserInputError(f"{type(model).__name__} does not generate images: there is nothing to evaluate")
