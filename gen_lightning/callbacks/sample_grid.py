"""Log a grid of samples every N optimizer steps (and at the end of training) through the Trainer's loggers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from gen_lightning.callbacks.periodic import PeriodicSampling
from gen_lightning.evaluation.generate import generate
from gen_lightning.images import make_grid, publish_image


class SampleGrid(PeriodicSampling):
    """Every rank draws its share of `num_samples` with a fixed seed (so grids are comparable across steps and no rank
    idles at a collective), rank 0 gathers them, writes `<root>/samples/step_XXXXXXX.png` and logs `samples/grid`.
    Arguments: see PeriodicSampling."""

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 64,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps, num_samples, sampler, steps, guidance, seed)
        self.last_grid_path: Path | None = None

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        num_samples = min(self.num_samples, 4) if trainer.fast_dev_run else self.num_samples
        share = self.share(trainer, num_samples)
        drawn = generate(
            pl_module, share, batch_size=share, steps=self.sampling_steps(trainer), guidance=self.guidance,
            sampler=self.sampler, generator=self.generator(trainer, pl_module), desc=None,
        )  # fmt: skip
        images = torch.cat([batch for batch, _ in drawn])
        if trainer.world_size > 1:
            images = pl_module.all_gather(images).flatten(0, 1)
        if trainer.is_global_zero:
            grid = make_grid(images[:num_samples].float())
            path = f"samples/step_{trainer.global_step:07d}.png"
            self.last_grid_path = publish_image(trainer, "samples/grid", grid, path)
