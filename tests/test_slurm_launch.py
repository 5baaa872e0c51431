"""SLURM launch checks that fail fast instead of hanging (the real-cluster behaviour is in test_slurm.py)."""

from __future__ import annotations

import pytest

from gen_lightning.cli import main
from gen_lightning.slurm import slurm_launch_error
from tests.conftest import tiny_fit_args

JOB = {"SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "fit", "SLURM_NNODES": "1"}
SRUN_TASK = {**JOB, "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}


@pytest.mark.parametrize(
    ("env", "devices", "num_nodes", "expected"),
    [
        ({}, 4, 1, None),  # not under SLURM
        ({**JOB, "SLURM_JOB_NAME": "bash", "SLURM_NTASKS": "2"}, 1, 1, None),  # interactive allocation
        (SRUN_TASK, 2, 1, None),
        (SRUN_TASK, "2", 1, None),
        (SRUN_TASK, [0, 1], 1, None),
        (SRUN_TASK, "auto", 1, None),  # Lightning resolves it (and validates it)
        ({k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}, 2, 1, "not by srun"),
        ({**JOB, "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, 2, 1, "no --ntasks-per-node"),
        (SRUN_TASK, 4, 1, "--trainer.devices=4 but SLURM runs 2 task(s) per node"),
        (SRUN_TASK, "0,1,2", 1, "--trainer.devices=0,1,2"),
        ({**SRUN_TASK, "SLURM_NNODES": "2"}, 2, 1, "--trainer.num_nodes=1 but the SLURM job has 2 node(s)"),
    ],
)
def test_slurm_launch_error(env, devices, num_nodes, expected):
    problem = slurm_launch_error(env, devices, num_nodes)
    assert problem is None if expected is None else expected in problem


def test_fit_refuses_a_mismatched_slurm_launch_before_building_anything(toy_shards, tmp_path, monkeypatch):
    for key, value in SRUN_TASK.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match="SLURM runs 2 task"):
        main(["fit", *tiny_fit_args(toy_shards, tmp_path, "--trainer.devices=1")])
    assert not (tmp_path / "checkpoints").exists()
