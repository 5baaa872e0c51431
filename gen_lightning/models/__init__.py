from gen_lightning.models.base import GenerativeModule
from gen_lightning.models.clip import CLIPModel
from gen_lightning.models.diffusion import DiffusionModel

__all__ = ["CLIPModel", "DiffusionModel", "GenerativeModule"]
