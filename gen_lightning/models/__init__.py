from gen_lightning.models.base import GenerativeModule
from gen_lightning.models.diffusion import DiffusionModel

__all__ = ["DiffusionModel", "GenerativeModule"]
