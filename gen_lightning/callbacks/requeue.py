"""SLURM requeue on SIGUSR1 with no work done inside the signal handler.

Lightning's own SLURM handler (`SLURMEnvironment(auto_requeue=True)`) saves `hpc_ckpt_N.ckpt` and runs
`scontrol requeue` *inside* the SIGUSR1 handler. Python runs a handler between any two bytecodes, so under DDP the
ranks enter the checkpoint's barrier at different points of their step (one before the backward's gradient
all-reduce, one after it), the collectives pair up wrongly and the job hangs until it is killed: seen on the test
suite's real Slurm in one run of three (Lightning issue #21406). The requeue then kills the processes mid-run, so an
offline W&B run loses everything it logged before it (wandb writes the run file out when the run finishes).

Here the handler only sets a flag. At the end of every training batch the ranks agree on it (one all-reduce of a
boolean, at the same point on every rank); then all of them save the hpc checkpoint together, training stops cleanly,
the W&B run is finished, and rank 0 requeues the job. The restarted job resumes from that checkpoint (the CLI picks
the newest complete one) with the same W&B run id.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

import lightning as L

from gen_lightning.callbacks.nonfinite import diverged
from gen_lightning.slurm import requeue, slurm_job_id
from gen_lightning.wandb_run import finish_wandb

log = logging.getLogger("gen_lightning")


class SlurmRequeue(L.Callback):
    """On `signal_name` (SLURM's `--signal=SIGUSR1@90`, or `scancel --signal=USR1 JOBID`) in a SLURM batch job:
    checkpoint to `<default_root_dir>/hpc_ckpt_N.ckpt` at the next batch end, stop, finish the loggers, requeue."""

    def __init__(self, signal_name: str = "SIGUSR1") -> None:
        self.signum = signal.Signals[signal_name]
        self.requested = False
        self.stopped = False
        self.previous: Any = None  # the handler this one replaced, put back when fit ends

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before Lightning registers its signal handlers (Trainer._run): finding one already set, it leaves SIGUSR1
        # alone. Forked data-loader workers inherit this handler too, which is harmless (a flag in their copy).
        if stage == "fit" and slurm_job_id() is not None:
            self.previous = signal.signal(self.signum, self._request)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.previous is not None:
            signal.signal(self.signum, self.previous)
            self.previous = None

    def _request(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True  # nothing else here: this may run in the middle of a collective

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Any rank's signal counts (SLURM delivers to every task, but not at the same instant).
        if self.stopped or not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        if 0 < trainer.max_steps <= trainer.global_step:  # the run ends now anyway: finish it (final grid, evaluation)
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        # A diverged model must not become the resume point (RunCheckpoint refuses it too). Saving is a collective
        # under sharded strategies, so the ranks agree on the check first.
        if diverged(trainer):
            if trainer.is_global_zero:
                log.error("%s: not saving %s at step %d: the model has NaN/Inf weights; the restarted job resumes "
                          "from the last good checkpoint", self.signum.name, path, trainer.global_step)  # fmt: skip
        else:
            trainer.save_checkpoint(path)  # every rank: sharded strategies write their part, DDP's rank 0 the file
            if trainer.is_global_zero:
                log.warning("%s: saved %s at step %d; stopping to requeue", self.signum.name, path, trainer.global_step)
        self.stopped = True
        trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        job_id = slurm_job_id()
        if not self.stopped or job_id is None or not trainer.is_global_zero:
            return
        finish_wandb(trainer)  # the requeue stops every process of the job: the W&B run file must be complete first
        requeue(job_id)


def requeue_pending(trainer: L.Trainer) -> bool:
    """True once SlurmRequeue has stopped training to requeue: the job is within SIGUSR1's margin of being killed."""
    return any(isinstance(callback, SlurmRequeue) and callback.stopped for callback in trainer.callbacks)
