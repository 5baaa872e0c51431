"""LatentDiffusionModel: text-to-image diffusion in the latent space of a frozen VAE (Rombach et al. 2022), conditioned
on text through the UNet's cross-attention and steered by classifier-free guidance (Ho & Salimans 2022).

The first stage is a trained `VAEModel` checkpoint; its weights are copied into this model's checkpoints, so sampling
needs only the latent-diffusion checkpoint. Latents are multiplied by `latent_scale` so they have unit variance, as the
noise schedule assumes (Stable Diffusion's 0.18215 is the same idea, measured once on a batch of its data): unless
given, it is estimated on the first batch the model sees (the sanity-check validation batch when Lightning runs one,
else the first training batch; std over all ranks' latents) and stored as a buffer, so a resumed run keeps it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gen_lightning.diffusion import guided_model
from gen_lightning.models.diffusion import DiffusionModel
from gen_lightning.models.loading import build_model, load_model
from gen_lightning.models.vae import VAEModel
from gen_lightning.nn.ema import EMA
from gen_lightning.nn.text import TextConfig, TextEncoder, TruncationCounter
from gen_lightning.nn.unet import UNetConfig

log = logging.getLogger(__name__)

# (hidden states [N, L, D], mask [N, L] True = real token, pooled caption state [N, D] = the EOT token's)
Context = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

DEFAULT_PROMPTS = ("red apple", "grinning face", "woman pilot", "dog face", "rocket", "blue heart", "sun", "cat")


class LatentDiffusionModel(DiffusionModel):
    """Args (besides DiffusionModel's, which apply in latent space):
    vae_checkpoint: path to a trained VAEModel checkpoint (frozen first stage).
    image_size: pixel H = W (linked from data.image_size); the UNet runs at image_size / the VAE's factor.
    text: shape of the trainable text encoder (byte tokenizer + causal transformer, nn.text); ignored when
        clip_checkpoint is set.
    clip_checkpoint: a CLIPModel checkpoint whose text tower becomes the frozen text encoder.
    pooled_text: also add the caption's pooled state (the EOT token's hidden state) to the UNet's time embedding, so
        every residual block sees the caption through its scale/shift, not only the cross-attention layers (Imagen
        and SDXL do the same). Cross-attention alone learns to use the text slowly: after a 1,250-step CPU run the
        held-out loss with the right caption was 1.2% below the loss with none, 3.7% with this (bench/RESULTS.md).
        Default (None): on for a new model, off for a checkpoint written before the option existed.
    caption_dropout: probability of training on the empty caption instead, which trains the unconditional
        branch that classifier-free guidance needs (10% as in SD/Imagen).
    guidance: default CFG weight w of `sample()` (1 = plain conditional, 0 = unconditional).
    latent_scale: multiply VAE latents by this; None estimates it (module docstring).
    clip_sample: bound on the sampler's predicted x0 (DiffusionModel's). None here, unlike in pixel space: scaled
        latents have unit variance, not a [-1, 1] range (about a quarter of the emoji VAE's values lie outside it,
        some beyond 3), and clipping them distorts every sample; Stable Diffusion does not clip latents either.
    sample_prompts: prompts `sample()` cycles through when called without any (sample grids, evaluation).
    vae_config / text_from_clip: filled in automatically, so a checkpoint rebuilds without the original files.
    """

    kind = "text-to-image"
    # Interim (until this model holds one network of its own): only the nested VAEModel's network was renamed.
    checkpoint_format = 2
    format_1_renames = (("vae.autoencoder.", "vae.net."),)
    trains_on_captions = True
    fsdp_ready = False  # the UNet and text encoder are also registered in `trained` (the optimizer's and EMA's view)

    def __init__(
        self,
        vae_checkpoint: str,
        unet: UNetConfig | None = None,
        image_size: int = 64,
        text: TextConfig | None = None,
        clip_checkpoint: str | None = None,
        pooled_text: bool | None = None,
        caption_dropout: float = 0.1,
        guidance: float = 3.0,
        latent_scale: float | None = None,
        clip_sample: float | None = None,
        sample_prompts: Sequence[str] = DEFAULT_PROMPTS,
        vae_config: dict[str, Any] | None = None,
        text_from_clip: bool = False,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout={caption_dropout}: expected a probability in [0, 1)")
        if vae_config is not None:  # rebuilt from our own checkpoint: the weights follow in its state_dict
            vae = build_model(VAEModel, vae_config)
        else:
            vae = load_model(vae_checkpoint, expected=VAEModel)
        text_from_clip = text_from_clip or clip_checkpoint is not None
        if clip_checkpoint is not None and vae_config is None:  # a new model: the tower comes from the CLIP file
            from gen_lightning.models.clip import load_clip

            if text is not None:  # e.g. a config's `text:` block, with clip_checkpoint given on the command line
                log.warning("model.init_args.text is ignored: the text encoder is %s's text tower", clip_checkpoint)
            text_encoder = load_clip(clip_checkpoint).text
        else:  # trainable, or rebuilt from our own checkpoint (`text` is the saved shape, the weights follow)
            text_encoder = TextEncoder(text if text is not None else TextConfig())
        factor = vae.net.downsample_factor
        if image_size % factor:
            raise ValueError(f"image_size={image_size} is not divisible by the VAE's downsampling factor {factor}")
        unet_config = UNetConfig.coerce(unet if unet is not None else UNetConfig())
        unet_config.in_channels = unet_config.out_channels = vae.latent_shape[0]
        unet_config.context_dim = text_encoder.width
        if pooled_text is None:  # a checkpoint saved before pooled_text existed was trained without it
            pooled_text = vae_config is None
        unet_config.cond_dim = text_encoder.width if pooled_text else 0
        super().__init__(unet=unet_config, image_size=image_size // factor, clip_sample=clip_sample, **kwargs)
        self.hparams.update(
            image_size=image_size,
            vae_config={k: v for k, v in vae.hparams.items() if not k.startswith("_")},
            text=text_encoder.config.as_dict(),
            text_from_clip=text_from_clip,
            pooled_text=pooled_text,
            sample_prompts=list(sample_prompts),
        )
        self.vae = vae.requires_grad_(False).eval()
        self.text_encoder = text_encoder.requires_grad_(not text_from_clip)
        # EMA over everything that trains: the UNet and (when not CLIP's frozen tower) the text encoder.
        self.trained = nn.ModuleDict({"unet": self.unet, **({} if text_from_clip else {"text": self.text_encoder})})
        self.ema = EMA(self.trained, max_decay=self.hparams.ema_max_decay, power=self.hparams.ema_power)
        self.register_buffer("latent_scale", torch.tensor(math.nan if latent_scale is None else float(latent_scale)))
        self.truncation = TruncationCounter("latent diffusion captions")
        self._vae_sha256: str | None = None  # computed on the first pre-encoded batch

    def train(self, mode: bool = True) -> LatentDiffusionModel:
        super().train(mode)
        self.vae.eval()  # frozen first stage: always inference behaviour
        if self.hparams.text_from_clip:
            self.text_encoder.eval()
        return self

    # --- conditioning ---------------------------------------------------------------------------------------------
    def encode_captions(self, captions: Sequence[str], text_encoder: nn.Module | None = None) -> Context:
        encoder = text_encoder if text_encoder is not None else self.text_encoder
        tokens, lengths = self.text_encoder.tokenize(list(captions))
        self.truncation.update(list(captions), lengths, self.text_encoder.context_length)
        # Only as many positions as the longest caption of the batch: the causal encoder's states of real tokens do not
        # depend on the padding after them, and cross-attention masks it anyway, so this changes no result and
        # halves the text work on short captions (emoji names average ~25 bytes of a 64-byte context).
        tokens = tokens[:, : int(lengths.clamp(max=tokens.shape[1]).max())].to(self.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.hparams.text_from_clip):
            hidden = encoder(tokens)
        return hidden, TextEncoder.padding_mask(tokens), TextEncoder.pool(tokens, hidden)

    def drop_captions(self, captions: Sequence[str]) -> list[str]:
        """Each caption replaced by "" with probability caption_dropout (seeded by seed_everything's global RNG)."""
        p = self.hparams.caption_dropout
        return [c if torch.rand(()).item() >= p else "" for c in captions]

    # --- DiffusionModel hooks -------------------------------------------------------------------------------------
    @torch.no_grad()
    def diffusion_input(self, batch: dict[str, Any]) -> torch.Tensor:
        latents = self.stored_latents(batch) if "latent" in batch else self.vae.encode(self._images(batch))
        if not torch.isfinite(self.latent_scale):
            self.latent_scale.fill_(1.0 / self.estimate_latent_std(latents))
        latents = latents * self.latent_scale
        # NCHW input to a channels_last UNet would be converted in every convolution (~40% slower steps on CPU).
        return latents.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else latents

    def stored_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Latents of pre-encoded shards (data.latent_source), after checking they come from this model's VAE."""
        if self._vae_sha256 is None:
            self._vae_sha256 = self.vae.fingerprint()
        for key, meta in zip(batch["__key__"], batch["meta"], strict=True):
            made_by = (meta.get("latent") or {}).get("vae_sha256")
            if made_by != self._vae_sha256:
                raise ValueError(
                    f"sample {key}: its latent.npy was encoded by VAE {str(made_by)[:12]}, but this model's VAE is "
                    f"{self._vae_sha256[:12]} ({self.hparams.vae_checkpoint}); re-encode with `gen-lightning shards "
                    "encode --vae` of this VAE, or train on the image shards"
                )
        latents = batch["latent"]
        if tuple(latents.shape[1:]) != tuple(self.sample_shape):
            raise ValueError(f"stored latents are {tuple(latents.shape[1:])}, the model expects {self.sample_shape}")
        return latents

    def estimate_latent_std(self, latents: torch.Tensor) -> float:
        """Std of all ranks' latents of one batch (one number, so every rank scales identically)."""
        stats = torch.stack([latents.sum(), latents.pow(2).sum(), torch.tensor(latents.numel())]).double()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        total, squares, count = stats.tolist()
        return math.sqrt(max(squares / count - (total / count) ** 2, 1e-12))

    def denoiser(self, batch: dict[str, Any], use_ema: bool, training: bool) -> Callable[..., torch.Tensor]:
        networks = self.ema.shadow if use_ema else self.trained
        captions = self.drop_captions(batch["caption"]) if training else batch["caption"]
        context = self.encode_captions(captions, getattr(networks, "text", None))
        return lambda x, t: self.run_unet(networks["unet"], x, t, context)

    def run_unet(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: Context) -> torch.Tensor:
        hidden, mask, pooled = context
        return unet(x, t, hidden, mask, pooled if self.hparams.pooled_text else None)

    def after_optimizer_step(self, steps_done: int) -> None:
        self.update_ema(self.ema, self.trained, steps_done)

    def configure_optimizers(self) -> dict[str, Any]:
        return self.adamw_with_warmup(p for p in self.trained.parameters() if p.requires_grad)

    # --- sampling ---------------------------------------------------------------------------------------------------
    def prompts_for(self, n: int, prompts: str | Sequence[str] | None = None) -> list[str]:
        """n prompts: the given ones (a single string, or a list cycled to n), else sample_prompts cycled."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts) if prompts else list(self.hparams.sample_prompts)
        return [prompts[i % len(prompts)] for i in range(n)]

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: str | Sequence[str] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
    ) -> torch.Tensor:
        """n images in [-1, 1] for the prompts `cond` (cycled to n; default sample_prompts), with CFG weight
        `guidance` (default: the model's) and the configured sampler."""
        if not torch.isfinite(self.latent_scale):
            raise RuntimeError("latent_scale is not set: train at least one step or pass model.latent_scale")
        networks = self.ema.shadow if use_ema else self.trained
        text = getattr(networks, "text", None)
        weight = self.hparams.guidance if guidance is None else guidance

        def model(x: torch.Tensor, t: torch.Tensor, context: Context) -> torch.Tensor:
            return self.run_unet(networks["unet"], x, t, context)

        # One encoding for the prompts and the empty caption, so both contexts have the same (trimmed) length.
        both = self.encode_captions([*self.prompts_for(n, cond), ""], text)
        guided = guided_model(model, tuple(c[:-1] for c in both), tuple(c[-1:] for c in both), weight)
        latents = self.run_sampler(guided, n, steps=steps, sampler=sampler, eta=eta, generator=generator)
        return self.vae.decode(latents / self.latent_scale)
