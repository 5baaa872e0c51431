"""The one generation loop: `n` images from a model's `sample()`, in batches, with prompts cycled for text-to-image
models. The sample grid, the evaluators and `gen-lightning sample` all draw through it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from gen_lightning.evaluation.reference import cycled
from gen_lightning.progress import progress


def generate(
    model: Any,
    n: int,
    prompts: list[str] | None = None,
    *,
    batch_size: int = 64,
    steps: int | None = None,
    guidance: float | None = None,
    sampler: Any = None,
    generator: torch.Generator | None = None,
    desc: str | None = "generating",
    rank: int | None = None,
) -> Iterator[tuple[torch.Tensor, list[str] | None]]:
    """Yields (images [b, C, H, W] in [-1, 1], their prompts or None) until `n` images are drawn. Sampling settings
    left None are the model's defaults. `desc`: the progress line's label (None: no progress shown)."""
    with progress(total=n, desc=desc or "", unit="images", rank=rank, leave=False, disable=desc is None) as bar:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            batch_prompts = cycled(prompts, start, count) if prompts else None
            options = {"steps": steps, "guidance": guidance, "sampler": sampler, "generator": generator}
            yield model.sample(count, batch_prompts, **options), batch_prompts
            bar.update(count)


def resolved_settings(model: Any, **requested: Any) -> dict[str, Any]:
    """The sampling settings as used, for reports: each requested one, or the model's default where it is None."""
    return {**model.sampling_defaults(), **{name: value for name, value in requested.items() if value is not None}}
