"""World-model metrics on held-out episodes: one-step PSNR / SSIM / cursor accuracy (and FID through
metrics.generative), and autoregressive rollouts with PSNR per step.

PSNR and SSIM are per frame on [0, 1] pixels, then averaged over frames (the video-prediction convention; a
dataset-level MSE would let a few easy frames hide bad ones). `psnr_copy_last` scores the trivial prediction "the
screen does not change" on the same frames: most of a desktop is static from one step to the next, so a world model
is only useful where it beats that baseline. Rollouts have theirs too: `rollout_psnr_copy_first` keeps the screen
the rollout started from, per step as `rollout_psnr_copy_first_tNN` beside `rollout_psnr_tNN`, and
`rollout_steps_above_copy_first` counts the steps where the model's mean beats it (the goal is all of them).

Cursor accuracy: the recorder draws the cursor as a magenta sprite (actions). A frame's cursor position is the
centroid of its magenta pixels; a prediction hits when its cursor is within `tolerance` pixels of the real next frame's.

On frames of the UI recorder's app (`ui_app`), also the app's state and typed text read off the predicted and the
real next frames (metrics.ui_state, metrics.ui_text: calibrated so that real frames read 100% right): state accuracy
over the widgets an action really changed and over whole frames, typed-text accuracy, each beside copying the last
context frame (`*_copy_last`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure

from gen_lightning.actions import CURSOR_RGB
from gen_lightning.images import psnr
from gen_lightning.metrics.ui_state import StateAccuracy
from gen_lightning.metrics.ui_text import TextAccuracy


class MeanVector(Metric):
    """Element-wise running mean of [N, D] values (NaN entries ignored), summed over ranks by torchmetrics."""

    full_state_update = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.add_state("sums", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        # The values are computed on the CPU; the states live where the model does (NCCL syncs device tensors).
        values = values.detach().to(self.sums.device, torch.float64).reshape(values.shape[0], -1)
        valid = torch.isfinite(values)
        self.sums += torch.where(valid, values, 0).sum(0)
        self.counts += valid.sum(0)

    def compute(self) -> torch.Tensor:
        return self.sums / self.counts  # NaN where nothing was seen


def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images.detach().float().clamp(-1, 1) + 1) / 2


def ssim(predicted: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM (Gaussian window 11, sigma 1.5) of images in [-1, 1]."""
    return structural_similarity_index_measure(_unit(predicted), _unit(real), data_range=1.0, reduction="none")


def cursor_positions(images: torch.Tensor, min_pixels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(found [N] bool, (x, y) centroid [N, 2] in pixels) of the magenta cursor pixels in [-1, 1] images."""
    unit = _unit(images)
    red, green, blue = (unit[:, c] for c in range(3))
    target = torch.tensor(CURSOR_RGB, dtype=unit.dtype) / 255
    # Loose bounds so a slightly blurred generated cursor still counts; the app itself has no magenta-like pixels.
    mask = (red > target[0] - 0.35) & (blue > target[2] - 0.35) & (green < 0.4) & (red - green > 0.45)
    mask = mask.float()
    count = mask.flatten(1).sum(1)
    height, width = mask.shape[1:]
    ys = torch.arange(height, dtype=mask.dtype).view(1, height, 1)
    xs = torch.arange(width, dtype=mask.dtype).view(1, 1, width)
    safe = count.clamp(min=1)
    centroid = torch.stack([(mask * xs).flatten(1).sum(1) / safe, (mask * ys).flatten(1).sum(1) / safe], 1)
    return count >= min_pixels, centroid


def cursor_hits(predicted: torch.Tensor, real: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Per frame: 1 if the predicted cursor is within `tolerance` px of the real one, 0 if not (or missing), NaN
    where the real frame shows no cursor (not scored)."""
    found_real, at_real = cursor_positions(real)
    found_pred, at_pred = cursor_positions(predicted)
    hit = found_pred & ((at_pred - at_real).norm(dim=1) <= tolerance)
    return torch.where(found_real, hit.double(), torch.nan)


class WorldMetrics(torch.nn.Module):
    """Accumulates one-step and rollout metrics; `compute()` returns plain floats (summed over ranks).

    `ui_app`: the frames are the UI recorder's app (data.ui_app, as gen_lightning.ui_layout draws it), so the one-step
    predictions are also scored by the app's widget states and typed text (StateAccuracy, TextAccuracy); they need
    the action's cursor position in update_one_step. Set it before the first update."""

    def __init__(self, rollout_steps: int, cursor_tolerance: float = 2.0, ui_app: bool = False) -> None:
        super().__init__()
        self.one_step = MeanVector(4)  # psnr, psnr_copy_last, ssim, cursor_accuracy
        self.rollout = MeanVector(rollout_steps)
        self.rollout_copy = MeanVector(rollout_steps)
        self.states, self.text = StateAccuracy(), TextAccuracy()
        self.rollout_steps = rollout_steps
        self.cursor_tolerance = cursor_tolerance
        self.ui_app = ui_app

    def update_one_step(
        self,
        predicted: torch.Tensor,
        real: torch.Tensor,
        last_context: torch.Tensor,
        cursor: torch.Tensor | None = None,
    ) -> None:
        """Frames in [-1, 1] NCHW; `cursor`: the action's (x, y), [N, 2] fractions of the frame (action[:, :2]),
        where the predicted and real next frames draw the cursor sprite (the UI readers look past it)."""
        predicted, real, last_context = predicted.cpu(), real.cpu(), last_context.cpu()
        if self.ui_app:
            cursor = cursor.cpu() if cursor is not None else None
            self.states.update(predicted, real, last_context, cursor)
            self.text.update(predicted, real, last_context, cursor)
        values = torch.stack(
            [
                psnr(predicted, real).double(),
                psnr(last_context, real).double(),
                ssim(predicted, real).double(),
                cursor_hits(predicted, real, self.cursor_tolerance),
            ],
            1,
        )
        # An exact copy has infinite PSNR; cap at 100 dB (MSE 1e-10) so the mean stays a number.
        values[:, :2] = values[:, :2].clamp(max=100.0)
        self.one_step.update(values)

    def update_rollout(self, predicted: torch.Tensor, real: torch.Tensor, start: torch.Tensor) -> None:
        """predicted, real: [N, T, 3, H, W] with T == rollout_steps; start: [N, 3, H, W], the screen the rollouts
        started from (the baseline "nothing changes" repeats it)."""
        n, steps = real.shape[:2]
        per_step = psnr(predicted.flatten(0, 1).cpu(), real.flatten(0, 1).cpu()).clamp(max=100.0)
        self.rollout.update(per_step.view(n, steps))
        frozen = start.cpu()[:, None].expand_as(real).flatten(0, 1)
        self.rollout_copy.update(psnr(frozen, real.flatten(0, 1).cpu()).clamp(max=100.0).view(n, steps))

    def compute(self) -> dict[str, float]:
        one_step = self.one_step.compute().tolist()
        results = dict(zip(("psnr", "psnr_copy_last", "ssim", "cursor_accuracy"), one_step, strict=True))
        curve = self.rollout.compute().reshape(-1).tolist()  # torchmetrics squeezes a 1-step curve to a scalar
        copy_curve = self.rollout_copy.compute().reshape(-1).tolist()
        results["rollout_psnr"] = float(torch.tensor(curve).nanmean())
        results["rollout_psnr_copy_first"] = float(torch.tensor(copy_curve).nanmean())
        results["rollout_steps_above_copy_first"] = sum(m > c for m, c in zip(curve, copy_curve, strict=True))
        results.update({f"rollout_psnr_t{step + 1:02d}": value for step, value in enumerate(curve)})
        results.update({f"rollout_psnr_copy_first_t{step + 1:02d}": value for step, value in enumerate(copy_curve)})
        if self.ui_app:
            results.update(self.states.compute())
            results.update(self.text.compute())
        return results

    def reset(self) -> None:
        for metric in (self.one_step, self.rollout, self.rollout_copy, self.states, self.text):
            metric.reset()


def episodes_from(batches: Iterable[dict[str, Any]], count: int, length: int) -> dict[str, torch.Tensor]:
    """The first `count` complete episode openings of a val stream, for rollouts: {"frames": [E, K, 3, H, W] (context
    of step 0), "actions": [E, T, A], "real": [E, T, 3, H, W] (the real next frames)}, T = `length`.

    Samples are matched by their json's episode and t (written by the UI recorder), so the order they arrive in
    (several shards, several workers) does not matter.
    """
    steps: dict[Any, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for batch in batches:
        for i, meta in enumerate(batch["meta"]):
            episode, t = meta.get("episode"), meta.get("t")
            if episode is None or t is None or t >= length:
                continue
            if episode not in steps and len(steps) >= count * 4:
                continue  # enough candidates: keep memory bounded on a large val split
            steps.setdefault(episode, {})[int(t)] = (batch["frames"][i], batch["action"][i], batch["image"][i])
    complete = [episode for episode in sorted(steps, key=str) if len(steps[episode]) == length][:count]
    if not complete:
        return {}
    return {
        "frames": torch.stack([steps[e][0][0] for e in complete]),
        "actions": torch.stack([torch.stack([steps[e][t][1] for t in range(length)]) for e in complete]),
        "real": torch.stack([torch.stack([steps[e][t][2] for t in range(length)]) for e in complete]),
    }
