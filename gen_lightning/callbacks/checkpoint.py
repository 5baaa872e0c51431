"""Checkpoints under `<default_root_dir>/checkpoints` (not inside the logger's folder), so a run's files and its
resume point are found from the one directory the user chose. Written atomically (gen_lightning.checkpointing),
never with non-finite weights, and carrying the logger run ids so a resumed run logs to the same W&B run."""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gen_lightning.callbacks.nonfinite import diverged, has_non_finite_weights
from gen_lightning.callbacks.requeue import requeue_pending
from gen_lightning.checkpointing import AtomicCheckpointIO

log = logging.getLogger("gen_lightning")


def logger_run_ids(trainer: L.Trainer) -> dict[str, str]:
    from lightning.pytorch.loggers import WandbLogger

    ids = [str(lg.version) for lg in trainer.loggers if isinstance(lg, WandbLogger) and lg.version]
    return {"wandb": ids[0]} if ids else {}


def finish_reason(trainer: L.Trainer) -> str:
    """Why a fit that ended without an error ended (stored in its final checkpoint; see run_folder.completed)."""
    if 0 < trainer.max_steps <= trainer.global_step:
        return "max_steps"
    if trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs:
        return "max_epochs"
    if (timer := training_timer(trainer)) is not None and timer.time_remaining() <= 0:
        return "max_time"
    return "stopped early"


def training_timer(trainer: L.Trainer) -> Timer | None:
    return next((callback for callback in trainer.callbacks if isinstance(callback, Timer)), None)


def timer_duration(timer: Timer | None) -> float | None:
    """Trainer(max_time=...) in seconds, rounded so that the CLI's reading of the same setting compares equal."""
    return None if timer is None else round(timer.time_remaining() + timer.time_elapsed(), 3)


def _flag_sigterm(trainer: L.Trainer, signum: int, frame: FrameType | None) -> None:
    """Lightning's SIGTERM handler without its collective: note the signal, and pass it on to the ranks Lightning
    started itself (outside SLURM), once."""
    rank = f"[rank {trainer.global_rank}] " if trainer.world_size > 1 else ""
    log.info("%sSIGTERM: stopping at the next batch", rank)
    connector = trainer._signal_connector
    if not connector.received_sigterm and trainer.strategy.launcher is not None:
        trainer.strategy.launcher.kill(signum)
    connector.received_sigterm = True


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose default dirpath is `<trainer.default_root_dir>/checkpoints`, and whose `last.ckpt` always
    holds the final state of a fit that ended without an error (max_steps, max_epochs, max_time, early stopping)."""

    def __init__(self, *args: Any, save_last: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)
        self._finishing: dict[str, Any] | None = None  # set while the final checkpoint is written

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        # Sharded strategies (FSDP, DeepSpeed) write folders with their own IO; the plain torch one is replaced.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Replace Lightning's SIGTERM handler (registered just before this hook) with one that only sets its flag.

        Lightning's handler also runs a `dist.broadcast` inside the handler, that is between any two bytecodes of
        whatever the rank was doing. A scheduler signals every rank, each at its own point of the step, so those
        broadcasts paired with other collectives and the ranks hung (2 gloo ranks on the test suite's Slurm). The
        flag is enough: at each batch start Lightning broadcasts rank 0's flag, at the same point on every rank, and
        all ranks stop together with SIGTERMException (then on_exception saves)."""
        if threading.current_thread() is threading.main_thread():  # handlers can only be set from there
            signal.signal(signal.SIGTERM, functools.partial(_flag_sigterm, trainer))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["gen_lightning_run"] = {"logger_ids": logger_run_ids(trainer)}
        if self._finishing is not None:
            checkpoint["gen_lightning_run"]["finished"] = self._finishing

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the final state as `last`. ModelCheckpoint saves at validation and epoch ends, which a max_steps
        stop between them never reaches (the demo's last 200 steps were lost), and its own train-end save only runs
        when nothing was saved before. Written again even at a step already saved: it records that the fit ended,
        so re-running the command reports the run complete. Skipped for a smoke test (fast_dev_run) and when SLURM
        is about to requeue (the hpc checkpoint is the resume point; the requeue margin is short)."""
        if trainer.fast_dev_run or not self.save_last or self.dirpath is None or requeue_pending(trainer):
            return
        self._finishing = {"reason": finish_reason(trainer), "max_time": timer_duration(training_timer(trainer))}
        try:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self._finishing = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """SIGTERM (SLURM's time limit, a plain `kill`, a preempting scheduler) ends training through Lightning's
        SIGTERMException; keep the work done since the last periodic checkpoint in `last`. Rank 0 writes without a
        barrier: the other ranks may already be leaving, and DDP replicas hold the same weights.

        A scheduler signals every process of the job, not only this one: a helper the same signal ended (W&B's service
        process, a `pipe:` shard's command) can fail the step before Lightning's SIGTERMException comes. After a
        SIGTERM that error ends training the same way, and the step reached is kept too."""
        by_sigterm = isinstance(exception, SIGTERMException) or trainer.received_sigterm
        if not by_sigterm or self.dirpath is None:
            return
        if not isinstance(exception, SIGTERMException):
            log.warning("SIGTERM: training ended by %s: %s (the signal reaches every process of the job)",
                        type(exception).__name__, exception)  # fmt: skip
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):  # gathering the weights is a collective
            log.warning("SIGTERM: no checkpoint written (sharded strategy; rely on periodic/SIGUSR1 checkpoints)")
            return
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        if trainer.is_global_zero and not has_non_finite_weights(pl_module):
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
            log.warning("SIGTERM: saved %s at step %d before exiting", path, trainer.global_step)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # A diverged model must not replace the last good checkpoint (the resume point).
        if diverged(trainer):
            log.error("not saving %s at step %d: the model has NaN/Inf weights", filepath, trainer.global_step)
            return
        super()._save_checkpoint(trainer, filepath)
