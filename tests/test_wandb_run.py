"""W&B after a job-wide SIGTERM: wandb's service process (wandb-core) exits on the signal, and fit must go on to save
its step instead of failing on the next log call."""

from __future__ import annotations

import logging
import signal

import psutil

from gen_lightning.wandb_run import WandbLogger, close_wandb_after_sigterm


def service_processes() -> list[psutil.Process]:
    return [child for child in psutil.Process().children(recursive=True) if "wandb-core" in child.name()]


def test_logging_stops_with_one_warning_once_the_service_process_is_gone(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="gen_lightning", save_dir=str(tmp_path))
    logger.log_metrics({"loss": 1.0}, step=0)  # starts the run and its service process
    services = service_processes()
    assert services, "no wandb-core child process: the test would check nothing"
    for service in services:
        service.send_signal(signal.SIGTERM)  # what a scheduler's SIGTERM to the whole job does to it
    psutil.wait_procs(services, timeout=30)
    with caplog.at_level(logging.WARNING, logger="gen_lightning"):
        for step in range(1, 4):
            logger.log_metrics({"loss": 1.0 / step}, step=step)  # wandb alone raises ConnectionResetError here
    lost = "W&B: lost wandb's service process"
    warnings = [record.getMessage() for record in caplog.records if lost in record.getMessage()]
    assert len(warnings) == 1, caplog.text
    close_wandb_after_sigterm()  # must not raise either (it also unregisters wandb's exit hook)
    # A later run of the same process (a notebook, the rest of this test session) starts a new service and logs.
    again = WandbLogger(project="gen_lightning", save_dir=str(tmp_path / "again"))
    again.log_metrics({"loss": 0.5}, step=0)
    assert again.experiment.id != logger.experiment.id
    assert not again._service_gone
    close_wandb_after_sigterm()
