"""A run folder (`trainer.default_root_dir`) holds one training run. Re-running the same `fit` command there continues
it: from its newest complete checkpoint, in the same W&B run; a run that already finished says so and trains nothing.

The W&B run id belongs to the folder from the first start (`run.json`, written atomically before training), not to
the first checkpoint: a start killed before its first checkpoint (OOM, node failure, a SLURM requeue) logs into the
same W&B run as every later start. `--no-resume` sets the folder's checkpoints and run file aside and starts a new run.

A smoke test (`fast_dev_run`) and a `validate`/`test` without `--ckpt_path` leave no trace and find none: they neither
resume nor write checkpoints, W&B runs or run files.

srun starts every rank with the same command, so every rank runs this: they read the same folder and decide alike;
only global rank 0 writes or moves files (the others' moves of the same files would fail).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only

from gen_lightning.atomic import write_bytes_atomic
from gen_lightning.checkpointing import (
    CheckpointSummary,
    checkpoint_files,
    find_resume_checkpoint,
    read_checkpoint_summary,
    set_aside,
)

log = logging.getLogger("gen_lightning")

RUN_FILE = "run.json"
WANDB_LOGGER = "WandbLogger"


class RunComplete(Exception):
    """The run folder's newest checkpoint already reached the fit's stopping point: nothing to train."""


def prepare_run_folder(config: Any, subcommand: str) -> None:
    """Set the LightningCLI `config` of `subcommand` up for its run folder (resume point, W&B run id). Raises
    RunComplete when re-running a fit that has already finished."""
    root = Path(config.trainer.default_root_dir or os.getcwd())
    if leaves_no_trace(config, subcommand):
        # fast_dev_run: Lightning swaps every logger for a dummy (and RunCheckpoint saves nothing). Validating fresh
        # weights has no run to log into.
        if not config.trainer.fast_dev_run:
            config.trainer.logger = False
        return
    point_wandb_at(config, root)
    if subcommand != "fit":
        return
    checkpoint_dir = Path(config.checkpoint.dirpath or root / "checkpoints")
    if config.ckpt_path is not None:  # an explicit resume point continues its W&B run
        stored = read_checkpoint_summary(Path(config.ckpt_path))
        use_wandb_id(config, stored.wandb_id if stored else None)
        return
    if not config.resume:
        start_fresh(config, root, checkpoint_dir)
        return
    found = find_resume_checkpoint(checkpoint_dir, root)
    if wandb_loggers(config):
        use_wandb_id(config, folder_wandb_id(root, legacy=found[1].wandb_id if found else None))
    if found is None:
        return
    path, summary = found
    if reason := completed(summary, config.trainer):
        raise RunComplete(
            f"run complete: {path} is at global_step {summary.global_step} ({reason}); nothing to train. "
            "Raise --trainer.max_steps (or max_epochs) to train further, or pass --no-resume to start over."
        )
    config.ckpt_path = str(path)
    log.info("resuming from %s (global_step %d); --no-resume starts fresh", path, summary.global_step)


def leaves_no_trace(config: Any, subcommand: str) -> bool:
    """A smoke test: fast_dev_run, or validate/test of fresh weights (no --ckpt_path)."""
    return bool(config.trainer.fast_dev_run) or (subcommand != "fit" and config.ckpt_path is None)


def completed(summary: CheckpointSummary, trainer: Any) -> str | None:
    """Why the fit that wrote `summary` needs no more training under the Trainer config `trainer`, or None (raising
    the limit it stopped at continues the run)."""
    if trainer.max_steps is not None and 0 < trainer.max_steps <= summary.global_step:
        return f"max_steps={trainer.max_steps} reached"
    reason = (summary.finished or {}).get("reason")
    if reason == "max_epochs" and 0 < epoch_limit(trainer) <= summary.epoch:
        return f"max_epochs={epoch_limit(trainer)} reached"
    if reason == "max_time" and summary.finished.get("max_time") == time_limit(trainer):
        return f"max_time={trainer.max_time} reached"
    if reason == "stopped early":  # EarlyStopping, or a callback's should_stop: it would stop again at once
        return "stopped early; an explicit --ckpt_path continues it"
    return None


def epoch_limit(trainer: Any) -> int:
    """Trainer's max_epochs as Lightning applies it (unset: 1000 epochs without a step or time limit, else none)."""
    if trainer.max_epochs is not None:
        return int(trainer.max_epochs)
    return 1000 if trainer.max_steps in (None, -1) and trainer.max_time is None else -1


def time_limit(trainer: Any) -> float | None:
    from lightning.pytorch.callbacks import Timer

    from gen_lightning.callbacks.checkpoint import timer_duration

    return None if trainer.max_time is None else timer_duration(Timer(duration=trainer.max_time))


def point_wandb_at(config: Any, root: Path) -> None:
    """The run's W&B files live with its checkpoints, unless the config puts them elsewhere."""
    for logger in wandb_loggers(config):
        if logger.init_args.get("save_dir") in (None, "", "."):
            logger.init_args.save_dir = str(root)
            if rank_zero_only.rank == 0:
                root.mkdir(parents=True, exist_ok=True)


def start_fresh(config: Any, root: Path, checkpoint_dir: Path) -> None:
    """--no-resume: the folder's earlier checkpoints and run file are set aside (never deleted); a new W&B run."""
    earlier = checkpoint_files(checkpoint_dir, root)
    if (root / RUN_FILE).is_file():
        earlier.append(root / RUN_FILE)
    if rank_zero_only.rank == 0 and earlier:
        archive = set_aside(earlier, checkpoint_dir)
        log.warning("--no-resume: starting at step 0; %d earlier file(s) moved to %s", len(earlier), archive)
    if wandb_loggers(config):
        use_wandb_id(config, folder_wandb_id(root, legacy=None, fresh=True))


def folder_wandb_id(root: Path, legacy: str | None, fresh: bool = False) -> str | None:
    """The W&B run id of the run folder `root`: the one in its run file, else (a folder from before run files) the one
    its newest checkpoint stored, else a new one; written to the run file on rank 0. `fresh` always makes a new one."""
    path = root / RUN_FILE
    if not fresh and (stored := read_run_file(path)):
        return stored
    if rank_zero_only.rank != 0:
        return None  # only rank 0 logs to W&B; it alone decides and writes the id
    run_id = legacy or new_wandb_id()
    write_bytes_atomic(path, (json.dumps({"wandb_id": run_id}, indent=2) + "\n").encode())
    return run_id


def read_run_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        run_id = json.loads(path.read_text()).get("wandb_id")
    except (json.JSONDecodeError, AttributeError) as error:
        raise SystemExit(f"gen-lightning: {path} is not a gen_lightning run file ({error}); move it away") from None
    return str(run_id) if run_id else None


def new_wandb_id() -> str:
    # The alphabet and length of wandb.util.generate_id(), without importing wandb here.
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_loggers(config: Any) -> list[Any]:
    loggers = config.trainer.logger
    return [lg for lg in (loggers if isinstance(loggers, list) else [loggers]) if is_wandb(lg)]


def is_wandb(logger: Any) -> bool:
    return str(getattr(logger, "class_path", "")).endswith(WANDB_LOGGER)


def use_wandb_id(config: Any, run_id: str | None) -> None:
    """Log into the W&B run `run_id`, unless the config names a run id itself."""
    for logger in wandb_loggers(config):
        if run_id and not logger.init_args.get("id"):
            logger.init_args.id = run_id  # WandbLogger passes resume="allow": the same run continues
