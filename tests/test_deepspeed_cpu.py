"""DeepSpeed ZeRO-2 fits on the CPU (tests/deepspeed_cpu.py), each in its own interpreter: the preset's first step,
and its checkpoint folders as resume points: a SIGUSR1 checkpoint is found and resumed by re-running the command,
and the finished run reports itself complete."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from jsonargparse import Namespace

from gen_lightning.checkpointing import find_resume_checkpoint, read_checkpoint_summary
from gen_lightning.strategy_config import give_deepspeed_the_batch_size
from tests.conftest import REPO, toy_data_args

TINY_CLIP = ["--model.init_args.vision.width=16", "--model.init_args.vision.layers=1",
             "--model.init_args.text.width=16", "--model.init_args.text.layers=1", "--model.init_args.embed_dim=16",
             "--model.init_args.vision.heads=2", "--model.init_args.text.heads=2"]  # fmt: skip
DEEPSPEED = '--trainer.strategy={"class_path": "tests.deepspeed_cpu.CPUDeepSpeedStrategy", "init_args": {"stage": 2}}'


def fit(shards: Path, root: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    args = [*toy_data_args(shards, root, "configs/clip_emoji.yaml"), *TINY_CLIP, DEEPSPEED,
            "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.val_check_interval=100", *extra]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "gen_lightning.cli", "fit", *args],
        env={**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}, cwd=REPO, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_sigusr1_checkpoint_of_a_deepspeed_fit_is_resumed_by_rerunning_the_command(toy_shards, tmp_path):
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train"}  # a batch job to SlurmRequeue only (no SLURM_NTASKS)
    notice = ["--trainer.callbacks+=tests.faulty_models.SignalSelf", "--trainer.callbacks.step=2"]
    said = fit(toy_shards, tmp_path, "--trainer.max_steps=6", *notice, env=slurm)
    saved = re.search(r"SIGUSR1: saved (\S+) at step (\d+)", said)
    assert saved is not None, said[-3000:]
    hpc = Path(saved.group(1))
    assert hpc.is_dir() and (hpc / "latest").is_file()  # a DeepSpeed checkpoint folder
    step = int(saved.group(2))
    assert read_checkpoint_summary(hpc).global_step == step
    path, summary = find_resume_checkpoint(tmp_path / "checkpoints", tmp_path)
    assert summary.global_step == step  # the hpc folder, or a last.ckpt folder of the same step

    said = fit(toy_shards, tmp_path, "--trainer.max_steps=6")  # the requeued job: the same command
    assert f"resuming from {path} (global_step {step})" in said
    path, summary = find_resume_checkpoint(tmp_path / "checkpoints", tmp_path)
    assert (path.name, summary.global_step, summary.finished["reason"]) == ("last.ckpt", 6, "max_steps")
    assert "run complete" in fit(toy_shards, tmp_path, "--trainer.max_steps=6")


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "ddp", "auto"])
def test_deepspeed_is_given_the_datamodule_batch_size(strategy):
    config = Namespace(trainer=Namespace(strategy=strategy), data=Namespace(batch_size=24))
    give_deepspeed_the_batch_size(config)
    if strategy.startswith("deepspeed"):
        resolved = config.trainer.strategy
        assert resolved.class_path == "lightning.pytorch.strategies.deepspeed.DeepSpeedStrategy"
        assert (resolved.init_args.stage, resolved.init_args.logging_batch_size_per_gpu) == (2, 24)
    else:
        assert config.trainer.strategy == strategy
    preset = Namespace(class_path="lightning.pytorch.strategies.DeepSpeedStrategy",
                       init_args=Namespace(stage=3, logging_batch_size_per_gpu=7))  # fmt: skip
    config = Namespace(trainer=Namespace(strategy=preset), data=Namespace(batch_size=24))
    give_deepspeed_the_batch_size(config)
    assert config.trainer.strategy.init_args.logging_batch_size_per_gpu == 7  # a value the config sets wins
