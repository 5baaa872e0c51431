"""The world-model evaluation's UI-app metrics: state accuracy and typed-text accuracy, each beside copying the last
frame, in WorldMetrics, the evaluator behind `gen-lightning evaluate` and a fit's W&B run. On episodes recorded from
the real app (needs Xvfb, as tests/test_ui_source.py); the readers' calibration is tests/test_ui_state_metrics.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gen_lightning.cli import main
from gen_lightning.data.datamodule import ShardDataModule
from gen_lightning.errors import UserInputError
from gen_lightning.evaluation.evaluators import evaluator_for
from gen_lightning.evaluation.reference import Reference
from gen_lightning.evaluation.world import reads_ui_app
from gen_lightning.metrics.world import WorldMetrics
from gen_lightning.models.loading import load_model
from tests.conftest import WORLD_CONTEXT
from tests.test_ui_state_metrics import fake_screen, needs_x
from tests.test_world_model import world_fit_args
from tests.wandb_reader import history

UI_SIZE = 64  # the recorder's default frame size: the readers are calibrated on it
# What the evaluator adds on the app's frames: each accuracy beside its copy-the-last-frame baseline.
PAIRS = ("state_accuracy", "state_frame_accuracy", "text_accuracy", "text_accuracy_typed", "text_exact_typed")


@pytest.fixture(scope="module")
def ui_shards(tmp_path_factory) -> Path:
    """24 episodes of 32 steps recorded from the real app by `gen-lightning shards ui`'s own writer, a third held
    out (8 episodes, 256 val samples)."""
    from gen_lightning.data.ui_source import write_ui_shards

    root = tmp_path_factory.mktemp("ui_shards")
    write_ui_shards(
        root, episodes=24, steps=32, context=WORLD_CONTEXT, size=UI_SIZE, samples_per_shard=128, val_fraction=1 / 3
    )
    return root


def val_data(folder: Path, image_size: int = UI_SIZE) -> ShardDataModule:
    data = ShardDataModule(val=str(folder), image_size=image_size, val_batch_size=16, num_workers=0)
    data.setup("validate")
    return data


@needs_x
def test_real_next_frames_score_full_marks_and_copying_is_the_baseline(ui_shards):
    """A perfect predictor (the real next frames, as the evaluator's val batches carry them) reads 100% right; the
    last context frame, offered as the prediction, scores exactly the reported copy baselines."""
    perfect, copying = WorldMetrics(rollout_steps=1, ui_app=True), WorldMetrics(rollout_steps=1, ui_app=True)
    for batch in val_data(ui_shards).val_dataloader():
        real, last, cursor = batch["image"], batch["frames"][:, -1], batch["action"][:, :2]
        perfect.update_one_step(real, real, last, cursor)
        copying.update_one_step(last, real, last, cursor)
    results, copied = perfect.compute(), copying.compute()
    assert results["state_changes"] >= 30 and results["text_typed_frames"] >= 20, "too few changes to score"
    for name in PAIRS:
        assert results[name] == 1.0, name
        # The baseline is what copying scores. Not always to the last digit: offered as a prediction, the last frame
        # is read around the new cursor position too (on all 1,952 held-out frames: text 0.7551 against 0.7553).
        assert copied[name] == pytest.approx(results[f"{name}_copy_last"], abs=1e-3), name
    assert results["state_accuracy_copy_last"] == 0.0 and results["text_exact_typed_copy_last"] == 0.0
    assert results["state_frame_accuracy_copy_last"] < 1.0 and results["text_accuracy_typed_copy_last"] < 1.0


@needs_x
def test_the_readers_run_only_on_the_apps_frames_at_their_recorded_size(ui_shards, toy_world):
    on, why = reads_ui_app(Reference.from_datamodule(val_data(ui_shards), "test"), None)
    assert on and why.startswith("on:"), why
    on, why = reads_ui_app(Reference.from_datamodule(val_data(ui_shards, 32), "test"), None)  # resized frames
    assert not on and "recorded at 64 px, evaluated at 32" in why
    on, why = reads_ui_app(Reference.from_datamodule(val_data(toy_world[1], 16), "test"), None)  # no app's manifest
    assert not on and "names no recording of the UI app" in why
    assert reads_ui_app(Reference.from_datamodule(val_data(ui_shards, 32), "test"), True) == (True, "on (asked)")
    assert reads_ui_app(Reference.from_datamodule(val_data(ui_shards), "test"), False) == (False, "off (asked)")
    with pytest.raises(UserInputError, match="ui_metrics=true: 16×16 frames are too small to read"):
        reads_ui_app(Reference.from_datamodule(val_data(toy_world[1], 16), "test"), True)


@pytest.fixture(scope="module")
def ui_world_run(ui_shards, tmp_path_factory) -> Path:
    """A 2-step fit on the app's episodes with the world-model evaluation at the end (no FID)."""
    root = tmp_path_factory.mktemp("ui_world_run")
    main(
        world_fit_args(
            ui_shards,
            ui_shards,
            root,
            f"--data.image_size={UI_SIZE}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.callbacks.every_n_steps=0",
            "--trainer.callbacks.num_samples=32",
            "--trainer.callbacks.rollouts=1",
            "--trainer.callbacks.rollout_steps=2",
            "--trainer.callbacks.fid=false",
        )
    )
    return root


def assert_ui_metrics(results: dict[str, float], prefix: str = "") -> None:
    for name in PAIRS:
        for key in (f"{prefix}{name}", f"{prefix}{name}_copy_last"):
            assert key in results and 0.0 <= results[key] <= 1.0, key
    assert results[f"{prefix}state_changes"] > 0 and results[f"{prefix}text_typed_frames"] > 0
    assert all(f"{prefix}state_accuracy_{widget}" in results for widget in ("toggle", "checkbox", "menu", "focus"))


@needs_x
def test_a_fit_on_the_app_logs_state_and_text_accuracy_to_wandb(ui_world_run):
    (run_dir,) = (ui_world_run / "wandb").glob("offline-run-*")
    final = {key: value for row in history(run_dir) for key, value in row.items()}
    assert_ui_metrics(final, "val/")
    assert "val/psnr_copy_last" in final  # beside the existing world metrics, named alike


@needs_x
def test_the_evaluator_reports_state_and_text_accuracy_beside_copying(ui_world_run, ui_shards):
    """The evaluator `gen-lightning evaluate` runs on a world checkpoint (its JSON report is results + report(), as
    tests/test_world_model.py checks with FID; FID is left out here, it costs minutes on 2 cores)."""
    model = load_model(ui_world_run / "checkpoints" / "last.ckpt")
    evaluator = evaluator_for(model, fid=False, rollouts=1, rollout_steps=2, steps=2)
    evaluator.setup(model)
    reference = Reference.from_datamodule(val_data(ui_shards), "test")
    results, _ = evaluator(model, reference, 32, torch.Generator().manual_seed(0))
    assert_ui_metrics(results)
    assert results["state_frames"] == 32 and not math.isnan(results["psnr"])
    assert evaluator.report(model)["ui_metrics"].startswith("on:")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_ui_metrics_on_the_gpu_take_gpu_frames():
    """WorldModelEvaluation moves the metric states to the model's device; the frames are read on the CPU."""
    metrics = WorldMetrics(rollout_steps=1, ui_app=True).to("cuda")
    last = torch.stack([fake_screen(text="ca"), fake_screen()]).cuda()
    real = torch.stack([fake_screen(text="cat"), fake_screen(toggled=True)]).cuda()
    metrics.update_one_step(real, real, last, torch.tensor([[0.9, 0.1], [0.9, 0.1]], device="cuda"))
    results = metrics.compute()
    assert results["state_accuracy"] == 1.0 and results["text_accuracy_typed"] == 1.0
    assert results["state_frame_accuracy_copy_last"] == 0.5
