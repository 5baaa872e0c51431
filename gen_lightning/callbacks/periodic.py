"""What the sampling callbacks share: run every N optimizer steps and once at the end of training, and draw this
rank's share of the samples with a per-rank seed through the model's `sample()`."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from gen_lightning.callbacks.requeue import requeue_pending


class PeriodicSampling(L.Callback):
    """Calls `run(trainer, pl_module)` every `every_n_steps` optimizer steps (0: only at the end of training), and at
    the end of training unless that step already ran. Subclasses implement `run`.

    Args:
        every_n_steps: optimizer steps between runs; 0 runs only at the end of training.
        num_samples: images per run, over all ranks.
        sampler / steps / guidance: sampling settings (None / 1.0: the model's defaults).
        seed: base seed; each rank offsets it by its rank, so ranks draw different images and runs are comparable.
    """

    def __init__(
        self,
        every_n_steps: int,
        num_samples: int,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.sampler = sampler
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self._last_step = -1

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if requeue_pending(trainer):  # SLURM kills the job in seconds: requeue first; the restarted job evaluates
            return
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.run(trainer, pl_module)

    def share(self, trainer: L.Trainer, num_samples: int | None = None) -> int:
        """This rank's number of samples; equal on all ranks (keeps all_gather shapes equal; extras are dropped)."""
        return -(-(num_samples or self.num_samples) // trainer.world_size)

    @staticmethod
    def rank_count(total: int, world: int, rank: int) -> int:
        """This rank's part of `total` items split as evenly as possible: the parts add up to `total` (a metric over
        N samples must see N, where `share` rounds up), and each rank has at least one."""
        base, extra = divmod(total, world)
        return max(1, base + (rank < extra))

    def draw(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        count: int,
        generator: torch.Generator,
        prompts: list[str] | None = None,
    ):
        """`count` images from the model's `sample()`; text-to-image models get `prompts` (None: their defaults)."""
        kwargs: dict[str, Any] = {"steps": self.steps, "sampler": self.sampler}
        if prompts is not None:
            kwargs["cond"] = prompts
        if self.guidance != 1.0:
            kwargs["guidance"] = self.guidance
        if trainer.fast_dev_run:  # a smoke test exercises the sampling path, not its cost
            kwargs["steps"] = 2
        return pl_module.sample(count, generator=generator, **kwargs)

    def generator(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Generator:
        return torch.Generator(device=pl_module.device).manual_seed(self.seed + trainer.global_rank)
