"""Lightning's model summary without its FLOPs column when Lightning could not count FLOPs."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

# Prints where Lightning's summary prints (its handler, its format).
log = logging.getLogger("lightning.pytorch.callbacks.model_summary")
STOCK_SUMMARIES = (ModelSummary, RichModelSummary)


class CountedFlopsSummary(ModelSummary):
    """ModelSummary that leaves FLOPs out unless they were counted. Lightning counts them only on a forward pass of
    the model's `example_input_array`, which none of our models defines (their networks take (x_t, t, **cond)), so
    the stock summary shows FLOPs 0 for every layer: a wrong number rather than a missing one."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        stock = (summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, total_flops)
        if total_flops:
            ModelSummary.summarize(*stock)
            return
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        try:
            table = _format_summary_table(
                total_parameters, trainable_parameters, model_size, total_training_modes, 0, *columns
            )
        except TypeError:  # a private Lightning helper (pinned 2.6.6): if another version changed it, the stock table
            ModelSummary.summarize(*stock)
            return
        log.info("\n" + table.rsplit("\n", 1)[0])  # the last line is the "0  Total Flops" row


class ModelSummaryWithoutZeroFlops(L.Callback):
    """Swaps the model summary Lightning added (ModelSummary or, with rich installed, RichModelSummary) for a
    CountedFlopsSummary of the same depth, at setup, before the summary prints at fit start. Without one
    (`trainer.enable_model_summary=false`) nothing is added: the flag keeps its meaning."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for index, callback in enumerate(trainer.callbacks):
            if type(callback) in STOCK_SUMMARIES:
                trainer.callbacks[index] = CountedFlopsSummary(max_depth=callback._max_depth)
