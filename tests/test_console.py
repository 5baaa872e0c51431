"""A clean console: every line of a fit printed once, in one log format, without the library messages known not to
apply here (each silenced narrowly in gen_lightning.console), and with those that can mean something kept."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.conftest import REPO, tiny_fit_args

NOISE = (
    "litlogger",  # Lightning's advertisement
    "The `srun` command is available on your system but is not used",  # outside SLURM: nothing to launch with srun
    "The anonymous setting has no effect",  # wandb, about an argument Lightning passes
    "LeafSpec",  # a torch deprecation inside Lightning
    "has `__len__` defined",  # Lightning's multi-worker concern, handled by the DataModule
    "FLOPs",  # a FLOPs column of zeros: Lightning counts FLOPs only with an example_input_array
    "Total Flops",
    "all_gather is deprecated",  # a torch deprecation inside Lightning (DDP)
    "sync_dist=True)` when logging",  # about a count DataThroughput reduces over ranks itself (DDP)
)


def console_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: W&B not silenced, no SLURM job, and an `srun` on PATH (a stub) as on a
    cluster's login node, so Lightning's srun hint would be printed if it were not silenced."""
    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "WANDB_SILENT"))}
    return {**env, "PATH": f"{stub.parent}:{env['PATH']}", "WANDB_MODE": "offline", **extra}


def run(command: list[str], env: dict[str, str]) -> str:
    """stdout + stderr (pipes, not a terminal) of a command that must succeed."""
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


LOG_PREFIX = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)( [\w.]+)?: ")


def repeated_lines(output: str) -> list[str]:
    """Messages printed more than once, whatever log prefix each copy has ("INFO: x" and "INFO lightning...: x" are
    one message twice), leaving out table rules and W&B's empty `wandb:` spacer lines."""
    messages = [LOG_PREFIX.sub("", line.strip()) for line in output.splitlines()]
    meaningful = [message for message in messages if re.search(r"\w", message.removeprefix("wandb:"))]
    return [message for message, count in Counter(meaningful).items() if count > 1]


def test_fast_dev_run_prints_each_line_once_and_no_known_noise(toy_shards, tmp_path):
    args = tiny_fit_args(toy_shards, tmp_path / "run", "--trainer.fast_dev_run=true", "--data.num_workers=2")
    output = run([sys.executable, "-m", "gen_lightning.cli", "fit", *args], console_env(tmp_path))
    assert repeated_lines(output) == [], output
    assert [message for message in NOISE if message in output] == [], output
    assert "INFO: GPU available: False, used: False" in output  # Lightning's own lines still print, once
    assert "Trainable params" in output  # the model summary still prints, without its FLOPs column


def test_a_logged_fit_prints_no_wandb_anonymous_warning(toy_shards, tmp_path):
    args = tiny_fit_args(
        toy_shards,
        tmp_path / "run",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=1",
        "--trainer.callbacks.num_samples=2",  # the config's final SampleGrid: small and quick
        "--trainer.callbacks.steps=2",
    )
    output = run([sys.executable, "-m", "gen_lightning.cli", "fit", *args], console_env(tmp_path))
    assert "wandb: Tracking run with wandb" in output  # W&B ran and printed
    assert "anonymous" not in output, output
    assert repeated_lines(output) == [], output


LOG_PROBE = """
import logging, warnings
from gen_lightning.console import configure_console
configure_console()
import lightning
from lightning.pytorch.utilities.rank_zero import rank_zero_info
rank_zero_info("hello from lightning")
logging.getLogger("gen_lightning.probe").info("hello from gen_lightning")
logging.getLogger("some_library").info("library chatter")
logging.getLogger("some_library").warning("library warning")
lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
"""


def test_log_lines_print_once_in_one_format(tmp_path):
    output = run([sys.executable, "-c", LOG_PROBE], console_env(tmp_path))
    lines = output.splitlines()
    assert lines.count("INFO: hello from lightning") == 1  # Lightning's handler prints it; the root handler does not
    assert lines.count("INFO: hello from gen_lightning") == 1
    assert "WARNING: library warning" in lines
    assert "library chatter" not in output  # other libraries' INFO stays quiet
    assert "srun" not in output and "litlogger" not in output
    assert repeated_lines(output) == [], output


def test_the_srun_hint_stays_inside_a_slurm_job(tmp_path):
    output = run([sys.executable, "-c", LOG_PROBE], console_env(tmp_path, SLURM_JOB_ID="123"))
    assert "The `srun` command is available on your system but is not used" in output


def test_a_ddp_fit_prints_each_line_once(toy_shards, tmp_path):
    """Two gloo processes: progress from rank 0 only, and no message twice (one per rank)."""
    args = tiny_fit_args(
        toy_shards,
        tmp_path / "run",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2",
        "--trainer.callbacks.num_samples=2",
        "--trainer.callbacks.steps=2",
        "--model.init_args.channels_last=true",  # the configs' default, stated: DDP's buckets must match it
    )
    output = run([sys.executable, "-m", "gen_lightning.cli", "fit", *args], console_env(tmp_path))
    assert repeated_lines(output) == [], output
    # torch's hint that each backward copies gradients between layouts (NHWC weights converted after DDP was built)
    assert "Grad strides do not match bucket view strides" not in output, output
    assert [message for message in NOISE if message in output] == [], output
    assert re.findall(r"^train: step 2/2 ", output, re.MULTILINE) == ["train: step 2/2 "]


def lightning_eval_mode_warnings(model: object) -> list[str]:
    """The messages Lightning's own start-of-training check (FitLoop._warn_if_modules_in_eval_mode) warns with."""
    import warnings
    from types import SimpleNamespace

    from lightning.pytorch.loops.fit_loop import _FitLoop

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from gen_lightning.console import silence_frozen_eval_warning

        silence_frozen_eval_warning(model)
        _FitLoop._warn_if_modules_in_eval_mode(SimpleNamespace(trainer=SimpleNamespace(lightning_module=model)))
    return [str(w.message) for w in caught if "eval mode" in str(w.message)]


def test_eval_mode_warning_silenced_only_for_frozen_parts():
    from torch import nn

    def frozen() -> nn.Module:
        return nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval().requires_grad_(False)

    assert lightning_eval_mode_warnings(nn.Sequential(nn.Linear(2, 2), frozen())) == []  # a frozen VAE, say
    left_in_eval = nn.Sequential(nn.Linear(2, 2).eval(), frozen())  # a trainable layer in eval mode by mistake
    (message,) = lightning_eval_mode_warnings(left_in_eval)
    assert message.startswith("Found 4 module(s) in eval mode")
