"""A SIGKILLed fit leaves no process behind: its loader workers die with it at once (PR_SET_PDEATHSIG, set in each
worker's init), and W&B's helper processes (offline mode) exit by themselves soon after."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen_lightning.data.datamodule import die_with_parent
from tests.conftest import REPO, tiny_fit_args

WORKERS_GONE_WITHIN_S = 2.0  # the kernel kills them as the fit dies; PyTorch's own check polls every 5 s
ALL_GONE_WITHIN_S = 20.0  # W&B's processes watch their parent themselves


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(child) for child in (task / "children").read_text().split())
    return found


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        try:
            new = children(todo.pop()) - found
        except FileNotFoundError:  # ended meanwhile
            continue
        found |= new
        todo += new
    return found


def start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), or None once it has ended: with the pid, it tells a
    process from a later one that reuses the pid. A zombie has ended (init collects its exit status)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return None
    return None if fields[0] in "ZX" else fields[19]


def running(seen: dict[int, str]) -> list[int]:
    return [pid for pid, started in seen.items() if start_time(pid) == started]


def loader_workers(fit: int, seen: dict[int, str]) -> list[int]:
    """The fit's forked children that run the fit's own command line: its DataLoader workers."""
    command = Path(f"/proc/{fit}/cmdline").read_bytes()
    workers = []
    for pid in seen:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == command:
                workers.append(pid)
        except FileNotFoundError:
            continue
    return workers


def wait_until(condition, timeout: float) -> float:
    start = time.monotonic()
    while not condition() and time.monotonic() - start < timeout:
        time.sleep(0.05)
    return time.monotonic() - start


def kill_once_workers_run(args: list[str], workers: int, settle: float) -> tuple[list[int], dict[int, str]]:
    """Starts `gen-lightning fit ARGS`, waits for its `workers` loader workers and `settle` seconds more, SIGKILLs it:
    (the workers' pids, {pid: start time} of every process it had started)."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "gen_lightning.cli", "fit", *args]
    fit = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, str] = {}

    def look() -> bool:
        for pid in descendants(fit.pid) - set(seen):
            started = start_time(pid)
            if started is not None:
                seen[pid] = started
        return len(loader_workers(fit.pid, seen)) >= workers or fit.poll() is not None

    try:
        wait_until(look, 120)
        assert fit.poll() is None, "the fit ended before its workers started"
        start = time.monotonic()
        wait_until(lambda: look() and time.monotonic() - start > settle, settle + 1)
        return loader_workers(fit.pid, seen), seen
    finally:
        fit.kill()
        fit.wait()


def end_all(seen: dict[int, str]) -> None:
    for pid in running(seen):  # leave nothing behind, whatever the outcome
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")
def test_a_killed_fit_leaves_no_process_behind(toy_shards, tmp_path):
    """Mid-epoch: 2 persistent val workers (from the sanity check) and 2 train workers. Without PR_SET_PDEATHSIG they
    outlive the fit by up to 5 s here (PyTorch's workers look for their parent between batches, every 5 s)."""
    args = tiny_fit_args(toy_shards, tmp_path, "--data.num_workers=2", "--trainer.max_steps=100000")
    workers, seen = kill_once_workers_run(args, workers=4, settle=3)
    try:
        assert len(workers) == 4, workers
        workers_gone = wait_until(lambda: not running({pid: seen[pid] for pid in workers}), 10)
        all_gone = wait_until(lambda: not running(seen), ALL_GONE_WITHIN_S)
        assert workers_gone < WORKERS_GONE_WITHIN_S, f"loader workers outlived the fit by {workers_gone:.1f} s"
        assert all_gone < ALL_GONE_WITHIN_S, f"still running after the fit was killed: {running(seen)}"
    finally:
        end_all(seen)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")
def test_workers_blocked_in_a_read_die_with_the_fit(toy_shards, tmp_path):
    """A worker waiting on a stalled stream (here a `pipe:` shard that sends nothing for a minute) never gets to
    PyTorch's check for its parent: without PR_SET_PDEATHSIG it outlives a killed fit as long as the read blocks.
    (The pipe's own command is the worker's child: it ends when it next writes, or by itself, and is not checked.)"""
    stalled = f"pipe:sleep 60; cat {toy_shards}/val-000000.tar"
    args = tiny_fit_args(toy_shards, tmp_path, "--data.num_workers=2", f"--data.val={stalled}")
    workers, seen = kill_once_workers_run(args, workers=2, settle=1)  # the sanity check's val workers, waiting
    try:
        assert len(workers) == 2, workers
        workers_gone = wait_until(lambda: not running({pid: seen[pid] for pid in workers}), 10)
        assert workers_gone < WORKERS_GONE_WITHIN_S, f"loader workers outlived the fit by {workers_gone:.1f} s"
    finally:
        end_all(seen)


def worker_init_then_report(parent: int) -> None:
    """In a forked child: the loader worker's init, then exit with the signal it asked for at its parent's death."""
    die_with_parent(parent, worker_id=0)
    deathsig = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(deathsig), 0, 0, 0)  # PR_GET_PDEATHSIG
    os._exit(deathsig.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_init_asks_for_sigkill_and_exits_if_its_parent_is_gone_already():
    fork = multiprocessing.get_context("fork")
    worker = fork.Process(target=worker_init_then_report, args=(os.getpid(),))
    worker.start()
    worker.join(30)
    assert worker.exitcode == signal.SIGKILL  # parent alive: the kernel will kill it when the parent dies
    # The parent died between fork and prctl: the worker then already has another parent, and must not run on.
    orphan = fork.Process(target=worker_init_then_report, args=(os.getpid() + 1_000_000,))
    orphan.start()
    orphan.join(30)
    assert orphan.exitcode == 1
