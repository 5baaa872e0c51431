"""`gen-lightning fit / validate / test`: LightningCLI with the house's always-on callbacks, run folder and W&B."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

log = logging.getLogger("gen_lightning")


def run_lightning_cli(args: Sequence[str]) -> None:
    from jsonargparse import ActionYesNo
    from lightning.pytorch.cli import LightningCLI

    from gen_lightning.callbacks import DataThroughput, NonFiniteGuard, RunCheckpoint, SlurmRequeue
    from gen_lightning.data.datamodule import ShardDataModule
    from gen_lightning.models.base import GenerativeModule
    from gen_lightning.run_folder import RunComplete, leaves_no_trace, prepare_run_folder
    from gen_lightning.slurm import slurm_launch_error
    from gen_lightning.strategy_config import give_deepspeed_the_batch_size

    class GenLightningCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.image_size", "model.init_args.image_size")
            # Always-on callbacks, configured as top-level keys `checkpoint`, `throughput`, `nonfinite`, `requeue`.
            parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
            parser.add_lightning_class_args(DataThroughput, "throughput")
            parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
            # Inert outside a SLURM batch job; in one, SIGUSR1 means checkpoint, stop and requeue.
            parser.add_lightning_class_args(SlurmRequeue, "requeue")
            parser.add_argument(
                "--resume",
                action=ActionYesNo(no_prefix="no-"),
                default=True,
                help="fit: continue from the newest complete checkpoint of this run's folder, if any (--no-resume "
                "starts fresh). An explicit --ckpt_path wins.",
            )
            parser.set_defaults(
                {
                    "trainer.logger": {
                        # Lightning's, minus a deprecated argument wandb warns about (gen_lightning.wandb_run)
                        "class_path": "gen_lightning.wandb_run.WandbLogger",
                        "init_args": {"project": "gen_lightning"},
                    }
                }
            )

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            if problem := slurm_launch_error(os.environ, config.trainer.devices, config.trainer.num_nodes):
                raise SystemExit(f"gen-lightning: {problem}")
            give_deepspeed_the_batch_size(config)
            prepare_run_folder(config, self.subcommand)
            if leaves_no_trace(config, self.subcommand):  # Lightning itself skips config.yaml for fast_dev_run only
                self.save_config_callback = None

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from gen_lightning.callbacks.progress import FitProgress
    from gen_lightning.callbacks.summary import ModelSummaryWithoutZeroFlops
    from gen_lightning.wandb_run import close_wandb_after_sigterm, default_wandb_mode, finish_wandb

    default_wandb_mode()
    try:
        cli = GenLightningCLI(
            model_class=GenerativeModule,
            subclass_mode_model=True,
            datamodule_class=ShardDataModule,
            save_config_kwargs={"overwrite": True},
            # What a fit prints: plain progress lines without a terminal; a model summary without its column of 0 FLOPs.
            trainer_defaults={"callbacks": [FitProgress(), ModelSummaryWithoutZeroFlops()]},
            # None = read sys.argv (as a console script); a list only when called from Python, or Lightning warns.
            args=None if list(args) == sys.argv[1:] else list(args),
            auto_configure_optimizers=False,
        )
    except RunComplete as complete:
        log.info("%s", complete)
        return
    except SIGTERMException:  # fit saved its step (callbacks/checkpoint.py); exits with status 0
        close_wandb_after_sigterm()
        raise
    finish_wandb(cli.trainer)
