"""LatentDiffusionModel: text-to-image diffusion in the latent space of a frozen VAE (Rombach et al. 2022), conditioned
on text through the UNet's cross-attention and steered by classifier-free guidance (Ho & Salimans 2022).

One trainable network, `self.net` = nn.text_unet.TextConditionedUNet (the UNet, its text encoder and the caption
dropout; with objective edm, EDMPrecond around it, the text keywords passed through), and its EMA copy; the first
stage is a plain frozen network, the trained VAE's autoencoder with its EMA weights, copied into this model's
checkpoints, so sampling needs only the latent-diffusion checkpoint. Latents are multiplied by `latent_scale` so they
have unit variance, as the noise schedule assumes (Stable Diffusion's 0.18215 is the same idea, measured once on a
batch of its data): unless given, it is estimated on the first batch the model sees (the sanity-check validation batch
when Lightning runs one, else the first training batch; std over all ranks' latents) and stored as a buffer, so a
resumed run keeps it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from gen_lightning.diffusion import Sampler
from gen_lightning.errors import UserInputError
from gen_lightning.interop.folders import is_pretrained_folder
from gen_lightning.models.checkpoint_format import renamed
from gen_lightning.models.clip import load_clip
from gen_lightning.models.diffusion import DiffusionModel
from gen_lightning.models.objectives import inner_network
from gen_lightning.models.vae import FirstStage, load_first_stage, vae_fingerprint
from gen_lightning.nn.autoencoder import Autoencoder, decode_fp32, encode_fp32
from gen_lightning.nn.text import TextConfig, TextEncoder, TruncationCounter
from gen_lightning.nn.text_unet import TextConditionedUNet
from gen_lightning.nn.unet import UNetConfig

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("red apple", "grinning face", "woman pilot", "dog face", "rocket", "blue heart", "sun", "cat")


class LatentDiffusionModel(DiffusionModel):
    """Args (besides DiffusionModel's, which apply in latent space):
    vae_checkpoint: the frozen first stage: a trained VAEModel checkpoint (or `gen-lightning export` folder), or a
        diffusers AutoencoderKL folder / Stable Diffusion pipeline folder (its vae/; needs the hf extra), used in fp32
        with the folder's scaling_factor and shift_factor.
    image_size: pixel H = W (linked from data.image_size); the UNet runs at image_size / the VAE's factor.
    text: shape of the trainable text encoder (byte tokenizer + causal transformer, nn.text); ignored when
        clip_checkpoint is set.
    clip_checkpoint: a CLIPModel checkpoint whose text tower becomes the frozen text encoder, or a transformers
        CLIPTextModel / CLIPModel folder with its tokenizer (a Stable Diffusion pipeline folder: text_encoder/ +
        tokenizer/; needs the hf extra).
    text_layer: which hidden states of a Hugging Face CLIP tower condition the UNet: "last" (SD 1.x) or
        "penultimate" (SD 2.x on a full-depth tower); gen_lightning's own towers offer "last" only.
    pooled_text: also add the caption's pooled state (the EOT token's hidden state) to the UNet's time embedding, so
        every residual block sees the caption through its scale/shift, not only the cross-attention layers (Imagen
        and SDXL do the same); cross-attention alone learns to use the text slowly (bench/RESULTS.md).
        Default (None): on for a new model, off for a checkpoint written before the option existed.
    caption_dropout: probability of training on the empty caption instead, which trains the unconditional
        branch that classifier-free guidance needs (10% as in SD/Imagen).
    guidance: default CFG weight w of `sample()` (1 = plain conditional, 0 = unconditional).
    latent_scale: multiply VAE latents (minus the folder VAE's shift_factor) by this; None: a diffusers folder's
        scaling_factor, else estimated (module docstring); "measure": estimated for any VAE.
    clip_sample: bound on the sampler's predicted x0 (DiffusionModel's). None here, unlike in pixel space: scaled
        latents have unit variance, not a [-1, 1] range (about a quarter of the emoji VAE's values lie outside it,
        some beyond 3), and clipping them distorts every sample; Stable Diffusion does not clip latents either.
    sigma_data: with objective edm, the latents' standard deviation; None (default) here means 1, since latents are
        scaled to unit variance (pixel models default to 0.5).
    sample_prompts: prompts `sample()` cycles through when called without any (sample grids, evaluation).
    vae_config / vae_sha256 / text_from_clip / text_sha256: filled in automatically, so a checkpoint rebuilds
        without the original files (the VAE's hyper-parameters and fingerprint; whether the text tower is CLIP's).

    Storage rule: a gen_lightning VAE or CLIP tower is copied into this model's checkpoints; a Hugging Face folder is
    referenced (its resolved path and the sha256 of its weights), not copied: SD's VAE and CLIP-L's tower would add
    ~1.3 GB (with the EMA's copy) to every checkpoint. A folder that moved or changed is refused by name;
    `gen-lightning export` writes a folder that carries the parts and can be moved.
    """

    kind = "text-to-image"
    trains_on_captions = True
    checkpoint_format = 3
    default_sigma_data = 1.0  # edm: latents are scaled to unit variance (latent_scale)

    def __init__(
        self,
        vae_checkpoint: str,
        unet: UNetConfig | None = None,
        image_size: int = 64,
        text: TextConfig | None = None,
        clip_checkpoint: str | None = None,
        text_layer: str = "last",
        pooled_text: bool | None = None,
        caption_dropout: float = 0.1,
        guidance: float = 3.0,
        latent_scale: float | Literal["measure"] | None = None,
        clip_sample: float | None = None,
        sample_prompts: Sequence[str] = DEFAULT_PROMPTS,
        vae_config: dict[str, Any] | None = None,
        text_from_clip: bool = False,
        vae_sha256: str | None = None,
        text_sha256: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout={caption_dropout}: expected a probability in [0, 1)")
        if isinstance(latent_scale, str) and latent_scale != "measure":
            raise ValueError(f"model.init_args.latent_scale={latent_scale!r}: expected a number, 'measure' or null")
        if (vae_config or {}).get("diffusers_folder") or is_pretrained_folder(vae_checkpoint, "vae"):
            # A Hugging Face folder is always re-read from its path (its weights are not in our checkpoints).
            first_stage = load_first_stage(referenced_folder(vae_checkpoint, "VAE"))
            same_weights("VAE", vae_checkpoint, vae_sha256, first_stage.fingerprint)
            vae_checkpoint = str(Path(vae_checkpoint).resolve())
        elif vae_config is not None:  # rebuilt from our own checkpoint: the weights follow in its state_dict
            first_stage = FirstStage(Autoencoder(vae_config["autoencoder"]), vae_config, vae_sha256)
        else:
            first_stage = load_first_stage(vae_checkpoint)
        text_from_clip = text_from_clip or clip_checkpoint is not None
        hf_text = bool(text_sha256) or is_pretrained_folder(clip_checkpoint, "text_encoder")
        if text_layer != "last" and not hf_text:
            raise ValueError(
                f"model.init_args.text_layer={text_layer!r} needs a Hugging Face CLIP text folder as clip_checkpoint; "
                "the byte-level encoder and gen_lightning's CLIP offer the last layer only"
            )
        if hf_text:
            from gen_lightning.interop.clip_text import CLIPTextTower

            if text is not None and vae_config is None:
                log.warning("model.init_args.text is ignored: the text encoder is %s's text tower", clip_checkpoint)
            text_encoder = CLIPTextTower(referenced_folder(clip_checkpoint, "text encoder"), text_layer)
            text_sha256 = same_weights("text encoder", clip_checkpoint, text_sha256, tower_fingerprint(text_encoder))
            clip_checkpoint = str(Path(clip_checkpoint).resolve())
        elif clip_checkpoint is not None and vae_config is None:  # a new model: the tower comes from the CLIP file
            if text is not None:  # e.g. a config's `text:` block, with clip_checkpoint given on the command line
                log.warning("model.init_args.text is ignored: the text encoder is %s's text tower", clip_checkpoint)
            text_encoder = load_clip(clip_checkpoint).text
        else:  # trainable, or rebuilt from our own checkpoint (`text` is the saved shape, the weights follow)
            text_encoder = TextEncoder(text if text is not None else TextConfig())
        factor = first_stage.downsample_factor
        if image_size % factor:
            raise ValueError(f"image_size={image_size} is not divisible by the VAE's downsampling factor {factor}")
        unet_config = UNetConfig.coerce(unet if unet is not None else UNetConfig())
        unet_config.in_channels = unet_config.out_channels = first_stage.latent_channels
        unet_config.context_dim = text_encoder.width
        if pooled_text is None:  # a checkpoint saved before pooled_text existed was trained without it
            pooled_text = vae_config is None
        unet_config.cond_dim = text_encoder.width if pooled_text else 0
        super().__init__(unet=unet_config, image_size=image_size // factor, clip_sample=clip_sample, **kwargs)
        self.hparams.update(
            vae_checkpoint=vae_checkpoint,
            clip_checkpoint=clip_checkpoint,
            image_size=image_size,
            vae_config=first_stage.config,
            vae_sha256=first_stage.fingerprint,
            text_sha256=text_sha256 if hf_text else None,
            text=None if hf_text else text_encoder.config.as_dict(),
            text_from_clip=text_from_clip,
            pooled_text=pooled_text,
            sample_prompts=list(sample_prompts),
        )
        # The UNet DiffusionModel built is the same object inside, so a seed gives the same weights as before.
        network = TextConditionedUNet(
            self.inner_net, text_encoder, pooled_text=pooled_text, caption_dropout=caption_dropout,
            train_text=not text_from_clip,
        )  # fmt: skip
        self.wrap_network(network)
        self.vae = first_stage.autoencoder.requires_grad_(False).eval()
        if latent_scale is None:  # a folder's own scale; ours is measured on the first batch
            latent_scale = first_stage.scaling_factor
        scale = math.nan if latent_scale in (None, "measure") else float(latent_scale)
        self.register_buffer("latent_scale", torch.tensor(scale))
        # Not persistent: it is the folder's, re-read with it (SD3/FLUX-style VAEs; 0 for SD 1/2/XL and ours).
        self.register_buffer("latent_shift", torch.tensor(first_stage.shift_factor), persistent=False)
        text_path = "inner.text." if self.net is not self.inner_net else "text."  # edm: under EDMPrecond
        self.external = (("vae.",) if first_stage.external else ()) + (
            (f"net.{text_path}", f"ema.shadow.{text_path}") if hf_text else ()
        )
        self.truncation = TruncationCounter("latent diffusion captions")

    @classmethod
    def upgrade_from_format_1(cls, checkpoint: dict[str, Any]) -> None:
        """Format 1 held the UNet and text encoder twice (as attributes and in `trained`) and a whole VAEModel."""
        state, hparams = checkpoint["state_dict"], checkpoint.setdefault("hyper_parameters", {})
        # The fingerprint the VAE's latents carry: its whole state, under the names it was saved with.
        hparams.setdefault("vae_sha256", vae_fingerprint({k[4:]: v for k, v in state.items() if k.startswith("vae.")}))
        from_clip = bool(hparams.get("text_from_clip"))
        rules = [
            ("unet.", None),  # the same tensors as trained.unet.*
            ("trained.unet.", "net.unet."),
            ("trained.text.", "net.text."),
            ("text_encoder.", "net.text." if from_clip else None),  # trainable: the same tensors as trained.text.*
            ("vae.ema.shadow.", "vae."),  # the weights VAEModel.encode/decode used
            ("vae.autoencoder.", None),
            ("vae.ema.num_updates", None),
            ("vae.logvar", None),
        ]
        upgraded = renamed(state, rules)
        if from_clip:  # the EMA now holds the frozen tower too (it is part of the one network)
            tower = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
            upgraded.update({f"ema.shadow.text.{k}": v.clone() for k, v in tower.items()})
        checkpoint["state_dict"] = upgraded

    @classmethod
    def upgrade_from_format_2(cls, checkpoint: dict[str, Any]) -> None:
        """The first stage of a checkpoint before format 3 padded its downsampling on all sides."""
        vae_config = checkpoint.setdefault("hyper_parameters", {}).get("vae_config")
        if isinstance(vae_config, dict):
            vae_config.setdefault("autoencoder", {}).setdefault("downsample", "same")

    def external_state_prefixes(self) -> tuple[str, ...]:
        return self.external

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {})
        for what, key in (("VAE", "vae_sha256"), ("text encoder", "text_sha256")):
            if self.hparams.get(key) and saved.get(key) and saved[key] != self.hparams[key]:
                raise UserInputError(
                    f"this checkpoint was trained with a {what} of sha256 {saved[key][:12]}, the model being resumed "
                    f"has {self.hparams[key][:12]}: resume with the {what} the run was trained with"
                )
        # `fit --ckpt_path` of a format-1 checkpoint: LightningCLI built this model from the file's raw
        # hyper-parameters, which predate the fingerprint; the upgraded checkpoint has it.
        if self.hparams.vae_sha256 is None:
            self.hparams.vae_sha256 = checkpoint["hyper_parameters"].get("vae_sha256")

    def train(self, mode: bool = True) -> LatentDiffusionModel:
        super().train(mode)
        self.vae.eval()  # frozen first stage: always inference behaviour
        return self

    # --- DiffusionModel hooks -------------------------------------------------------------------------------------
    @torch.no_grad()
    def diffusion_input(self, batch: dict[str, Any]) -> torch.Tensor:
        latents = self.stored_latents(batch) if "latent" in batch else encode_fp32(self.vae, self._images(batch))
        if not torch.isfinite(self.latent_scale):
            self.latent_scale.fill_(1.0 / self.estimate_latent_std(latents))
        latents = (latents - self.latent_shift) * self.latent_scale
        # NCHW input to a channels_last UNet would be converted in every convolution (~40% slower steps on CPU).
        return latents.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else latents

    def stored_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Latents of pre-encoded shards (data.latent_source), after checking they come from this model's VAE."""
        own = self.hparams.vae_sha256
        for key, meta in zip(batch["__key__"], batch["meta"], strict=True):
            made_by = (meta.get("latent") or {}).get("vae_sha256")
            if made_by != own:
                raise ValueError(
                    f"sample {key}: its latent.npy was encoded by VAE {str(made_by)[:12]}, but this model's VAE is "
                    f"{str(own)[:12]} ({self.hparams.vae_checkpoint}); re-encode with `gen-lightning shards "
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

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids of the captions on the model's device; truncated captions are counted (one warning a run)."""
        tokens, lengths = self.inner_net.tokenize(captions)
        self.truncation.update(list(captions), lengths, self.inner_net.text.context_length)
        return tokens.to(self.device)

    def condition(
        self, batch: Mapping[str, Any], training: bool, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """The captions' tokens; the network drops captions itself in training mode (never in the EMA copy, which
        validation and sampling use in eval mode)."""
        return {"tokens": self.tokenize(batch["caption"])}

    # --- sampling ---------------------------------------------------------------------------------------------------
    def prompts_for(self, n: int, prompts: str | Sequence[str] | None = None) -> list[str]:
        """n prompts: the given ones (a single string, or a list cycled to n), else sample_prompts cycled."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts) if prompts else list(self.hparams.sample_prompts)
        return [prompts[i % len(prompts)] for i in range(n)]

    def sampling_defaults(self) -> dict[str, Any]:
        return {**super().sampling_defaults(), "guidance": self.hparams.guidance}

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: str | Sequence[str] | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """n images in [-1, 1] for the prompts `cond` (cycled to n; None: sample_prompts) with CFG weight `guidance`
        (None: the model's; any float, 1 for plain conditional samples) (GenerativeModule.sample)."""
        if not torch.isfinite(self.latent_scale):
            raise RuntimeError("latent_scale is not set: train at least one step or pass model.latent_scale")
        with self.evaluating():
            # One encoding for the prompts and the empty caption, so both contexts have the same (trimmed) length.
            text_net = inner_network(self.ema.shadow)
            hidden, mask, pooled = text_net.encode(self.tokenize([*self.prompts_for(n, cond), ""]))
            prompts = {"context": (hidden[:-1], mask[:-1], pooled[:-1])}
            empty = {"context": (hidden[-1:], mask[-1:], pooled[-1:])}
            weight = self.hparams.guidance if guidance is None else guidance
            latents = self.draw(n, prompts, empty, guidance=weight, steps=steps, sampler=sampler, generator=generator)
            return decode_fp32(self.vae, latents / self.latent_scale + self.latent_shift)


def referenced_folder(path: str | Path, what: str) -> str:
    """A pretrained folder a checkpoint refers to: it must still be there (it is not copied into checkpoints)."""
    if not Path(path).exists():
        raise UserInputError(
            f"this model needs the {what} folder {str(path)!r}, which does not exist: pretrained folders are "
            "referenced by checkpoints, not copied into them; restore it, or use a folder written by "
            "gen-lightning export (it copies the parts)"
        )
    return str(path)


def same_weights(what: str, path: str | Path, expected: str | None, found: str | None) -> str | None:
    """The folder's fingerprint, after checking it is the one the checkpoint was trained with."""
    if expected and found != expected:
        raise UserInputError(
            f"this model was trained with the {what} folder {str(path)!r} (sha256 {expected[:12]}), which now holds "
            f"sha256 {str(found)[:12]}; restore that folder, or use a folder written by gen-lightning export"
        )
    return found


def tower_fingerprint(tower: torch.nn.Module) -> str:
    """sha256 of a Hugging Face text tower's weights (the same digest as a VAE's: names, dtypes, shapes, values)."""
    return vae_fingerprint(tower.model.state_dict())
