"""Atomic checkpoints, auto-resume of a re-run fit command, and the NaN/Inf guard, through the real CLI."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

from gen_lightning.checkpointing import AtomicCheckpointIO, find_resume_checkpoint
from gen_lightning.cli import main
from gen_lightning.run_folder import prepare_run_folder
from tests.conftest import tiny_fit_args
from tests.wandb_reader import history, run_id


def fit(shards: Path, root: Path, *extra: str) -> None:
    every_2 = ["--checkpoint.every_n_train_steps=2", "--trainer.log_every_n_steps=1"]
    main(["fit", *tiny_fit_args(shards, root, *every_2, *extra)])


NO_LOGGER = ["--trainer.logger=false", "--trainer.callbacks=[]"]  # the config's LR monitor needs a logger


def last_checkpoint(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def wandb_runs(root: Path) -> list[Path]:
    return sorted(root.glob("wandb/offline-run-*"))


def test_rerunning_fit_resumes_step_optimizer_and_wandb_run(toy_shards, tmp_path, caplog):
    fit(toy_shards, tmp_path, "--trainer.max_steps=4")
    first = last_checkpoint(tmp_path)
    assert first["global_step"] == 4 and first["ShardDataModule"]["stream_step"] == 4
    with caplog.at_level(logging.INFO, logger="gen_lightning"):
        fit(toy_shards, tmp_path, "--trainer.max_steps=8")
    assert any("resuming from" in r.getMessage() and "(global_step 4)" in r.getMessage() for r in caplog.records)
    second = last_checkpoint(tmp_path)
    assert second["global_step"] == 8
    # the optimizer continued (AdamW's step count), it was not rebuilt at the resume
    adam_steps = {int(s["step"]) for s in second["optimizer_states"][0]["state"].values()}
    assert adam_steps == {8}
    runs = wandb_runs(tmp_path)
    assert len(runs) == 2 and run_id(runs[0]) == run_id(runs[1])
    steps = [row["trainer/global_step"] for row in history(runs[1]) if "train/loss" in row]
    assert steps and min(steps) >= 4  # the resumed run logs from where the first stopped

    fit(toy_shards, tmp_path, "--trainer.max_steps=2", "--no-resume")
    assert last_checkpoint(tmp_path)["global_step"] == 2
    assert run_id(wandb_runs(tmp_path)[-1]) != run_id(runs[0])
    (archive,) = (tmp_path / "checkpoints").glob("previous-*")  # the earlier run's checkpoints are kept aside
    assert torch.load(archive / "last.ckpt", weights_only=True)["global_step"] == 8


def test_explicit_ckpt_path_wins_over_the_newest_and_continues_its_wandb_run(toy_shards, tmp_path, caplog):
    fit(toy_shards, tmp_path, "--trainer.max_steps=4", "--checkpoint.save_top_k=-1")
    step2 = next((tmp_path / "checkpoints").glob("*step=2.ckpt"))
    with caplog.at_level(logging.INFO):
        fit(toy_shards, tmp_path, "--trainer.max_steps=6", f"--ckpt_path={step2}")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("resuming from" in m for m in messages)
    assert any("Restored all states from the checkpoint" in m and str(step2) in m for m in messages)
    first, second = wandb_runs(tmp_path)
    assert run_id(first) == run_id(second)


def test_atomic_save_and_resume_choice_skip_truncated_and_temp_files(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    for step in (3, 7):
        io.save_checkpoint({"global_step": step, "state_dict": {"w": torch.ones(2)}}, folder / f"step={step}.ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["step=3.ckpt", "step=7.ckpt"]  # no temp file left behind
    (folder / ".tmp-last.ckpt.123").write_bytes(b"partial")  # a save killed mid-write
    complete = (folder / "step=7.ckpt").read_bytes()
    (folder / "step=9.ckpt").write_bytes(complete[: len(complete) // 2])  # truncated by a non-atomic writer
    with caplog.at_level(logging.WARNING, logger="gen_lightning"):
        path, summary = find_resume_checkpoint(folder)
    assert (path.name, summary.global_step) == ("step=7.ckpt", 7)
    assert any("step=9.ckpt" in r.getMessage() and "not readable" in r.getMessage() for r in caplog.records)
    assert not (folder / ".tmp-last.ckpt.123").exists()
    assert find_resume_checkpoint(tmp_path / "nowhere") is None


def test_resume_and_no_resume_touch_only_this_runs_checkpoints(tmp_path, monkeypatch):
    """The run root may be the working directory: of its files only Lightning's `hpc_ckpt_N.ckpt` are this run's.
    srun starts every rank with the same command; only rank 0 sets the old checkpoints aside."""
    io = AtomicCheckpointIO()
    for path, step in (("checkpoints/last.ckpt", 4), ("hpc_ckpt_1.ckpt", 6), ("vae.ckpt", 2000)):
        io.save_checkpoint({"global_step": step, "state_dict": {}}, tmp_path / path)

    def config(resume: bool) -> SimpleNamespace:
        trainer = SimpleNamespace(logger=False, default_root_dir=str(tmp_path), fast_dev_run=False, max_steps=10,
                                  max_epochs=None, max_time=None)  # fmt: skip
        return SimpleNamespace(ckpt_path=None, resume=resume, checkpoint=SimpleNamespace(dirpath=None), trainer=trainer)

    resuming = config(True)
    prepare_run_folder(resuming, "fit")
    assert resuming.ckpt_path == str(tmp_path / "hpc_ckpt_1.ckpt")  # not the VAE's step 2000
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    prepare_run_folder(config(False), "fit")
    assert (tmp_path / "hpc_ckpt_1.ckpt").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    prepare_run_folder(config(False), "fit")
    (archive,) = (tmp_path / "checkpoints").glob("previous-*")
    assert sorted(p.name for p in archive.iterdir()) == ["hpc_ckpt_1.ckpt", "last.ckpt"]
    assert (tmp_path / "vae.ckpt").is_file()


def test_step_checkpoints_hold_that_steps_ema(toy_shards, tmp_path):
    """A checkpoint written every N steps (or on SIGUSR1) is written at the batch end: the EMA must already have
    taken that step's update, or a run resumed from it lacks one update an uninterrupted run has."""
    fit(toy_shards, tmp_path, "--trainer.max_steps=4", "--checkpoint.save_top_k=-1", *NO_LOGGER)
    for step in (2, 4):
        path = next((tmp_path / "checkpoints").glob(f"*step={step}.ckpt"))
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert (state["global_step"], int(state["state_dict"]["ema.num_updates"])) == (step, step), path.name


NAN_MODEL = "--model.class_path=tests.faulty_models.NaNLossDiffusion"


def test_nan_steps_are_skipped_counted_and_logged(toy_shards, tmp_path):
    fit(toy_shards, tmp_path, "--trainer.max_steps=6", NAN_MODEL, "--model.init_args.nan_steps=[2, 3]",
        "--nonfinite.policy=skip")  # fmt: skip
    state = last_checkpoint(tmp_path)
    assert state["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())
    (run,) = wandb_runs(tmp_path)
    counts = {
        row["trainer/global_step"]: row["train/nonfinite_steps"]
        for row in history(run)
        if "train/nonfinite_steps" in row
    }
    assert counts == {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 2}
    adam_steps = {int(s["step"]) for s in state["optimizer_states"][0]["state"].values()}
    assert adam_steps == {4}  # 6 steps, 2 of them skipped: the optimizer applied 4 updates


def test_an_infinite_gradient_with_a_finite_loss_is_skipped(toy_shards, tmp_path, caplog):
    fit(toy_shards, tmp_path, "--trainer.max_steps=6", NAN_MODEL, "--model.init_args.inf_grad_steps=[1, 3]",
        "--nonfinite.policy=skip", *NO_LOGGER)  # fmt: skip
    state = last_checkpoint(tmp_path)
    assert state["global_step"] == 6
    assert state["callbacks"]["NonFiniteGuard"]["skipped"] == 2
    assert {int(s["step"]) for s in state["optimizer_states"][0]["state"].values()} == {4}
    assert "step 1: non-finite gradients, update skipped" in caplog.text


def test_nan_stop_policy_errors_after_k_in_a_row_and_keeps_the_last_good_checkpoint(toy_shards, tmp_path):
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row"):
        fit(toy_shards, tmp_path, "--trainer.max_steps=20", NAN_MODEL, "--model.init_args.nan_from=4",
            "--nonfinite.max_consecutive=3", "--checkpoint.save_top_k=-1", *NO_LOGGER)  # fmt: skip
    state = last_checkpoint(tmp_path)
    assert state["global_step"] == 6  # steps 4 and 5 were skipped, so the weights saved at 6 are those of step 4
    at_4 = torch.load(next((tmp_path / "checkpoints").glob("*step=4.ckpt")), weights_only=True)["state_dict"]
    for name, tensor in state["state_dict"].items():
        assert torch.isfinite(tensor).all() or not tensor.is_floating_point()
        if name.startswith("net."):
            assert torch.equal(tensor, at_4[name]), name


def test_checkpoint_with_nan_weights_is_not_written(toy_shards, tmp_path, caplog):
    """Weights that became non-finite outside the guard's reach never replace the last good checkpoint."""
    poison = ["--trainer.callbacks+=tests.faulty_models.PoisonWeights", "--trainer.callbacks.step=4"]
    with caplog.at_level(logging.ERROR, logger="gen_lightning"):
        fit(toy_shards, tmp_path, "--trainer.max_steps=6", *NO_LOGGER, *poison)
    assert last_checkpoint(tmp_path)["global_step"] == 2
    refused = [r.getMessage() for r in caplog.records if "NaN/Inf weights" in r.getMessage()]
    assert len(refused) >= 2  # step 4 and step 6, both the step checkpoint and last


@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "NaN weights"])
def test_sigusr1_saves_no_hpc_checkpoint_of_a_diverged_model(poisoned, toy_shards, tmp_path, monkeypatch, caplog):
    """The SIGUSR1 checkpoint becomes the restart's resume point: it is written for a finite model and refused, like
    the periodic ones, for a model whose weights went NaN. Either way the job stops and asks to be requeued.
    (tests/test_slurm.py runs the same path end to end on a real Slurm.)"""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a batch job to SlurmRequeue; no SLURM_NTASKS, so not to Lightning
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    requeued: list[str] = []
    monkeypatch.setattr("gen_lightning.callbacks.requeue.requeue", requeued.append)  # no scontrol here
    notice = ["--trainer.callbacks+=tests.faulty_models.SignalSelf", "--trainer.callbacks.step=3"]
    poison = ["--trainer.callbacks+=tests.faulty_models.PoisonWeights", "--trainer.callbacks.step=2"]
    grid = ["--trainer.callbacks+=gen_lightning.callbacks.SampleGrid", "--trainer.callbacks.every_n_steps=0",
            "--trainer.callbacks.num_samples=2", "--trainer.callbacks.steps=2"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="gen_lightning"):
        fit(toy_shards, tmp_path, "--trainer.max_steps=10", *NO_LOGGER, *grid, *notice, *(poison if poisoned else []))
    # No end-of-training grid: the job is within SIGUSR1's margin of being killed, so it requeues first.
    assert not (tmp_path / "samples").exists()
    assert requeued == ["4242"]
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    # The batch end that acts on the flag is step 3's or step 4's, depending on the order of the callbacks.
    said = re.search(rf"SIGUSR1: (saved|not saving) {re.escape(str(hpc))} at step (\d+)", caplog.text)
    assert said is not None and int(said.group(2)) in (3, 4), caplog.text
    if poisoned:
        assert said.group(1) == "not saving" and not hpc.exists()
        assert "NaN/Inf weights; the restarted job resumes from the last good checkpoint" in caplog.text
        assert not list((tmp_path / "checkpoints").glob("*.ckpt"))  # poisoned before the first periodic one
    else:
        assert said.group(1) == "saved"
        assert torch.load(hpc, map_location="cpu", weights_only=True)["global_step"] == int(said.group(2))
        assert last_checkpoint(tmp_path)["global_step"] <= 4  # stopped at the notice, not at max_steps
        # The restarted job resumes from the SIGUSR1 checkpoint, runs to the end and draws the final grid.
        fit(toy_shards, tmp_path, "--trainer.max_steps=6", *NO_LOGGER, *grid)
        assert [p.name for p in (tmp_path / "samples").iterdir()] == ["step_0000006.png"]


def test_sigusr1_at_the_last_step_lets_the_run_finish(toy_shards, tmp_path, monkeypatch):
    """A requeue would restart a finished run, which Lightning ends at once without its end-of-training hooks: the
    final grid would never be drawn. At max_steps the notice is ignored and the run ends normally."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    requeued: list[str] = []
    monkeypatch.setattr("gen_lightning.callbacks.requeue.requeue", requeued.append)
    notice = ["--trainer.callbacks+=tests.faulty_models.SignalSelf", "--trainer.callbacks.step=4"]
    grid = ["--trainer.callbacks+=gen_lightning.callbacks.SampleGrid", "--trainer.callbacks.every_n_steps=0",
            "--trainer.callbacks.num_samples=2", "--trainer.callbacks.steps=2"]  # fmt: skip
    fit(toy_shards, tmp_path, "--trainer.max_steps=4", *NO_LOGGER, *grid, *notice)
    assert requeued == [] and not (tmp_path / "hpc_ckpt_1.ckpt").exists()
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["step_0000004.png"]
