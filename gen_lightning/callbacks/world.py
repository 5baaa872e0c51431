"""World-model evaluation during training: one-step metrics, FID and 16-step rollouts on held-out episodes, logged
with side-by-side strips."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image

from gen_lightning.callbacks.evaluation import default_cache_dir, fill_val_reference
from gen_lightning.callbacks.periodic import PeriodicSampling
from gen_lightning.images import make_grid, publish_image
from gen_lightning.metrics.world import WorldMetrics, episodes_from
from gen_lightning.progress import progress


class WorldModelEvaluation(PeriodicSampling):
    """Every `every_n_steps` optimizer steps (0: only at the end of training), on the validation shards (held-out
    episodes, each rank its share): predict the next frame of `num_samples` val samples (over all ranks) and score
    PSNR / SSIM / cursor accuracy against the real next frame (and the copy-last-frame baseline), FID of predicted vs
    real frames when `fid`, and roll `rollouts` episodes out for `rollout_steps` steps from their first context,
    feeding the model its own frames (PSNR per step). Logs `val/<metric>` and the images `world/one_step` (rows:
    context frames, real next, predicted) and `world/rollout` (per episode a row of real frames above a row of
    predicted ones), also written to `<root>/world/`.

    Args:
        steps / sampler / seed: sampling settings (None: the model's defaults).
        batch_size: val samples predicted at once.
        strips: rows in the one-step image.
        fid / weights / cache_dir / max_real: FID against the val frames' cached statistics (see GenerativeEvaluation).
        cursor_tolerance: pixels between predicted and real cursor that still count as a hit.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        num_samples: int = 256,
        rollouts: int = 4,
        rollout_steps: int = 16,
        sampler: str | None = None,
        steps: int | None = None,
        batch_size: int = 64,
        strips: int = 8,
        fid: bool = True,
        weights: str | None = None,
        cache_dir: str | None = None,
        max_real: int | None = None,
        cursor_tolerance: float = 2.0,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps, num_samples, sampler, steps, 1.0, seed)
        self.rollouts = rollouts
        self.rollout_steps = rollout_steps
        self.batch_size = batch_size
        self.strips = strips
        self.fid = fid
        self.weights = weights
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.max_real = max_real
        self.metrics = WorldMetrics(rollout_steps, cursor_tolerance)
        self.generative = None
        self._reference_ready = False
        self.last_results: dict[str, float] = {}
        self.last_images: dict[str, Path] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "predict_next"):
            raise TypeError(f"WorldModelEvaluation needs a WorldModel, got {type(pl_module).__name__}")
        self.metrics.to(pl_module.device)
        if self.fid and self.generative is None:
            from gen_lightning.metrics.generative import GenerativeMetrics
            from gen_lightning.metrics.inception import FIDInceptionV3

            self.generative = GenerativeMetrics(FIDInceptionV3(self.weights), kid=False).to(pl_module.device)

    def _ensure_reference(self, trainer: L.Trainer) -> None:
        if self.generative is None or self._reference_ready:
            return
        data = trainer.datamodule
        fill_val_reference(
            self.generative, data, self.cache_dir, trainer.global_rank, trainer.world_size, self.max_real
        )
        self._reference_ready = True

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        data = trainer.datamodule
        if data is None or not getattr(data, "val_urls", None):
            raise ValueError("WorldModelEvaluation needs held-out episodes: set data.val")
        self._ensure_reference(trainer)
        smoke = bool(trainer.fast_dev_run)  # a smoke test exercises the path, not its cost
        evaluator = WorldEvaluator(
            self.metrics,
            self.generative,
            num_samples=2 if smoke else self.rank_count(self.num_samples, trainer.world_size, trainer.global_rank),
            rollouts=1 if smoke else -(-self.rollouts // trainer.world_size),
            rollout_steps=self.rollout_steps,
            batch_size=self.batch_size,
            strips=self.strips,
            steps=2 if smoke else self.steps,
            sampler=self.sampler,
            rank=trainer.global_rank,
        )
        results, images = evaluator(pl_module, data.val_dataloader, self.generator(trainer, pl_module))
        self.last_results = results
        if trainer.is_global_zero:
            self.publish(trainer, results, images)
        return results

    def publish(self, trainer: L.Trainer, results: dict[str, float], images: dict[str, Image.Image]) -> None:
        """Rank 0: log the numbers and the strips through every logger, and keep the strips as PNGs."""
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({f"val/{name}": value for name, value in results.items()}, step=step)
        for name, image in images.items():
            if path := publish_image(trainer, f"world/{name}", image, f"world/step_{step:07d}_{name}.png"):
                self.last_images[name] = path


class WorldEvaluator:
    """One evaluation pass over (this rank's share of) held-out episodes, shared by WorldModelEvaluation and
    `gen-lightning evaluate`: one-step predictions of `num_samples` val samples, then `rollouts` episodes rolled out
    for `rollout_steps` steps. Returns the metrics (summed over ranks) and the strips (PIL images). Progress is shown
    on `rank` 0 (None: the launcher's rank)."""

    def __init__(
        self,
        metrics: WorldMetrics,
        generative=None,
        num_samples: int = 256,
        rollouts: int = 4,
        rollout_steps: int = 16,
        batch_size: int = 64,
        strips: int = 8,
        steps: int | None = None,
        sampler: str | None = None,
        rank: int | None = None,
    ) -> None:
        self.metrics, self.generative = metrics, generative
        self.rank = rank
        self.num_samples, self.rollouts, self.rollout_steps = num_samples, rollouts, rollout_steps
        self.batch_size, self.strips = batch_size, strips
        self.sampling = {"steps": steps, "sampler": sampler}

    @torch.no_grad()
    def __call__(
        self, model, val_batches: Callable[[], Iterable[dict[str, Any]]], generator: torch.Generator
    ) -> tuple[dict[str, float], dict[str, Image.Image]]:
        rows = self.one_step(model, val_batches(), generator)
        rollouts = self.rollout(model, val_batches(), generator)
        results = self.metrics.compute()
        self.metrics.reset()
        if self.generative is not None:
            results.update(self.generative.compute())
            self.generative.reset()
        images = {}
        if rows:
            images["one_step"] = make_grid(torch.cat(rows), nrow=model.hparams.context_frames + 2)
        if rollouts:
            interleaved = torch.stack([rollouts["real"], rollouts["predicted"]], 1).flatten(0, 2)
            images["rollout"] = make_grid(interleaved, nrow=rollouts["real"].shape[1])
        return results, images

    def one_step(self, model, batches: Iterable[dict[str, Any]], generator) -> list[torch.Tensor]:
        """Rows of the one-step strip: the context frames, the real next frame, the predicted one."""
        rows: list[torch.Tensor] = []
        seen = 0
        with progress(total=self.num_samples, desc="one-step predictions", unit="frames", rank=self.rank) as bar:
            for batch in batches:
                if seen >= self.num_samples:
                    break
                n = min(len(batch["image"]), self.num_samples - seen, self.batch_size)
                frames, real = batch["frames"][:n].to(model.device), batch["image"][:n].to(model.device)
                predicted = model.predict_next(frames, batch["action"][:n], generator=generator, **self.sampling)
                self.metrics.update_one_step(predicted, real, frames[:, -1])
                if self.generative is not None:
                    self.generative.update(predicted, real=False)
                for i in range(min(n, self.strips - len(rows))):
                    rows.append(torch.cat([frames[i], real[i : i + 1], predicted[i : i + 1]]).cpu())
                seen += n
                bar.update(n)
            bar.total = seen  # a val split smaller than num_samples ends early: the last line says how many
        return rows

    def rollout(self, model, batches: Iterable[dict[str, Any]], generator) -> dict[str, torch.Tensor]:
        episodes = episodes_from(batches, self.rollouts, self.rollout_steps)
        if not episodes:
            return {}
        frames, actions = episodes["frames"].to(model.device), episodes["actions"].to(model.device)
        # model.rollout runs all episodes' steps in one call: a line as it starts and one when it is done
        with progress(total=actions.shape[0] * actions.shape[1], desc="rollouts", unit="frames", rank=self.rank) as bar:
            predicted = model.rollout(frames, actions, generator=generator, **self.sampling)
            bar.update(bar.total)
        self.metrics.update_rollout(predicted, episodes["real"], episodes["frames"][:, -1])
        return {"real": episodes["real"], "predicted": predicted.cpu()}
