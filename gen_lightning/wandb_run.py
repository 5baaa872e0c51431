"""W&B for runs on compute nodes: offline unless the user has credentials, and run files complete when fit ends."""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

log = logging.getLogger("gen_lightning")


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def default_wandb_mode() -> None:
    """Compute nodes have no internet and often no W&B login: run offline (sync later with `wandb sync`) unless the
    user has credentials. An explicit WANDB_MODE always wins."""
    if "WANDB_MODE" not in os.environ and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        print("gen-lightning: no W&B credentials found, logging offline (WANDB_MODE=offline)", file=sys.stderr)


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger (the CLI's default logger), with its arguments, and two differences:
    - without the `anonymous=None` it always passes to wandb.init: wandb 0.31 deprecated that setting and warns "The
      anonymous setting has no effect" whenever it is passed, None included;
    - once wandb's service process is gone (below), logging stops with one warning instead of raising."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._service_gone = False

    @property
    def experiment(self):
        if "anonymous" in self._wandb_init and self._wandb_init["anonymous"] is None:
            del self._wandb_init["anonymous"]  # read only when the run is created, just below
        return super().experiment

    # A scheduler's SIGTERM reaches every process of the job, wandb's service process (wandb-core) too, which exits on
    # it even when the signal is ignored. The next log call then raises ConnectionResetError, possibly before fit has
    # stopped and saved its step. Logging stops instead, with one warning; training goes on to its checkpoint.
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._unless_service_gone(super().log_metrics, metrics, step)

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self._unless_service_gone(super().log_image, key, images, step, **kwargs)

    def _unless_service_gone(self, call: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        if self._service_gone:
            return
        try:
            call(*args, **kwargs)
        except ConnectionError as error:  # ConnectionResetError, BrokenPipeError: the socket to wandb-core is closed
            self._service_gone = True
            log.warning("W&B: lost wandb's service process (%s: %s); this run logs nothing more. A SIGTERM to the "
                        "whole job (a time limit, preemption, scancel) ends it; the run's files keep what it had "
                        "written", type(error).__name__, error)  # fmt: skip


def finish_wandb(trainer) -> None:
    """Close the W&B run when the command ends, so its files are complete when `gen-lightning fit` returns (and when
    it is called in-process, e.g. from a notebook or a test), not only at interpreter exit.

    `run.finish()` alone is not enough: it only *informs* wandb's service, which closes the run file asynchronously
    (a small offline run file can still be the bare header when finish() returns). `wandb.teardown()` waits for the
    service, so it runs once no other run of this process is active."""
    import wandb

    finished = False
    for logger in trainer.loggers:
        if isinstance(logger, LightningWandbLogger) and trainer.is_global_zero and logger._experiment is not None:
            logger.experiment.finish()
            finished = True
    if finished and wandb.run is None:
        wandb.teardown()


def close_wandb_after_sigterm() -> None:
    """Fit stopped on SIGTERM: close W&B now rather than in wandb's exit hook. After a SIGTERM to the whole job, its
    service process has ended already (what it had received is in the run's files) and the hook would print a
    ConnectionResetError traceback; when the signal came to this process only, this finishes the run and waits for
    its files, as finish_wandb does."""
    if "wandb" not in sys.modules:
        return
    import wandb
    from wandb.sdk.lib import module as wandb_globals

    try:
        wandb.finish()
    except ConnectionError:
        # The service is gone, so finish() stopped half-way with the run still current: forget it, or the next run
        # of this process (a notebook, a test) would be handed the dead one.
        wandb_globals.unset_globals()
    with contextlib.suppress(ConnectionError):
        wandb.teardown()  # unregisters the exit hook first
