"""The project's sbatch templates on a real one-node Slurm (tests/slurm_cluster.py): preemption by SIGUSR1 checkpoints,
requeues, resumes at the saved step with the same W&B run id, and finishes; wrong launches fail fast and say why."""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gen_lightning.slurm import slurm_job_id
from tests import slurm_cluster
from tests.conftest import REPO, tiny_fit_args
from tests.wandb_reader import history, run_id

TEMPLATES = ("slurm/single_node.sbatch", "slurm/multi_node.sbatch")
# The CPU shape of the templates: 2 gloo DDP processes on the test node (sbatch options win over #SBATCH lines).
CPU_SHAPE = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10")
RESUMED = re.compile(r"resuming from (\S+) \(global_step (\d+)\)")


@pytest.fixture(scope="module")  # only this module needs it: the daemons stop when its tests are done
def slurm(tmp_path_factory) -> Iterator[slurm_cluster.SlurmCluster]:
    if reason := slurm_cluster.missing_reason():
        if os.environ.get("CI"):  # CI runs as root with apt: a skip there would hide a broken SLURM path
            pytest.fail(reason)
        pytest.skip(reason)
    with slurm_cluster.running(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def fit_args(shards: Path, *extra: str) -> list[str]:
    """tiny_fit_args without --config and the run folder: the template takes the config as its first argument and
    sets --trainer.default_root_dir itself (from RUN_DIR)."""
    args = tiny_fit_args(shards, Path("unused"), *extra)
    config = args.index("--config")
    del args[config : config + 2]
    return [arg for arg in args if not arg.startswith("--trainer.default_root_dir")]


def submit(slurm: slurm_cluster.SlurmCluster, folder: Path, *script: str, **env: str) -> tuple[str, Path]:
    """sbatch `script` (a template and its arguments, or --wrap) with the CPU shape from the repository root, as a
    user would; returns the job id and its output file."""
    folder.mkdir(parents=True, exist_ok=True)  # Slurm does not create the output's folder (the job just fails)
    output = folder / "job.out"
    job_env = {"RUN_DIR": str(folder / "run"), "WANDB_MODE": "offline", **slurm.job_env(), **env}
    job = slurm.sbatch(*CPU_SHAPE, f"--output={output}", *script, cwd=REPO, env=job_env)
    return job, output


def diagnostics(slurm: slurm_cluster.SlurmCluster, job: str, output: Path) -> str:
    """What a CI failure needs: the job's state, its output and the daemons' logs."""
    text = output.read_text(errors="replace")[-12000:] if output.exists() else "(no job output)"
    return f"scontrol: {slurm.job_info(job)}\n--- job output ---\n{text}\n{slurm.logs()}"


def wait_for_file(slurm: slurm_cluster.SlurmCluster, job: str, path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and slurm.job_state(job) is not None:
        if path.exists():
            return True
        time.sleep(0.2)
    return path.exists()


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "interactive"}, None),  # salloc shell: not a batch job to requeue
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "fit"}, "7"),
        ({"SLURM_JOB_ID": "9", "SLURM_JOB_NAME": "fit", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2"}, "7_2"),
    ],
)
def test_requeue_targets_the_job_or_its_array_task(env, expected):
    assert slurm_job_id(env) == expected


def test_templates_share_one_body_and_the_requeue_settings():
    """multi_node.sbatch differs from single_node.sbatch in its header only, so the CPU run below proves both."""
    single, multi = ((REPO / name).read_text() for name in TEMPLATES)
    for text in (single, multi):
        for directive in ("--signal=SIGUSR1@90", "--requeue", "--open-mode=append", "--ntasks-per-node", "--nodes"):
            assert f"#SBATCH {directive}" in text
        assert 'srun --kill-on-bad-exit=1 gen-lightning fit --config "$CONFIG"' in text

    def body(text: str) -> str:
        return text[text.index("set -euo pipefail") :].replace("multi_node", "single_node")

    assert body(single) == body(multi)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigusr1_checkpoints_requeues_and_resumes_with_the_same_wandb_run(slurm, toy_shards, tmp_path):
    max_steps, every = 150, 50
    args = fit_args(
        toy_shards,
        f"--trainer.max_steps={max_steps}",
        f"--checkpoint.every_n_train_steps={every}",
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=10",
        "--trainer.enable_progress_bar=false",
        "--no-resume",  # "start this submission fresh": the template must drop it when the job restarts
    )
    job, output = submit(slurm, tmp_path, "slurm/single_node.sbatch", "configs/ddpm_emoji.yaml", *args)
    run = tmp_path / "run"
    info = lambda: diagnostics(slurm, job, output)  # noqa: E731 (evaluated only when an assertion fails)

    # Mid-run: the first periodic checkpoint (step 50 of 150) is on disk, the next one is ~6 s of training away.
    assert wait_for_file(slurm, job, run / "checkpoints" / "last.ckpt", timeout=180), info()
    slurm.run("scancel", "--signal=USR1", "--full", job)
    assert slurm.wait_until_gone(job, timeout=240), info()

    state = slurm.job_info(job)
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", info()
    assert state.get("Restarts") == "1", info()
    log = output.read_text(errors="replace")
    assert f"job {job} start 1 " in log and f"job {job} start 2 " in log, info()  # one log, appended

    # SIGUSR1 → at the next batch end every rank joins the hpc checkpoint, fit stops, rank 0 requeues; the restart
    # resumes exactly there (not at 0, not at the periodic checkpoint) and runs to max_steps.
    hpc_step = step_of(run / "hpc_ckpt_1.ckpt")
    assert hpc_step >= every and "requeued SLURM job" in log, info()
    resumed = RESUMED.search(log)
    assert resumed is not None and int(resumed.group(2)) == hpc_step, info()
    assert step_of(run / "checkpoints" / "last.ckpt") == max_steps, info()

    # One W&B run, continued: two offline folders (one per start), both complete, with the same id; the first
    # logged up to the preemption, the second from the resume on.
    first, second = sorted((run / "wandb").glob("offline-run-*"))
    assert run_id(first) == run_id(second), info()
    assert logged_steps(first) and max(logged_steps(first)) <= hpc_step, info()
    assert logged_steps(second) and min(logged_steps(second)) >= hpc_step, info()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_the_job_saves_the_step_reached_with_loader_workers_running(slurm, toy_shards, tmp_path):
    """What preemption (PreemptMode=REQUEUE) and the time limit send: SIGTERM to every process of the job's steps,
    the data-loader workers included. Each rank stops at its next batch end and rank 0 saves `last` at that step;
    a worker killed by the signal used to fail the fit ("DataLoader worker is killed by signal") before it saved."""
    every = 50
    args = fit_args(
        toy_shards,
        "--trainer.max_steps=100000",
        f"--checkpoint.every_n_train_steps={every}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--data.num_workers=1",  # per rank, after fit_args' 0: the last value wins
    )
    job, output = submit(slurm, tmp_path, "slurm/single_node.sbatch", "configs/ddpm_emoji.yaml", *args)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    info = lambda: diagnostics(slurm, job, output)  # noqa: E731 (evaluated only when an assertion fails)

    assert wait_for_file(slurm, job, last, timeout=180), info()
    time.sleep(2.0)  # some steps past the periodic checkpoint
    slurm.run("scancel", "--signal=TERM", job)  # the job steps' processes, as the scheduler's own SIGTERM
    assert slurm.wait_until_gone(job, timeout=120), info()

    log = output.read_text(errors="replace")
    saved = re.search(r"SIGTERM: saved (\S+) at step (\d+)", log)
    assert saved is not None and "DataLoader worker" not in log, info()
    # A clean console: no traceback (from the fit or from wandb's exit hook), no Lightning line saying it ignores it.
    assert "Traceback" not in log and "Bypassing SIGTERM" not in log, info()
    assert int(saved.group(2)) > every and step_of(last) == int(saved.group(2)), info()
    state = slurm.job_info(job)
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", info()


def logged_steps(run_dir: Path) -> list[int]:
    return [row["trainer/global_step"] for row in history(run_dir) if "train/loss" in row]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wrong_launch_shapes_fail_fast_with_a_reason(slurm, toy_shards, tmp_path):
    """Neither hangs until the time limit: the template's own GPU/task check, and gen-lightning's devices check for a
    hand-written srun line (the template derives --trainer.devices, so it cannot produce that mismatch)."""
    # No GPUs here: SLURM_GPUS_ON_NODE is what Slurm sets in a job that got 4 GPUs per node.
    gpus, gpus_out = submit(slurm, tmp_path / "gpus", "slurm/multi_node.sbatch", "configs/ddpm_emoji.yaml",
                            SLURM_GPUS_ON_NODE="4")  # fmt: skip
    fit = ["srun", str(REPO / ".venv/bin/gen-lightning"), "fit", "--config", "configs/ddpm_emoji.yaml"]
    wrap = shlex.join([*fit, *fit_args(toy_shards), "--trainer.devices=1", f"--trainer.default_root_dir={tmp_path}"])
    devices, devices_out = submit(slurm, tmp_path / "devices", "--wrap", wrap)
    for job, output, reason in (
        (gpus, gpus_out, "4 GPU(s) per node but 2 task(s) per node"),
        (devices, devices_out, "SLURM runs 2 task(s) per node"),
    ):
        assert slurm.wait_until_gone(job, timeout=120), diagnostics(slurm, job, output)
        assert slurm.job_info(job).get("JobState") == "FAILED", diagnostics(slurm, job, output)
        assert reason in output.read_text(errors="replace"), diagnostics(slurm, job, output)
