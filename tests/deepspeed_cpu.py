"""DeepSpeed on the CPU, for tests only: Lightning's DeepSpeedStrategy refuses a CPU accelerator, but DeepSpeed itself
runs ZeRO on CPU tensors with gloo (DS_ACCELERATOR=cpu). Used by class_path from the CLI in a subprocess."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy without its CUDA-only guard; ranks talk over gloo."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "only supported on CUDA GPUs" check

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)  # DeepSpeed's engine reads the index as this rank's device

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy checks that device indices equal local ranks; CPU devices have no index.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        return "gloo"
