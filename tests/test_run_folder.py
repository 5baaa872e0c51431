"""One run folder, one run: the final state is saved, a finished run is not trained again, every start of a run logs
into one W&B run (a start killed before its first checkpoint too), and a smoke test leaves no trace and finds none."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from gen_lightning.checkpointing import CheckpointSummary
from gen_lightning.cli import main
from gen_lightning.run_folder import RUN_FILE, completed
from tests.conftest import REPO, tiny_fit_args
from tests.wandb_reader import run_id

EVERY_2 = ("--checkpoint.every_n_train_steps=2", "--trainer.log_every_n_steps=1")


def last_checkpoint(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def folder_state(root: Path) -> dict[str, str]:
    """Every file under `root` with the sha256 of its bytes."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def wandb_runs(root: Path) -> list[Path]:
    return sorted(root.glob("wandb/offline-run-*"))


def started_run_id(run_dir: Path) -> str:
    """The id of a W&B run that may have been killed: wandb names the run file `run-<id>.wandb` when the run starts
    (the records of a killed run may never have reached the file)."""
    (run_file,) = run_dir.glob("run-*.wandb")
    return run_file.stem.removeprefix("run-")


def test_fit_ending_between_checkpoints_saves_its_final_state_and_a_rerun_trains_nothing(toy_shards, tmp_path, caplog):
    args = tiny_fit_args(toy_shards, tmp_path, *EVERY_2, "--trainer.max_steps=5")
    main(["fit", *args])
    final = last_checkpoint(tmp_path)
    assert final["global_step"] == 5  # checkpoints every 2 steps: the last periodic one is at step 4
    assert final["gen_lightning_run"]["finished"]["reason"] == "max_steps"
    before = folder_state(tmp_path)
    with caplog.at_level(logging.INFO, logger="gen_lightning"):
        main(["fit", *args])
    assert any("run complete" in r.getMessage() and "global_step 5" in r.getMessage() for r in caplog.records)
    assert folder_state(tmp_path) == before  # no training, no new W&B run, no new checkpoint
    main(["fit", *args[:-1], "--trainer.max_steps=7"])  # a raised limit continues the run
    assert last_checkpoint(tmp_path)["global_step"] == 7


def test_a_run_ended_by_max_epochs_is_complete_until_the_limit_is_raised(toy_shards, tmp_path, caplog):
    epochs = ["--data.samples_per_epoch=8", "--trainer.max_steps=-1", "--trainer.val_check_interval=null",
              "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1"]  # fmt: skip
    main(["fit", *tiny_fit_args(toy_shards, tmp_path, *epochs, "--trainer.max_epochs=2")])
    final = last_checkpoint(tmp_path)
    assert (final["global_step"], final["gen_lightning_run"]["finished"]["reason"]) == (4, "max_epochs")
    with caplog.at_level(logging.INFO, logger="gen_lightning"):
        main(["fit", *tiny_fit_args(toy_shards, tmp_path, *epochs, "--trainer.max_epochs=2")])
    assert any("run complete" in r.getMessage() and "max_epochs=2" in r.getMessage() for r in caplog.records)
    main(["fit", *tiny_fit_args(toy_shards, tmp_path, *epochs, "--trainer.max_epochs=3")])
    assert last_checkpoint(tmp_path)["global_step"] == 6


def test_completed_reads_why_the_run_ended():
    def trainer(**limits) -> SimpleNamespace:
        return SimpleNamespace(**{"max_steps": -1, "max_epochs": None, "max_time": None, **limits})

    def summary(step: int, reason: str | None, max_time: float | None = None) -> CheckpointSummary:
        finished = None if reason is None else {"reason": reason, "max_time": max_time}
        return CheckpointSummary(global_step=step, epoch=3, wandb_id=None, finished=finished)

    assert completed(summary(10, None), trainer(max_steps=10))  # a step limit reached holds with or without marker
    assert completed(summary(10, None), trainer(max_steps=11)) is None  # an interrupted run (no marker) continues
    assert completed(summary(10, "max_epochs"), trainer(max_epochs=3))
    assert completed(summary(10, "max_epochs"), trainer(max_epochs=4)) is None
    assert completed(summary(10, "max_time", 60.0), trainer(max_time="00:00:01:00"))
    assert completed(summary(10, "max_time", 60.0), trainer(max_time="00:00:02:00")) is None
    assert completed(summary(10, "stopped early"), trainer(max_steps=100))


def test_every_start_of_a_run_logs_into_one_wandb_run_even_if_killed_before_a_checkpoint(toy_shards, tmp_path):
    """SIGKILL a fit before its first checkpoint (the start's W&B run file exists), re-run the command: the re-run
    logs into the same W&B run. --no-resume starts a new one and sets the old run file aside."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    args = tiny_fit_args(toy_shards, tmp_path, "--trainer.max_steps=100000", "--trainer.val_check_interval=100000")
    killed = subprocess.Popen([sys.executable, "-m", "gen_lightning.cli", "fit", *args], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("wandb/offline-run-*/run-*.wandb")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # let it train a little: the kill lands mid-training, before any checkpoint
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    assert not (tmp_path / "checkpoints").exists()
    folder_id = json.loads((tmp_path / RUN_FILE).read_text())["wandb_id"]
    (first,) = wandb_runs(tmp_path)
    assert started_run_id(first) == folder_id

    main(["fit", *tiny_fit_args(toy_shards, tmp_path, "--trainer.max_steps=2")])
    runs = wandb_runs(tmp_path)
    assert len(runs) == 2 and run_id(runs[1]) == folder_id

    main(["fit", *tiny_fit_args(toy_shards, tmp_path, "--trainer.max_steps=2", "--no-resume")])
    new_id = json.loads((tmp_path / RUN_FILE).read_text())["wandb_id"]
    assert new_id != folder_id and run_id(wandb_runs(tmp_path)[-1]) == new_id
    (archive,) = (tmp_path / "checkpoints").glob("previous-*")
    assert json.loads((archive / RUN_FILE).read_text())["wandb_id"] == folder_id


def test_fast_dev_run_in_a_folder_holding_a_run_leaves_it_untouched(toy_shards, tmp_path):
    """The run is past epoch 1; resuming it under fast_dev_run (max_epochs=1) used to die, and a smoke test used to
    leave a step-1 last.ckpt that the next real fit resumed from."""
    main(["fit", *tiny_fit_args(toy_shards, tmp_path, *EVERY_2, "--data.samples_per_epoch=8", "--trainer.max_steps=5")])
    assert last_checkpoint(tmp_path)["epoch"] >= 2
    before = folder_state(tmp_path)
    smoke = subprocess.run(
        [sys.executable, "-m", "gen_lightning.cli", "fit", *tiny_fit_args(toy_shards, tmp_path),
         "--trainer.fast_dev_run=true"],
        env={**os.environ, "WANDB_MODE": "offline"}, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    assert "`max_steps=1` reached" in smoke.stdout + smoke.stderr  # it trained a real step, from scratch
    assert "resuming from" not in smoke.stdout + smoke.stderr
    assert folder_state(tmp_path) == before


def test_validate_without_a_checkpoint_leaves_no_trace(toy_shards, tmp_path):
    main(["validate", *tiny_fit_args(toy_shards, tmp_path / "run"), "--trainer.limit_val_batches=1"])
    assert not (tmp_path / "run").exists()
