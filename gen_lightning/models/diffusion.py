"""DiffusionModel: diffusion (VP schedule, eps/v/x0 target), rectified-flow or EDM training of a UNet or a DiT on
images, sampled from EMA weights by any sampler of its objective.

The model holds one trainable network, `self.net`, called as `net(x_t, t, **cond)`, and its EMA copy: subclasses
(latent diffusion, the world model) wrap the UNet in a network that takes their conditioning and supply it through
`condition()`; the loss, the EMA, the samplers and FSDP all see that one module. With objective edm that module is
EDMPrecond around the conditioned network (`inner_net`), called as net(x, sigma, **cond).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from gen_lightning.diffusion import (
    AutoGuidanceDenoiser,
    CFGDenoiser,
    GuidanceInterval,
    NoiseSchedule,
    Sampler,
    build_edm_sampler,
    build_flow_sampler,
    build_sampler,
    gaussian_noise,
    sample_loop,
    timestep_to_sigma,
    vp_sigmas,
)
from gen_lightning.diffusion.flow import FLOW_TIME_SCALE
from gen_lightning.errors import UserInputError
from gen_lightning.models.backbones import build_backbone
from gen_lightning.models.base import GenerativeModule
from gen_lightning.models.objectives import (
    DEFAULT_SAMPLER,
    check_objective,
    check_sampler_name,
    check_sampler_object,
    inner_network,
    objective_loss,
    objective_network,
)
from gen_lightning.nn.dit import DiTConfig
from gen_lightning.nn.ema import EMA
from gen_lightning.nn.unet import UNetConfig

# What makes two models' outputs comparable: the same noising process, parameterisation and sample shape. A guide
# that differs in one of them would be combined in another space than it was trained in.
GUIDE_MUST_MATCH = (
    "objective", "schedule", "num_timesteps", "zero_terminal_snr", "prediction_type", "sigma_data", "time_shift",
    "image_size",
)  # fmt: skip


class DiffusionModel(GenerativeModule):
    """Unconditional pixel-space diffusion.

    Args:
        unet: UNet shape (in/out channels must equal the image channels). With the DiT, its in/out channels (and
            a subclass's context and cond widths) still say what the network takes and gives.
        backbone: "unet" or "dit" (models.backbones): the network that denoises.
        dit: DiT shape (patch_size, width, depth, num_heads, mlp_ratio, gradient_checkpointing, ...) with
            backbone=dit; its channels and widths come from the model.
        image_size: H = W of training images and samples (linked from data.image_size by the CLI).
        objective: "vp" (a VP noise schedule, the options up to min_snr_gamma), "flow" (rectified flow, the
            time_* and logit_* options) or "edm" (EDM's preconditioning, sigma_data to rho); see models.objectives.
            An option of another objective is refused.
        schedule / num_timesteps / zero_terminal_snr: the noise schedule (see diffusion.NoiseSchedule).
        prediction_type: "epsilon", "v" or "sample": what the UNet predicts.
        loss_weighting: "uniform" or "min_snr" (Min-SNR-γ, Hang et al. 2023) with min_snr_gamma.
        time_sampling / logit_mean / logit_std: flow's training times, "uniform" or "logit_normal" (SD3).
        time_shift: flow's time shift s (t -> s t / (1 + (s - 1) t), SD3), in training and sampling alike.
        sigma_data: edm's data standard deviation in c_skip, c_out, c_in and the loss weight (None: the model's
            default_sigma_data, 0.5 for images in [-1, 1]; the resolved value is saved).
        p_mean / p_std: edm's training noise levels, ln sigma ~ N(p_mean, p_std^2).
        sigma_min / sigma_max / rho: the Karras sigmas (EDM eq. 5) that edm_euler and edm_heun step through.
        offset_noise: every objective's: the standard deviation of a per-sample, per-channel constant added to the
            training noise (offset noise, Guttenberg 2023; DIAMOND uses 0.3), so the model learns to change an
            image's overall colour. edm's coefficients and loss weight then see sqrt(sigma^2 + offset_noise^2), as
            DIAMOND's do. 0 (the default) draws exactly the noise drawn without the option.
        lr / weight_decay / adam_betas / warmup_steps / lr_schedule: AdamW with linear warm-up, then "constant" or
            "cosine" decay to 10% over the run.
        ema_max_decay / ema_power: EMA with warm-up (see nn.ema); samples come from the EMA weights.
        sampler / sample_steps / eta / clip_sample: defaults of `sample()`. sampler: one of ALL_SAMPLER_NAMES that
            fits the objective (None: ddim for vp, flow_euler for flow, edm_heun for edm); eta is DDIM's;
            clip_sample bounds the predicted x0 of the vp samplers.
        guidance_interval: (low, high): classifier-free guidance or autoguidance only at noise levels
            low < sigma <= high (diffusion.GuidanceInterval; sigma on EDM's axis for every objective); None: at all.
        channels_last: NHWC memory layout for the UNet (faster convolutions on CPU and on tensor cores).
        compile: torch.compile the UNet in place (same parameter names, so checkpoints are unchanged; the first steps
            pay the compilation).
        fused_adamw: AdamW's fused kernel (one kernel for all parameters) instead of the per-tensor loop.
    """

    format_1_renames = (("unet.", "net."),)
    default_sigma_data = 0.5  # EDM's value for images in [-1, 1]
    guide_must_match: ClassVar[tuple[str, ...]] = GUIDE_MUST_MATCH

    def __init__(
        self,
        unet: UNetConfig | None = None,
        image_size: int = 32,
        backbone: str = "unet",
        dit: DiTConfig | None = None,
        objective: str = "vp",
        schedule: str = "linear",
        num_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        prediction_type: str = "epsilon",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        time_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        time_shift: float = 1.0,
        sigma_data: float | None = None,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        offset_noise: float = 0.0,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 500,
        lr_schedule: str = "constant",
        ema_max_decay: float = 0.9999,
        ema_power: float = 2 / 3,
        sampler: str | None = None,
        sample_steps: int = 50,
        eta: float = 0.0,
        clip_sample: float | None = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        channels_last: bool = False,
        compile: bool = False,
        fused_adamw: bool = True,
    ) -> None:
        arguments = {key: value for key, value in locals().items() if key not in ("self", "__class__")}
        super().__init__()
        unet_config = UNetConfig.coerce(unet if unet is not None else UNetConfig())
        self.save_hyperparameters()
        # Under LightningCLI the saved arguments are the config's init_args, a subclass's own (a distilled student's
        # are not its network's shape): every option of this class is read from hparams below, so add the missing.
        for key, value in arguments.items():
            self.hparams.setdefault(key, value)
        check_objective(objective, self.hparams)
        if offset_noise < 0:
            raise UserInputError(f"model.offset_noise={offset_noise} must be >= 0")
        if objective == "edm" and sigma_data is None:  # checkpoints record the value trained with
            self.hparams["sigma_data"] = self.default_sigma_data
        self.hparams["sampler"] = sampler or DEFAULT_SAMPLER[objective]  # checkpoints name the sampler they used
        self.hparams["unet"] = unet_config.as_dict()  # plain types only: checkpoints load weights-only
        backbone_net, dit_config = build_backbone(backbone, unet_config, dit, image_size)
        self.hparams["dit"] = dit_config.as_dict() if dit_config is not None else None
        self.wrap_network(backbone_net)
        self.schedule = NoiseSchedule.from_name(schedule, num_timesteps, zero_terminal_snr=zero_terminal_snr)
        self.loss_fn = objective_loss(objective, self.hparams, self.schedule)
        self.make_sampler()  # fail at construction, not after an hour of training, on a bad sampler setting
        self.guidance_interval()  # and on a bad guidance interval
        self.sample_shape = (unet_config.in_channels, image_size, image_size)  # what the sampler draws
        self.set_autoguidance(None)

    def wrap_network(self, net: torch.nn.Module) -> None:
        """`net` (holding the backbone, net(x_t, t, **cond)) becomes the trained network, inside the objective's
        wrapper (EDMPrecond for edm), with a fresh EMA copy of it. Subclasses wrap `inner_net` in their conditioned
        network and pass that here."""
        self.net = objective_network(self.objective, self.hparams, net)
        self.ema = EMA(self.net, max_decay=self.hparams.ema_max_decay, power=self.hparams.ema_power)

    @property
    def inner_net(self) -> torch.nn.Module:
        """The network holding the backbone and the conditioning: `net` itself, or the one inside EDMPrecond (edm)."""
        return inner_network(self.net)

    # --- training -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        if self.hparams.compile and not getattr(self.net, "_compiled_call_impl", None):
            self.net.compile()

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        images = batch["image"]
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    # Hooks a conditional / latent subclass overrides; everything else (loss, EMA, samplers) is shared.
    def diffusion_input(self, batch: dict[str, Any]) -> torch.Tensor:
        """What the diffusion runs on: the images here, VAE latents in LatentDiffusionModel."""
        return self._images(batch)

    def condition(
        self, batch: Mapping[str, Any], training: bool, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """The network's keyword arguments for this batch, `net(x_t, t, **cond)` (none here). `training`: drawn as
        in training (augmentations on); `generator` for what is drawn otherwise."""
        return {}

    def pixel_weight(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Per-pixel loss weights (mean 1 per sample), or None for a plain mean over pixels (here)."""
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self.diffusion_input(batch)
        cond = self.condition(batch, training=True)
        loss = self.loss_fn(self.net, x0, pixel_weight=self.pixel_weight(batch), extra_args=cond)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x0 = self.diffusion_input(batch)
        # A fixed generator per batch: val/loss is comparable between evaluations, not re-drawn noise.
        generator = torch.Generator(device=x0.device).manual_seed(1_000_003 * batch_idx + self.global_rank)
        cond = self.condition(batch, training=False)
        loss = self.loss_fn(
            self.ema.shadow, x0, generator=generator, pixel_weight=self.pixel_weight(batch), extra_args=cond
        )
        self.log_val_mean("val/loss", loss, x0.shape[0])

    def after_optimizer_step(self, steps_done: int) -> None:
        self.update_ema(self.ema, self.net, steps_done)

    def configure_optimizers(self) -> dict[str, Any]:
        return self.adamw_with_warmup(p for p in self.net.parameters() if p.requires_grad)

    # --- sampling -------------------------------------------------------------------------------------------------
    @property
    def objective(self) -> str:
        return self.hparams.objective

    def make_sampler(self, name: str | None = None, eta: float | None = None) -> Sampler:
        """The named sampler (default: the model's; any of ALL_SAMPLER_NAMES that fits the objective) with the model's
        settings: prediction type and clip_sample (vp), the time shift (flow), the Karras sigmas (edm); DDIM's eta
        defaults to the model's."""
        name = name or self.hparams.sampler
        check_sampler_name(self.objective, name)
        if eta is not None and name != "ddim":
            raise UserInputError(f"eta is DDIM's noise scale; sampler {name!r} has none")
        if self.objective == "flow":
            return build_flow_sampler(name, shift=self.hparams.time_shift)
        if self.objective == "edm":
            hp = self.hparams
            return build_edm_sampler(name, sigma_min=hp.sigma_min, sigma_max=hp.sigma_max, rho=hp.rho)
        kwargs: dict[str, Any] = {"clip_sample": self.hparams.clip_sample}
        if name == "ddim":
            kwargs["eta"] = self.hparams.eta if eta is None else eta
        return build_sampler(name, self.schedule, self.hparams.prediction_type, **kwargs)

    def resolve_sampler(self, sampler: str | Sampler | None) -> Sampler:
        """A sampler object as given (any kind that fits the objective), or one made by name (None: the model's)."""
        if sampler is None or isinstance(sampler, str):
            return self.make_sampler(sampler)
        check_sampler_object(self.objective, sampler)
        return sampler

    def sampling_defaults(self) -> dict[str, Any]:
        hparams = self.hparams
        settings: dict[str, Any] = {"sampler": hparams.sampler, "steps": hparams.sample_steps}
        if self.objective == "flow":
            settings["time_shift"] = hparams.time_shift
        elif self.objective == "edm":
            settings.update({key: hparams[key] for key in ("sigma_min", "sigma_max", "rho")})
        else:
            settings.update({"eta": hparams.eta} if hparams.sampler == "ddim" else {})
            settings["clip_sample"] = hparams.clip_sample
        if (interval := self.guidance_interval()) is not None:
            settings["guidance_interval"] = [interval.low, interval.high]
        return settings

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time argument as EDM's sigma, the noise-to-signal ratio (float64), the one axis on which a
        guidance interval is given for every objective: vp timesteps through the schedule, flow's t / (1 - t), edm's
        sigma itself."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.objective == "edm":
            return t
        if self.objective == "flow":
            time = t / FLOW_TIME_SCALE
            return time / (1 - time)  # inf at t = 1, pure noise
        return timestep_to_sigma(t, vp_sigmas(self.schedule))

    def guidance_interval(self) -> GuidanceInterval | None:
        """hparams.guidance_interval as a GuidanceInterval (None: guide at every noise level); a bad pair names the
        option. Checkpoints from before the option have none."""
        interval = self.hparams.get("guidance_interval")
        if interval is None:
            return None
        try:
            low, high = (float(value) for value in interval)
            return GuidanceInterval(low, high)
        except (TypeError, ValueError) as err:
            raise UserInputError(f"model.guidance_interval={interval!r}: expected [low, high] sigmas, {err}") from err

    def _guided_at(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        interval = self.guidance_interval()
        if interval is None:
            return None
        return lambda t: interval.contains(self.noise_level(t))

    def set_autoguidance(self, guide: DiffusionModel | None) -> None:
        """Guide sampling with a weaker version of this model (autoguidance, Karras et al. 2024; see
        diffusion.AutoGuidanceDenoiser): `sample(..., guidance=w)` then returns `guide + w (self - guide)` at every
        network call, from both models' EMA weights. The guide is typically an earlier checkpoint of the same run: it
        must share the class, objective, parameterisation and sample shape (refused by name otherwise). It is not a
        submodule: it is not saved, trained or moved with this model. None removes it."""
        if guide is not None:
            if type(guide) is not type(self) or self.kind not in ("image", "next-frame"):
                raise UserInputError(
                    f"autoguidance: a {type(self).__name__} can be guided by another {type(self).__name__} of an "
                    f"unconditional image model or a world model; got a {type(guide).__name__} (not supported for "
                    "text-to-image models yet)"
                )
            for key in self.guide_must_match:
                if guide.hparams.get(key) != self.hparams.get(key):
                    raise UserInputError(
                        f"autoguidance: the guide's {key}={guide.hparams.get(key)!r} differs from the model's "
                        f"{self.hparams.get(key)!r}; the guide must be trained the same way (an earlier checkpoint)"
                    )
            if tuple(guide.sample_shape) != tuple(self.sample_shape):
                raise UserInputError(
                    f"autoguidance: the guide draws {tuple(guide.sample_shape)}, the model {tuple(self.sample_shape)}"
                )
            guide.requires_grad_(False).eval()
        object.__setattr__(self, "autoguide", guide)  # bypasses nn.Module: not a submodule, not in the state dict

    @torch.no_grad()
    def draw(
        self,
        n: int,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        *,
        guidance: float = 1.0,
        steps: int | None = None,
        sampler: str | Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """n draws of shape `sample_shape` from x_T ~ N(0, I), in eval mode, by the EMA network called as
        `net(x_t, t, **cond)`; with `uncond` (the unconditional branch's arguments), classifier-free guided with
        weight `guidance`; with an autoguidance model set (set_autoguidance), guided by it with that weight instead.
        (Sampling from the raw weights: `ema.copy_from(net)` first.)"""
        denoiser, extra_args = self.ema.shadow, dict(cond or {})
        if self.autoguide is not None:
            denoiser = AutoGuidanceDenoiser(self.ema.shadow, self.autoguide.ema.shadow, guidance, self._guided_at())
        elif uncond is not None:
            denoiser = CFGDenoiser(self.ema.shadow, guidance, self._guided_at())
            extra_args = {"cond": cond, "uncond": uncond}
        sampler = self.resolve_sampler(sampler)
        noise = gaussian_noise((n, *self.sample_shape), generator, self.device)
        with self.evaluating():
            return sample_loop(
                denoiser, sampler, noise, steps or self.hparams.sample_steps, extra_args, generator=generator
            )

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """n images in [-1, 1], NCHW (GenerativeModule.sample). Unconditional: no cond; `guidance` only with an
        autoguidance model set (set_autoguidance; None: 1, unguided)."""
        if cond is not None:
            raise ValueError(f"{type(self).__name__} is unconditional: sample() takes no cond")
        if guidance is not None and self.autoguide is None:
            raise ValueError(
                f"{type(self).__name__} is unconditional: guidance needs an autoguidance model (set_autoguidance; "
                "`--guide-ckpt` on the command line)"
            )
        weight = 1.0 if guidance is None else guidance
        return self.draw(n, guidance=weight, steps=steps, sampler=sampler, generator=generator).clamp(-1, 1)
