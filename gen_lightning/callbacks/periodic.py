"""What the sampling callbacks share: run every N optimizer steps and once at the end of training, with a per-rank
seed, and publish the numbers through the Trainer's loggers."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from gen_lightning.callbacks.requeue import requeue_pending
from gen_lightning.models.diffusion import DiffusionModel
from gen_lightning.sampler_names import ALL_SAMPLER_NAMES


class PeriodicSampling(L.Callback):
    """Calls `run(trainer, pl_module)` every `every_n_steps` optimizer steps (0: only at the end of training), and at
    the end of training unless that step already ran. Subclasses implement `run`.

    Args:
        every_n_steps: optimizer steps between runs; 0 runs only at the end of training.
        num_samples: images per run, over all ranks.
        sampler / steps / guidance: sampling settings (None: the model's defaults); sampler: one of
            ALL_SAMPLER_NAMES that fits the model's objective (checked when the fit starts).
        seed: base seed; each rank offsets it by its rank, so ranks draw different images and runs are comparable.
    """

    def __init__(
        self,
        every_n_steps: int,
        num_samples: int,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
    ) -> None:
        if sampler is not None and sampler not in ALL_SAMPLER_NAMES:
            raise ValueError(f"{type(self).__name__}: sampler={sampler!r}; valid: {', '.join(ALL_SAMPLER_NAMES)}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.sampler = sampler
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self._last_step = -1

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A sampler of another objective (ddim on a flow model) fails now, not at the first run hours later.
        if self.sampler is not None and isinstance(pl_module, DiffusionModel):
            pl_module.make_sampler(self.sampler)

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

    def sampling_steps(self, trainer: L.Trainer) -> int | None:
        """A smoke test (fast_dev_run) exercises the sampling path, not its cost."""
        return 2 if trainer.fast_dev_run else self.steps

    def share(self, trainer: L.Trainer, num_samples: int | None = None) -> int:
        """This rank's number of samples; equal on all ranks (keeps all_gather shapes equal; extras are dropped)."""
        return -(-(num_samples or self.num_samples) // trainer.world_size)

    def generator(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Generator:
        return torch.Generator(device=pl_module.device).manual_seed(self.seed + trainer.global_rank)

    @staticmethod
    def log_results(trainer: L.Trainer, results: dict[str, float]) -> None:
        """Rank 0 logs `val/<name>` through every logger (not self.log: Lightning forbids it in on_train_end)."""
        if trainer.is_global_zero:
            metrics = {f"val/{name}": value for name, value in results.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
