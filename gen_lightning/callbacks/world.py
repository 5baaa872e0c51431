"""World-model evaluation during training: schedules evaluation.WorldEvaluator on the held-out episodes and publishes
its numbers and strips."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from gen_lightning.callbacks.periodic import PeriodicSampling
from gen_lightning.evaluation.reference import Reference
from gen_lightning.evaluation.world import WorldEvaluator
from gen_lightning.images import publish_image


class WorldModelEvaluation(PeriodicSampling):
    """Every `every_n_steps` optimizer steps (0: only at the end of training), on the validation shards (held-out
    episodes, each rank its share): predict the next frame of `num_samples` val samples (over all ranks) and score
    PSNR / SSIM / cursor accuracy against the real next frame (and the copy-last-frame baseline), FID of predicted vs
    real frames when `fid`, on the UI app's frames its widget states and typed text (beside copying), and roll
    `rollouts` episodes out for `rollout_steps` steps from their first context, feeding the model its own frames
    (PSNR per step). Logs `val/<metric>` and the images `world/one_step` (rows:
    context frames, real next, predicted) and `world/rollout` (per episode a row of real frames above a row of
    predicted ones), also written to `<root>/world/`.

    Args:
        steps / sampler / seed: sampling settings (None: the model's defaults).
        batch_size: val samples predicted at once.
        strips: rows in the one-step image.
        fid / weights / cache_dir / max_real: FID against the val frames' cached statistics (see GenerativeEvaluation).
        cursor_tolerance: pixels between predicted and real cursor that still count as a hit.
        ui_metrics: score the UI app's widget states and typed text beside copying the last frame (`val/state_*`,
            `val/text_*`); None: when the val shards' manifest says they are the app's frames (see WorldEvaluator).
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
        ui_metrics: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps, num_samples, sampler, steps, None, seed)
        self.options = {
            "fid": fid, "weights": weights, "cache_dir": cache_dir, "max_real": max_real, "rollouts": rollouts,
            "rollout_steps": rollout_steps, "cursor_tolerance": cursor_tolerance, "ui_metrics": ui_metrics,
            "batch_size": batch_size, "strips": strips,
        }  # fmt: skip
        self.evaluator: WorldEvaluator | None = None
        self.last_results: dict[str, float] = {}
        self.last_images: dict[str, Path] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.evaluator is None:
            options = dict(self.options)
            if trainer.fast_dev_run:  # a smoke test exercises the path, not its cost: one rollout per rank
                options["rollouts"] = trainer.world_size
            self.evaluator = WorldEvaluator(**options, steps=self.sampling_steps(trainer), sampler=self.sampler)
            self.evaluator.setup(pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        reference = Reference.from_datamodule(trainer.datamodule, "WorldModelEvaluation")
        total = 2 * trainer.world_size if trainer.fast_dev_run else self.num_samples
        generator = self.generator(trainer, pl_module)
        results, images = self.evaluator(
            pl_module, reference, total, generator, trainer.global_rank, trainer.world_size
        )
        self.last_results = results
        self.log_results(trainer, results)
        if trainer.is_global_zero:
            step = trainer.global_step
            for name, image in images.items():
                if path := publish_image(trainer, f"world/{name}", image, f"world/step_{step:07d}_{name}.png"):
                    self.last_images[name] = path
        return results
