from gen_lightning.callbacks.checkpoint import RunCheckpoint
from gen_lightning.callbacks.evaluation import GenerativeEvaluation
from gen_lightning.callbacks.nonfinite import NonFiniteGuard
from gen_lightning.callbacks.progress import FitProgress
from gen_lightning.callbacks.requeue import SlurmRequeue
from gen_lightning.callbacks.sample_grid import SampleGrid
from gen_lightning.callbacks.summary import ModelSummaryWithoutZeroFlops
from gen_lightning.callbacks.throughput import DataThroughput
from gen_lightning.callbacks.world import WorldModelEvaluation

__all__ = [
    "DataThroughput",
    "FitProgress",
    "GenerativeEvaluation",
    "ModelSummaryWithoutZeroFlops",
    "NonFiniteGuard",
    "RunCheckpoint",
    "SampleGrid",
    "SlurmRequeue",
    "WorldModelEvaluation",
]
