"""Evaluation of a world model on held-out episodes: one-step predictions (PSNR / SSIM / cursor accuracy against the
real next frame and the copy-last-frame baseline, FID of predicted vs real frames; on the UI recorder's app, state
and typed-text accuracy beside copying) and autoregressive rollouts that feed the model its own frames (PSNR per
step), with image strips of both."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from PIL import Image

from gen_lightning.distributed import rank_count
from gen_lightning.errors import UserInputError
from gen_lightning.evaluation.generate import resolved_settings
from gen_lightning.evaluation.reference import FIDAgainstReference, Reference
from gen_lightning.images import make_grid
from gen_lightning.metrics.ui_text import read_text
from gen_lightning.metrics.world import WorldMetrics, episodes_from
from gen_lightning.models.world_model import NextFrame
from gen_lightning.progress import progress
from gen_lightning.ui_layout import APP_NAME, APP_VERSION


class WorldEvaluator:
    """One pass over (each rank's share of) the held-out episodes: one-step predictions of `num_samples` val samples,
    then `rollouts` episodes (over all ranks) rolled out for `rollout_steps` steps from their first context. Returns
    the metrics (summed over ranks) and the strips `one_step` (rows: context frames, real next, predicted) and
    `rollout` (per episode a row of real frames above a row of predicted ones).

    Args:
        fid / weights / cache_dir / max_real: FID of predicted frames against the val frames (FIDAgainstReference),
            beside fid_floor, that of as many real training frames when the reference knows the training shards.
        rollouts / rollout_steps: episodes rolled out over all ranks, and their length.
        cursor_tolerance: see metrics.world.WorldMetrics.
        ui_metrics: score the UI app's widget states and typed text (metrics.ui_state, metrics.ui_text). None: when
            the val shards' manifest says they are that app's frames (its name and version, at the size evaluated);
            True: always (an error where the frames are too small to read); False: never.
        batch_size: val samples predicted at once. strips: rows in the one-step strip.
        steps / sampler: sampling settings (None: the model's defaults).
        guidance: the autoguidance weight, for a model with a guide set (set_autoguidance); None: unguided.
    """

    def __init__(
        self,
        *,
        fid: bool = True,
        weights: str | None = None,
        cache_dir: str | None = None,
        max_real: int | None = None,
        rollouts: int = 4,
        rollout_steps: int = 16,
        cursor_tolerance: float = 2.0,
        ui_metrics: bool | None = None,
        batch_size: int = 64,
        strips: int = 8,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
    ) -> None:
        self.fid = (
            FIDAgainstReference(kid=False, weights=weights, cache_dir=cache_dir, max_real=max_real) if fid else None
        )
        self.metrics = WorldMetrics(rollout_steps, cursor_tolerance)
        self.rollouts, self.rollout_steps = rollouts, rollout_steps
        self.ui_metrics = ui_metrics
        self.ui_reason = "not decided yet: no evaluation has run"
        self.batch_size, self.strips = batch_size, strips
        self.sampling: dict[str, Any] = {"steps": steps, "sampler": sampler, "guidance": guidance}

    def setup(self, model: Any) -> None:
        if model.kind != "next-frame":
            raise UserInputError(f"the world-model evaluation needs a WorldModel, got a {type(model).__name__}")
        self.metrics.to(model.device)
        if self.fid is not None:
            self.fid.to(model.device)

    @torch.no_grad()
    def __call__(
        self,
        model: Any,
        reference: Reference,
        num_samples: int,
        generator: torch.Generator,
        rank: int = 0,
        world: int = 1,
    ) -> tuple[dict[str, float], dict[str, Image.Image]]:
        """`num_samples` one-step predictions over all ranks (each rank its share) and the rollouts; the FID
        reference statistics are read at the first call."""
        floor: dict[str, float] = {}
        if self.fid is not None:
            self.fid.load_reference(reference, rank, world)
            floor = self.fid.floor(reference, num_samples, rank, world)  # FID of real frames: the least it can be
        self.metrics.ui_app, self.ui_reason = reads_ui_app(reference, self.ui_metrics)
        rows = self.one_step(model, reference.batches(), rank_count(num_samples, world, rank), generator, rank)
        episodes = self.rollout(model, reference.batches(), -(-self.rollouts // world), generator, rank)
        results = self.metrics.compute()
        self.metrics.reset()
        if self.fid is not None:
            results.update(self.fid.compute(), **floor)
        images = {}
        if rows:
            images["one_step"] = make_grid(torch.cat(rows), nrow=model.hparams.context_frames + 2)
        if episodes:
            interleaved = torch.stack([episodes["real"], episodes["predicted"]], 1).flatten(0, 2)
            images["rollout"] = make_grid(interleaved, nrow=episodes["real"].shape[1])
        return results, images

    def one_step(
        self, model: Any, batches: Iterable[dict[str, Any]], num_samples: int, generator: torch.Generator, rank: int
    ) -> list[torch.Tensor]:
        """Rows of the one-step strip: the context frames, the real next frame, the predicted one."""
        rows: list[torch.Tensor] = []
        seen = 0
        with progress(total=num_samples, desc="one-step predictions", unit="frames", rank=rank) as bar:
            for batch in batches:
                if seen >= num_samples:
                    break
                n = min(len(batch["image"]), num_samples - seen, self.batch_size)
                frames, real = batch["frames"][:n].to(model.device), batch["image"][:n].to(model.device)
                predicted = model.sample(
                    n, NextFrame(frames, batch["action"][:n]), generator=generator, **self.sampling
                )
                self.metrics.update_one_step(predicted, real, frames[:, -1], batch["action"][:n, :2])
                if self.fid is not None:
                    self.fid.update(predicted)
                for i in range(min(n, self.strips - len(rows))):
                    rows.append(torch.cat([frames[i], real[i : i + 1], predicted[i : i + 1]]).cpu())
                seen += n
                bar.update(n)
            bar.total = seen  # a val split smaller than num_samples ends early: the last line says how many
        return rows

    def rollout(
        self, model: Any, batches: Iterable[dict[str, Any]], rollouts: int, generator: torch.Generator, rank: int
    ) -> dict[str, torch.Tensor]:
        episodes = episodes_from(batches, rollouts, self.rollout_steps)
        if not episodes:
            return {}
        frames, actions = episodes["frames"].to(model.device), episodes["actions"].to(model.device)
        # model.rollout runs all episodes' steps in one call: a line as it starts and one when it is done
        with progress(total=actions.shape[0] * actions.shape[1], desc="rollouts", unit="frames", rank=rank) as bar:
            predicted = model.rollout(frames, actions, generator=generator, **self.sampling)
            bar.update(bar.total)
        self.metrics.update_rollout(predicted, episodes["real"], episodes["frames"][:, -1])
        return {"real": episodes["real"], "predicted": predicted.cpu()}

    def report(self, model: Any) -> dict[str, Any]:
        fid = self.fid.report() if self.fid is not None else {}
        rollouts = {"rollouts": self.rollouts, "rollout_steps": self.rollout_steps}
        ui = {"ui_metrics": self.ui_reason}
        return {**fid, **rollouts, **ui, **resolved_settings(model, **self.sampling)}


def reads_ui_app(reference: Reference, wanted: bool | None) -> tuple[bool, str]:
    """Whether to read the UI app's states and text off these frames, and why (for the report).

    The readers know one app at one look (gen_lightning.ui_layout) and are calibrated on frames as the recorder
    writes them; frames resized on the way in would not keep the app's exact colours."""
    if wanted:
        try:  # the readers refuse frames too small to hold a whole pixel of each area they read
            read_text(torch.zeros(1, 3, reference.image_size, reference.image_size))
        except ValueError as err:
            raise UserInputError(f"ui_metrics=true: {err}") from err
        return True, "on (asked)"
    if wanted is not None:
        return False, "off (asked)"
    source = reference.source or {}
    app = source.get("app") if isinstance(source.get("app"), dict) else {}
    if source.get("name") != "ui" or app.get("name") != APP_NAME:
        return False, f"off: the val shards' manifest names no recording of the UI app {APP_NAME!r}"
    if app.get("version") != APP_VERSION:
        return False, f"off: the val shards record {APP_NAME} v{app.get('version')}, the readers know v{APP_VERSION}"
    if source.get("frame_size") != reference.image_size:
        recorded, evaluated = source.get("frame_size"), reference.image_size
        return False, f"off: recorded at {recorded} px, evaluated at {evaluated} px: the readers need unresized frames"
    return True, f"on: the val shards are {APP_NAME} v{APP_VERSION} frames"
