"""Kill-anywhere soak: SIGKILL `gen-lightning fit` at random moments, re-run the same command, and check that nothing
is lost. Used by tests/test_kill_resume.py (10 kills) and as a longer soak from the command line:

    .venv/bin/python -m bench.kill_soak --kills 50 --root DIR [--data data/emoji] [--seed 0]

DIR must be new or empty. Each round starts the fit (checkpoint every step, so many kills land mid-save), SIGKILLs
it after a random delay, then checks: every `*.ckpt` in the run loads (weights-only), the newest saved step never
goes backwards, and the next run announces it resumes from exactly that step. A final run continues to `max_steps`
and must end there. Prints `K/N kills survived, R resumes verified at the newest step`, the kills that hit an
unfinished save and the newest step after each kill; exits non-zero on the first violation.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESUMED = re.compile(r"resuming from (\S+) \(global_step (\d+)\)")


def tiny_fit_command(data: str, root: Path, max_steps: int) -> list[str]:
    """A fit of a tiny UNet at 16 px that checkpoints every step, without W&B (the process gets SIGKILLed)."""
    return [
        sys.executable,
        "-m",
        "gen_lightning.cli",
        "fit",
        f"--config={REPO / 'configs' / 'ddpm_emoji.yaml'}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={max_steps}",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.enable_progress_bar=false",
        "--checkpoint.every_n_train_steps=1",
        f"--data.train={data}",
        f"--data.val={data}",
        "--data.image_size=16",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--data.shuffle_buffer=8",
        "--model.init_args.unet.channels=[8, 16]",
        "--model.init_args.unet.attention_levels=[]",
    ]


@dataclass
class SoakReport:
    kills: int = 0
    kills_mid_save: int = 0  # a temp file of an unfinished save was on disk after the kill
    resumes_checked: int = 0
    saved_steps: list[int] = field(default_factory=list)
    final_step: int | None = None


def saved_checkpoints(root: Path) -> dict[Path, int]:
    """Every checkpoint file of the run with its global_step; raises if any is corrupt (the property under test)."""
    steps = {}
    for path in sorted([*root.glob("checkpoints/*.ckpt"), *root.glob("*.ckpt")]):
        try:
            steps[path] = int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
        except Exception as error:
            raise AssertionError(f"corrupt checkpoint after a kill: {path}: {error}") from error
    return steps


def resumed_step(log_file: Path) -> int | None:
    match = RESUMED.search(log_file.read_text(errors="replace"))
    return int(match.group(2)) if match else None


def run_to_kill(command: list[str], log_file: Path, delay: float, wait_for: Path | None = None) -> float | None:
    """Starts the command and SIGKILLs it `delay` s after it starts (or, with `wait_for`, `delay` s after that file
    appears). Returns the seconds it ran, or None when it ended by itself first."""
    start = time.monotonic()
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=soak_env())
        if wait_for is not None:
            while not wait_for.exists() and process.poll() is None and time.monotonic() - start < 300:
                time.sleep(0.1)
        try:
            process.wait(timeout=delay)
            return None
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return time.monotonic() - start


def soak_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def soak(data: str, root: Path, kills: int, seed: int = 0) -> SoakReport:
    """`kills` rounds of start → random SIGKILL → integrity checks, then a final run to completion.

    Round 0 runs until its first checkpoint exists (plus up to 2 s), which measures this machine's start-up time T;
    later rounds are killed uniformly within (0.3 s, T + 5 s): during start-up and resume, and during training and
    checkpoint writes, whatever the machine's speed."""
    rng = random.Random(seed)
    report = SoakReport()
    endless = tiny_fit_command(data, root, max_steps=100_000)
    newest, window = -1, 0.0
    for round_ in range(kills):
        log_file = root / f"round-{round_:03d}.log"
        first = root / "checkpoints" / "last.ckpt" if round_ == 0 else None
        ran = run_to_kill(endless, log_file, rng.uniform(0.0, 2.0) if first else rng.uniform(0.3, window), first)
        if ran is None:
            raise AssertionError(f"round {round_}: the fit ended before it was killed; see {log_file}")
        window = window or ran + 5.0
        report.kills += 1
        report.kills_mid_save += any(root.glob("checkpoints/.tmp-*"))
        started_at = resumed_step(log_file)
        if started_at is not None:  # None: killed before it got that far, or nothing to resume from yet
            if started_at != newest:
                raise AssertionError(f"round {round_} resumed at step {started_at}, newest saved was {newest}")
            report.resumes_checked += 1
        steps = saved_checkpoints(root)
        current = max(steps.values(), default=-1)
        if current < newest:
            raise AssertionError(f"round {round_}: newest checkpoint went back from step {newest} to {current}")
        newest = current
        report.saved_steps.append(newest)
    final_steps = max(newest, 0) + 5
    log_file = root / "final.log"
    with open(log_file, "w") as log:
        subprocess.run(tiny_fit_command(data, root, final_steps), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                       env=soak_env(), check=True, timeout=600)  # fmt: skip
    if newest >= 0 and resumed_step(log_file) != newest:
        raise AssertionError(f"final run did not resume from step {newest}; see {log_file}")
    report.resumes_checked += newest >= 0
    report.final_step = saved_checkpoints(root)[root / "checkpoints" / "last.ckpt"]
    if report.final_step != final_steps:
        raise AssertionError(f"final run ended at step {report.final_step}, expected max_steps={final_steps}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--root", default="runs/kill_soak")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()
    root = Path(ns.root)
    if root.exists() and any(root.iterdir()):
        sys.exit(f"{root} is not empty: the soak needs a fresh run folder")
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = soak(ns.data, root, ns.kills, ns.seed)
    minutes = (time.perf_counter() - start) / 60
    print(f"{report.kills}/{ns.kills} kills survived, {report.resumes_checked} resumes verified at the newest step")
    print(f"kills that hit an unfinished save: {report.kills_mid_save}; final step {report.final_step}")
    print(f"newest saved step after each kill: {report.saved_steps}; {minutes:.1f} min")


if __name__ == "__main__":
    main()
