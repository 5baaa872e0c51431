"""Evaluation of generative models: generate -> features -> FID / KID / CLIP score against a cached reference, and the
world-model evaluator. The callbacks schedule it during training; `gen-lightning evaluate` runs the same code.

Every evaluator has one interface: `setup(model)`, then `evaluator(model, reference, num_samples, generator, rank,
world) -> (metrics, images)` as often as wanted, and `report(model)` (what the numbers were measured with).
"""

from __future__ import annotations

from typing import Any

from gen_lightning.errors import UserInputError
from gen_lightning.evaluation.generative import GenerativeEvaluator
from gen_lightning.evaluation.reference import Reference
from gen_lightning.evaluation.world import WorldEvaluator

__all__ = ["GenerativeEvaluator", "Reference", "WorldEvaluator", "evaluator_for"]


def evaluator_for(model: Any, **options: Any) -> GenerativeEvaluator | WorldEvaluator:
    """The evaluator for what `model` declares itself to be (`model.kind`), built with `options`."""
    if model.kind == "next-frame":
        return WorldEvaluator(**options)
    if model.kind in ("image", "text-to-image"):
        return GenerativeEvaluator(**options)
    raise UserInputError(f"{type(model).__name__} does not generate images: there is nothing to evaluate")
