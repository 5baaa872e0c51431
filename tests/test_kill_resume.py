"""Kill-anywhere resume: 10 SIGKILLs of a real `gen-lightning fit` process at random moments (bench/kill_soak.py has
the harness and the longer soak)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from bench.kill_soak import REPO, resumed_step, saved_checkpoints, soak, soak_env, tiny_fit_command


@pytest.mark.slow
def test_ten_random_sigkills_never_lose_or_corrupt_a_checkpoint(toy_shards, tmp_path):
    report = soak(str(toy_shards), tmp_path, kills=10, seed=1)
    assert report.kills == 10
    assert report.saved_steps[-1] > 0, "no kill came after the first checkpoint: the delays are too short"
    assert report.resumes_checked >= 3  # resumed runs that announced their step, each checked against the newest
    assert report.final_step == report.saved_steps[-1] + 5


@pytest.mark.slow
@pytest.mark.parametrize("to_the_group", [False, True], ids=["fit-process", "process-group-with-loader-workers"])
def test_sigterm_saves_the_current_step_and_the_rerun_resumes_there(toy_shards, tmp_path, to_the_group):
    """SIGTERM (SLURM's time limit) between periodic checkpoints: `last` gets the step reached, not the older one.

    SLURM signals every process of the job, loader workers too (as `kill -- -PGID` does): a worker that died of it
    made the fit fail with "DataLoader worker is killed by signal" before it could save."""
    command = [*tiny_fit_command(str(toy_shards), tmp_path, max_steps=100_000), "--checkpoint.every_n_train_steps=3"]
    if to_the_group:
        command.append("--data.num_workers=2")  # after tiny_fit_command's 0: the last value wins
    last = tmp_path / "checkpoints" / "last.ckpt"
    log_file = tmp_path / "sigterm.log"
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=soak_env(),
                                   start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while not last.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # a few more steps past the periodic checkpoint
        if to_the_group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_file.read_text()[-3000:]
    saved = re.search(r"SIGTERM: saved (\S+) at step (\d+)", log_file.read_text())
    assert saved, log_file.read_text()[-3000:]
    step = int(saved.group(2))
    assert step > 3  # past the first periodic checkpoint: the SIGTERM save, not a periodic one
    assert saved_checkpoints(tmp_path)[last] == step
    rerun = tmp_path / "rerun.log"
    with open(rerun, "w") as log:
        periodic = "--checkpoint.every_n_train_steps=3"
        rerun_command = [*(arg for arg in command if arg != periodic), f"--trainer.max_steps={step + 2}"]
        subprocess.run(rerun_command, stdout=log, stderr=subprocess.STDOUT,
                       cwd=REPO, env=soak_env(), check=True, timeout=300)  # fmt: skip
    assert resumed_step(rerun) == step
