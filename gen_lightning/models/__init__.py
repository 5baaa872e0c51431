from gen_lightning.models.base import GenerativeModule
from gen_lightning.models.clip import CLIPModel
from gen_lightning.models.diffusion import DiffusionModel
from gen_lightning.models.distillation import DistilledDiffusionModel
from gen_lightning.models.latent_diffusion import LatentDiffusionModel
from gen_lightning.models.vae import VAEModel
from gen_lightning.models.world_model import WorldModel

__all__ = [
    "CLIPModel",
    "DiffusionModel",
    "DistilledDiffusionModel",
    "GenerativeModule",
    "LatentDiffusionModel",
    "VAEModel",
    "WorldModel",
]
