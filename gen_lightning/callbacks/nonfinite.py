"""NaN/Inf guard: a step whose loss or gradients are not finite is not applied to the weights.

Checked after backward, before the optimizer step, on the gradients every rank holds after DDP's all-reduce plus a
max-reduced flag of each rank's loss, so all ranks skip (or stop) together and replicas never diverge. Under
fp16 mixed precision the GradScaler already skips overflowing steps (that is its job), so the guard stands aside.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Literal

import lightning as L
import torch

log = logging.getLogger("gen_lightning")


class NonFiniteGuard(L.Callback):
    """Skips optimizer steps whose loss or gradients are NaN/Inf; stops after too many in a row.

    Args:
        policy: "skip": drop the step's update (its gradients are discarded, so AdamW leaves weights and moments
            alone), count it in `train/nonfinite_steps` and warn. "stop": the same, but after `max_consecutive`
            non-finite steps in a row, stop with an error (weights and the last checkpoint are still finite).
        max_consecutive: K, the run of non-finite steps that stops training under policy "stop".
    """

    def __init__(self, policy: Literal["skip", "stop"] = "stop", max_consecutive: int = 10) -> None:
        if policy not in ("skip", "stop"):
            raise ValueError(f"nonfinite.policy={policy!r}: expected 'skip' or 'stop'")
        if max_consecutive < 1:
            raise ValueError(f"nonfinite.max_consecutive={max_consecutive}: must be >= 1")
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.in_a_row = 0
        self._loss_finite = True

    def _active(self, trainer: L.Trainer) -> bool:
        return str(trainer.precision) != "16-mixed"

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # Kept as a tensor: reading it here would make the host wait for the device on every (accumulated) step.
        self._loss_finite = self._loss_finite & torch.isfinite(loss.detach()).all()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss_finite, self._loss_finite = self._loss_finite, True  # reset for the next (accumulated) step
        if not self._active(trainer):
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # One fused norm over all gradients and one host sync per step; checking each gradient on its own costs a
        # sync per parameter on a GPU (and ~5 ms a step for the demo UNet on a CPU). A norm that overflows float32
        # (gradients beyond ~1e19) counts as non-finite: such an update is as unusable.
        finite = torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else True
        flag = (~torch.as_tensor(finite & loss_finite, device=pl_module.device)).float()
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        bad = bool(flag > 0)
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.skipped += int(bad)
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False, rank_zero_only=True)
        if not bad:
            return
        for param in params:
            param.grad = None  # optimizers skip parameters without a gradient
        log.warning(
            "step %d: non-finite %s, update skipped (%d in a row, %d in total)",
            trainer.global_step,
            "loss" if not bool(loss_finite) else "gradients",
            self.in_a_row,
            self.skipped,
        )
        if self.policy == "stop" and self.in_a_row >= self.max_consecutive:
            raise FloatingPointError(
                f"non-finite loss/gradients for {self.in_a_row} optimizer steps in a row (up to step "
                f"{trainer.global_step}); every one was skipped, so the weights and the last checkpoint are finite. "
                "Lower model.lr, check the data, or set nonfinite.policy=skip / raise nonfinite.max_consecutive."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.in_a_row = int(state_dict.get("in_a_row", 0))


# Used by the checkpoint callbacks: a model with NaN/Inf weights is never saved (it would become the resume point).
def has_non_finite_weights(module: torch.nn.Module) -> bool:
    """NaN/Inf in this process's parameters or buffers: under FSDP its shards, read without a collective (a state_dict
    would gather, and hang when one rank asks alone)."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors)


def diverged(trainer: L.Trainer) -> bool:
    """Whether any rank's weights hold NaN/Inf; the same answer on every rank (call on all of them). Sharded ranks
    each see only their part, and a save is a collective that all of them must enter or skip together."""
    return trainer.strategy.reduce_boolean_decision(has_non_finite_weights(trainer.lightning_module), all=False)
