"""Trainer strategy settings the CLI completes from the rest of the config."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from jsonargparse import Namespace


def give_deepspeed_the_batch_size(config: Any) -> None:
    """Lightning's DeepSpeedStrategy takes its micro-batch size from the train loader's `batch_sampler`. The
    ShardDataModule batches inside its stream (a loader with batch_size=None has no batch_sampler), so the first fit
    under DeepSpeed failed with "'NoneType' object has no attribute 'batch_size'". DeepSpeed is given data.batch_size
    instead (`logging_batch_size_per_gpu`, which it uses only for its throughput figures), unless the config sets it."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry

    strategy = config.trainer.strategy
    if isinstance(strategy, str):
        if strategy not in StrategyRegistry or not issubclass(
            StrategyRegistry[strategy]["strategy"], DeepSpeedStrategy
        ):
            return
        entry = StrategyRegistry[strategy]
        cls = entry["strategy"]
        strategy = Namespace(
            class_path=f"{cls.__module__}.{cls.__qualname__}", init_args=Namespace(entry["init_params"])
        )
        config.trainer.strategy = strategy
    if not isinstance(strategy, Namespace) or not issubclass(strategy_class(strategy.class_path), DeepSpeedStrategy):
        return
    if strategy.init_args.get("logging_batch_size_per_gpu", "auto") == "auto":
        strategy.init_args.logging_batch_size_per_gpu = int(config.data.batch_size)


def strategy_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(import_module(module), name)
