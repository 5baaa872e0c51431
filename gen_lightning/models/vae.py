"""VAEModel: a KL-regularised convolutional VAE with a Gaussian decoder; the first stage of latent diffusion.

The likelihood is a proper density, so the ELBO and a bits-per-dim bound mean something:

    p(y | z) = N(y; decoder(z), σ² I),   log σ² a learned scalar (like LDM's LPIPSWithDiscriminator.logvar)
    y = x + u,   x in [-1, 1] on the 8-bit grid (spacing Δ = 2/255), u ~ U(-Δ/2, Δ/2)^D (uniform dequantisation)
    recon = E_q(z|y)[-log p(y | z)]                          nats per image over D = C·H·W dimensions
    kl    = KL(q(z | y) || N(0, I))                           nats per image
    -ELBO = recon + kl  >=  -log p(y)                         continuous density over [-1, 1]-scaled data
    bpd   = (recon + kl + D·ln(127.5)) / (D·ln 2)

D·ln(127.5) is the change of variables from the [-1, 1] scale to the 0..255 scale (the Jacobian of y -> 127.5·y in
each dimension). With uniform dequantisation, -log P(x_8bit) <= E_u[-log p_255(x + u)] (Theis et al. 2016), so bpd is
a one-sample estimate of an upper bound on the discrete 8-bit negative log-likelihood, in bits per sub-pixel.
Validation draws u and z from a fixed generator per batch, so val numbers are comparable between evaluations.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gen_lightning.errors import UserInputError
from gen_lightning.images import make_grid, psnr, publish_image
from gen_lightning.interop.folders import is_pretrained_folder
from gen_lightning.models.base import GenerativeModule
from gen_lightning.models.checkpoint_format import renamed
from gen_lightning.models.loading import load_network
from gen_lightning.nn.autoencoder import Autoencoder, AutoencoderConfig, decode_fp32, encode_fp32
from gen_lightning.nn.ema import EMA

if TYPE_CHECKING:
    from gen_lightning.interop.diffusers_vae import DiffusersAutoencoder

LOG_2PI = math.log(2 * math.pi)
BIN_WIDTH = 2.0 / 255.0  # 8-bit levels mapped to [-1, 1]


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """-log N(target; mean, exp(logvar)) in nats, summed over C, H, W: one value per image, shape [N]."""
    nll = 0.5 * ((target - mean).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI)
    return nll.flatten(1).sum(dim=1)


def bits_per_dim(nll_nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Per-image continuous NLL bound (nats, [-1, 1] data) -> discretised 8-bit bound in bits per dimension."""
    return (nll_nats + dims * math.log(127.5)) / (dims * math.log(2.0))


def vae_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a VAEModel's state dict (names, dtypes, shapes and values): which VAE made a latent (data.latent_source
    stamps it on every stored latent; latent diffusion refuses latents of another VAE). Hashed under the key names of
    checkpoint format 1 (`autoencoder.` for `net.`), so latents encoded before the rename still match."""
    digest = hashlib.sha256()
    for name, tensor in sorted(renamed(state, [("net.", "autoencoder.")]).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Spread each 8-bit level uniformly over its bin, so a continuous density cannot collapse onto the grid."""
    noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return images + (noise - 0.5) * BIN_WIDTH


class VAEModel(GenerativeModule):
    """KL-regularised VAE (see the module docstring for the likelihood and the bound).

    Args:
        autoencoder: encoder/decoder shape; the latent is (latent_channels, image_size / f, image_size / f).
        image_size: H = W of training images (linked from data.image_size by the CLI); sets the prior sample shape.
        beta / kl_warmup_steps: loss = recon + β_t·kl with β_t growing linearly from 0 to beta over kl_warmup_steps
            optimizer steps (0: β from the start). β = 1 is the true ELBO; validation always reports the β = 1 ELBO.
        logvar_init / logvar_lr: the decoder's log σ² and its own AdamW learning rate (no weight decay, which would
            pull it towards σ = 1). Adam moves a parameter by about lr per step, and log σ² has to travel ~5 units
            from 0 early on; at the network's lr that would take thousands of steps, during which the reconstruction
            term is down-weighted and the posterior collapses onto the prior.
        dequantize: add uniform noise within each 8-bit bin to training and validation images (see module docstring).
        lr / weight_decay / adam_betas / warmup_steps / lr_schedule: AdamW with warm-up (see GenerativeModule).
        ema_max_decay / ema_power: EMA of the autoencoder with warm-up (nn.ema). Validation, `encode`, `decode` and
            `sample` use the EMA weights by default: averaging the last ~1% of steps smooths the step-to-step noise
            of a short, high-lr run at the cost of one weight copy. ema_max_decay=0 makes the EMA a copy of the raw
            weights.
        num_recon_images: originals/reconstruction pairs in the grid logged from the first val batch (max 16).
        channels_last: NHWC memory layout (much faster convolutions on CPU).
    """

    format_1_renames = (("autoencoder.", "net."),)
    checkpoint_format = 3

    @classmethod
    def upgrade_from_format_2(cls, checkpoint: dict[str, Any]) -> None:
        """VAEs before format 3 padded their downsampling on all sides (AutoencoderConfig.downsample)."""
        hparams = checkpoint.setdefault("hyper_parameters", {})
        hparams.setdefault("autoencoder", {}).setdefault("downsample", "same")

    def __init__(
        self,
        autoencoder: AutoencoderConfig | None = None,
        image_size: int = 64,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        logvar_init: float = 0.0,
        logvar_lr: float = 0.05,
        dequantize: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        lr_schedule: str = "constant",
        ema_max_decay: float = 0.999,
        ema_power: float = 2 / 3,
        num_recon_images: int = 16,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        config = AutoencoderConfig.coerce(autoencoder if autoencoder is not None else AutoencoderConfig())
        self.save_hyperparameters()
        self.hparams["autoencoder"] = config.as_dict()  # plain types only: checkpoints load weights-only
        self.net = Autoencoder(config)
        self.ema = EMA(self.net, max_decay=ema_max_decay, power=ema_power)
        # The likelihood's scale, not part of the autoencoder network: first stages (latent diffusion) never need it.
        self.logvar = torch.nn.Parameter(torch.tensor(float(logvar_init)))
        if image_size % self.net.downsample_factor:
            raise ValueError(f"image_size {image_size} is not divisible by {self.net.downsample_factor}")
        self.image_shape = (config.in_channels, image_size, image_size)
        self.latent_shape = self.net.latent_shape(image_size)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Resuming builds the model from the run's config, where `downsample` now defaults to "ldm": a VAE saved
        # with the other padding would load its weights into a different function without a word.
        saved = checkpoint.get("hyper_parameters", {}).get("autoencoder", {}).get("downsample")
        if saved is not None and saved != self.net.config.downsample:
            raise UserInputError(
                f"this checkpoint's VAE pads its downsampling as {saved!r}, the model being resumed as "
                f"{self.net.config.downsample!r}; resume with --model.init_args.autoencoder.downsample={saved}"
            )

    # --- training -------------------------------------------------------------------------------------------------
    def _images(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        images = batch["image"]
        if self.hparams.dequantize:
            images = dequantize(images, generator)
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def beta_at(self, step: int) -> float:
        warmup = self.hparams.kl_warmup_steps
        return self.hparams.beta * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)

    def terms(
        self, network: Autoencoder, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(recon nats [N], kl nats [N], reconstruction mean) for one posterior sample; likelihood math in fp32."""
        mean, posterior = network(images, generator)
        recon = gaussian_nll(images.float(), mean.float(), self.logvar.float())
        return recon, posterior.kl(), mean

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = self._images(batch)
        recon, kl, _ = self.terms(self.net, images)
        beta = self.beta_at(self.global_step)
        # Optimised per dimension, so gradient clipping and the lr do not depend on the resolution.
        loss = (recon + beta * kl).mean() / images[0].numel()
        n = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/recon", recon.mean(), batch_size=n)
        self.log("train/kl", kl.mean(), batch_size=n)
        self.log("train/beta", beta, batch_size=n)
        self.log("train/logvar", self.logvar.detach(), batch_size=n)
        return loss

    def after_optimizer_step(self, steps_done: int) -> None:
        self.update_ema(self.ema, self.net, steps_done)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # A fixed generator per batch: the dequantisation noise and z are the same draws at every evaluation.
        generator = torch.Generator(device=self.device).manual_seed(1_000_003 * batch_idx + self.global_rank)
        images = self._images(batch, generator)
        recon, kl, _ = self.terms(self.ema.shadow, images, generator)
        n, dims = images.shape[0], images[0].numel()
        self.log_val_mean("val/recon", recon.mean(), n)
        self.log_val_mean("val/kl", kl.mean(), n)
        self.log_val_mean("val/elbo", -(recon + kl).mean(), n)
        self.log_val_mean("val/bpd", bits_per_dim(recon + kl, dims).mean(), n)
        # PSNR of what latent diffusion gets back: the posterior mode, decoded, against the 8-bit image.
        clean = batch["image"].to(self.device)
        self.log_val_mean("val/psnr", psnr(self.decode(self.encode(clean)), clean).mean(), n)
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.log_reconstructions(batch["image"])

    def log_reconstructions(self, images: torch.Tensor) -> None:
        """Rows of originals, each above the row of their reconstructions (posterior mode, EMA weights)."""
        count = min(self.hparams.num_recon_images, 16, images.shape[0])
        if count == 0:
            return
        originals = images[:count]
        recons = self.decode(self.encode(originals))
        per_row = min(count, 8)
        rows = []
        for start in range(0, count, per_row):
            rows += [originals[start : start + per_row], recons[start : start + per_row]]
        width = rows[0].shape[0]  # a last short row is padded with white so pairs stay aligned
        rows = [torch.cat([r, r.new_ones(width - r.shape[0], *r.shape[1:])]) if r.shape[0] < width else r for r in rows]
        grid = make_grid(torch.cat(rows).float(), nrow=width)
        publish_image(self.trainer, "val/reconstructions", grid, f"reconstructions/step_{self.global_step:07d}.png")

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [
            {"params": list(self.net.parameters())},
            {"params": [self.logvar], "lr": self.hparams.logvar_lr, "weight_decay": 0.0},
        ]
        return self.adamw_with_warmup(groups)

    # --- first-stage interface (latent diffusion) -----------------------------------------------------------------
    def _network(self, use_ema: bool) -> Autoencoder:
        return self.ema.shadow if use_ema else self.net

    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
    ) -> torch.Tensor:
        """Images in [-1, 1] -> fp32 latents (posterior mode, or a posterior sample); autocast off (nn.autoencoder)."""
        return encode_fp32(self._network(use_ema), images.to(self.device), sample, generator)

    def fingerprint(self) -> str:
        """The identity of these weights that pre-encoded latents carry (vae_fingerprint)."""
        return vae_fingerprint(self.state_dict())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, use_ema: bool = True) -> torch.Tensor:
        """Latents -> fp32 images clamped to [-1, 1] (autocast off, as in `encode`)."""
        return decode_fp32(self._network(use_ema), latents)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: Any = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """n images in [-1, 1] decoded from prior draws z ~ N(0, I) (GenerativeModule.sample). Decoding is one pass:
        `steps` and `sampler` are accepted and ignored; unconditional: no cond, no guidance."""
        if cond is not None or guidance is not None:
            raise ValueError("VAEModel is unconditional: sample() takes no cond and no guidance")
        with self.evaluating():
            z = torch.randn((n, *self.latent_shape), generator=generator, device=self.device)
            return self.decode(z)


@dataclass(frozen=True)
class FirstStage:
    """Latent diffusion's frozen first stage: a trained VAE's autoencoder with the EMA weights (what VAEModel.encode/
    decode use), or a diffusers AutoencoderKL folder's module (interop.diffusers_vae); its hyper-parameters (to
    rebuild ours without the file), its fingerprint, and the folder's latent scale and shift (None / 0 for ours,
    whose scale latent diffusion measures). `external`: the weights live in a folder the checkpoint refers to."""

    autoencoder: Autoencoder | DiffusersAutoencoder
    config: dict[str, Any]
    fingerprint: str | None
    scaling_factor: float | None = None
    shift_factor: float = 0.0
    external: bool = False

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor


def load_first_stage(path: str | Path) -> FirstStage:
    """The first stage at `path`, weights-only, frozen, in eval mode: a VAEModel checkpoint or export (no VAEModel is
    built), or a diffusers AutoencoderKL folder / Stable Diffusion pipeline folder (needs the hf extra)."""
    if is_pretrained_folder(path, "vae"):
        from gen_lightning.interop.diffusers_vae import autoencoder_kl_summary, load_autoencoder_kl

        module = load_autoencoder_kl(path)
        return FirstStage(
            module, autoencoder_kl_summary(module), vae_fingerprint(module.model.state_dict()),
            scaling_factor=module.scaling_factor, shift_factor=module.shift_factor, external=True,
        )  # fmt: skip

    def build(hparams: dict[str, Any]) -> Autoencoder:
        return Autoencoder(hparams["autoencoder"])

    autoencoder, hparams, state = load_network(path, VAEModel, build, prefix="ema.shadow.")
    return FirstStage(autoencoder, hparams, vae_fingerprint(state))  # type: ignore[arg-type]
