"""`gen-lightning`: LightningCLI subcommands (fit, validate, test) plus shards / sample / evaluate / play / export,
one module each (training, shards, sample, serve); main.py dispatches."""

from gen_lightning.cli.main import console_main, main

__all__ = ["console_main", "main"]
