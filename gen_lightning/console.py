"""What a gen-lightning command prints besides its own result: log records in one format, each once, and library
messages known not to apply here silenced where they arise, narrowly (by message and module), each with the
reason it is safe. Anything that could mean something to the user is left alone.

Imports nothing heavy: it runs first in every command, `--help` included."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Lightning's own handler (on the `lightning` logger, added when it is imported) prints "INFO: ...": ours matches.
LOG_FORMAT = "%(levelname)s: %(message)s"
LIGHTNING_LOGGER = "lightning"

# Lightning's INFO lines that carry nothing about the run or are untrue here, by the logger that writes them.
QUIET_LIGHTNING_INFO = {
    # An advertisement for another logging service, printed at every Trainer start.
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip: For seamless cloud logging",),
    # In a SLURM job, from every rank: SIGUSR1 is SlurmRequeue's (Lightning finds it set and leaves it alone), and
    # SIGTERM is not bypassed: fit stops at the next batch and saves its step (callbacks/checkpoint.py).
    "lightning.pytorch.trainer.connectors.signal_connector": (
        "SLURM auto-requeueing enabled. Setting signal handlers.",
        "Bypassing SIGTERM",
    ),
}

# (message regex, module regex): `module` is where warnings.warn attributes the warning. Each says why it is safe.
IGNORED_WARNINGS = (
    # Lightning's own call into a torch.utils._pytree API torch deprecated; nothing of ours uses it.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    # The concern is duplicated or miscounted batches when each loader worker iterates the whole dataset: the
    # DataModule's train stream gives each worker its own share of the batches, and its __len__ is the exact count
    # per rank (gen_lightning.data.datamodule.TrainStream), so neither can happen here.
    (
        r"Your `IterableDataset` has `__len__` defined\. In combination with multi-process data loading",
        r"lightning\.pytorch\.utilities\.data",
    ),
    # Lightning's all_gather (under DDP) calls a torch function torch deprecated; its results are right.
    (r"torch\.distributed\.nn\.functional\.all_gather is deprecated", r"lightning\.fabric\.utilities\.distributed"),
    # DataThroughput sums this count over all ranks itself (strategy.reduce) before logging it: it is synced.
    (
        r"It is recommended to use `self\.log\('data/skipped_samples', \.\.\., sync_dist=True\)`",
        r"lightning\.pytorch\.trainer\.connectors\.logger_connector\.result",
    ),
)

SRUN_WARNING = r"The `srun` command is available on your system but is not used"


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is at each record (pytest and notebooks swap it after start-up)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _not_printed_by_lightning(record: logging.LogRecord) -> bool:
    """Lightning's package logger prints its records with its own handler and also passes them up to the root logger:
    the root handler would print each a second time. They still propagate, so pytest's caplog and a user's own
    handlers see them."""
    if record.name == LIGHTNING_LOGGER or record.name.startswith(LIGHTNING_LOGGER + "."):
        return not logging.getLogger(LIGHTNING_LOGGER).handlers
    return True


class _WithoutMessages(logging.Filter):
    """Drops the records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def configure_logging() -> None:
    """One stderr handler on the root logger with LOG_FORMAT (unless the embedding program configured logging
    already, as logging.basicConfig would); gen_lightning logs at INFO, other libraries at WARNING (their INFO
    chatter, e.g. torch.distributed's store messages, says nothing to a user); Lightning's records once."""
    root = logging.getLogger()
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(_not_printed_by_lightning)
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    ours = logging.getLogger("gen_lightning")
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)
    for name, prefixes in QUIET_LIGHTNING_INFO.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _WithoutMessages) for existing in logger.filters):
            logger.addFilter(_WithoutMessages(prefixes))


def silence_inapplicable_warnings() -> None:
    """warnings.filterwarnings for IGNORED_WARNINGS, and Lightning's srun hint outside a SLURM allocation."""
    for message, module in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    # Lightning warns at every Trainer start once `srun` is installed and the process was not started by it. Outside
    # a SLURM allocation there is nothing to launch with srun; inside one (sbatch) a missing srun can mean that only
    # one process of a multi-task job runs, so there it stays.
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", message=SRUN_WARNING, module=r"lightning\.fabric\.plugins\.environments")


def silence_frozen_eval_warning(model: torch.nn.Module) -> None:
    """Lightning warns when modules are in eval mode as training starts: a module left in eval by mistake trains
    without dropout and batch-norm updates. A frozen pretrained part (a VAE, a CLIP text tower, a distillation
    teacher) is in eval mode on purpose. When no module in eval mode holds a trainable parameter, the warning with
    exactly that count is silenced; any other module in eval mode changes the count, and the warning shows."""
    in_eval = [module for module in model.modules() if not module.training]
    if in_eval and not any(p.requires_grad for module in in_eval for p in module.parameters()):
        count = rf"Found {len(in_eval)} module\(s\) in eval mode at the start of training"
        warnings.filterwarnings("ignore", message=count)


def configure_console() -> None:
    configure_logging()
    silence_inapplicable_warnings()
