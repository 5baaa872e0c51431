"""Log a grid of samples every N optimizer steps (and at the end of training) through the Trainer's logger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from gen_lightning.images import make_grid, save_image_atomic


class SampleGrid(L.Callback):
    """Every rank draws its share of `num_samples` with a fixed seed (so grids are comparable across steps and no rank
    idles at a collective), rank 0 gathers them, writes `<root>/samples/step_XXXXXXX.png` and logs `samples/grid`.

    Args:
        every_n_steps: optimizer steps between grids; 0 logs only at the end of training.
        num_samples: images per grid (over all ranks).
        steps / sampler: sampling settings (None: the model's defaults).
        seed: base seed; each rank offsets it by its rank.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 64,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.steps = steps
        self.sampler = sampler
        self.guidance = guidance
        self.seed = seed
        self._last_logged_step = -1
        self.last_grid_path: Path | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_logged_step:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_logged_step:
            self.log_grid(trainer, pl_module)

    def _kwargs(self, pl_module: L.LightningModule) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"steps": self.steps, "sampler": self.sampler}
        if self.guidance != 1.0:
            kwargs["guidance"] = self.guidance
        return kwargs

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_logged_step = step = trainer.global_step
        world, rank = trainer.world_size, trainer.global_rank
        num_samples, kwargs = self.num_samples, self._kwargs(pl_module)
        if trainer.fast_dev_run:  # a smoke test exercises the sampling path, not its cost
            num_samples, kwargs["steps"] = min(num_samples, 4), 2
        share = -(-num_samples // world)  # equal shares keep all_gather shapes equal; extras are dropped
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + rank)
        images = pl_module.sample(share, generator=generator, **kwargs)
        if world > 1:
            images = pl_module.all_gather(images).flatten(0, 1)
        if trainer.is_global_zero:
            grid = make_grid(images[:num_samples].float())
            path = save_image_atomic(grid, Path(trainer.default_root_dir) / "samples" / f"step_{step:07d}.png")
            self.last_grid_path = path
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key="samples/grid", images=[grid], step=step, caption=[f"step {step}"])
