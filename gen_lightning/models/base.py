"""What every gen_lightning LightningModule shares: AdamW with warm-up, EMA stepping, checkpoint identity."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, Literal

import lightning as L
import torch

from gen_lightning.console import silence_frozen_eval_warning
from gen_lightning.diffusion import Sampler
from gen_lightning.errors import UserInputError
from gen_lightning.models.checkpoint_format import Rule, renamed, upgrade
from gen_lightning.nn.ema import EMA

ModelKind = Literal["image", "text-to-image", "next-frame", "encoder"]


class GenerativeModule(L.LightningModule):
    """Subclasses call `save_hyperparameters()` with plain-typed arguments only, so that a checkpoint can be rebuilt
    from `weights_only=True` loading (see models.loading)."""

    # What the model is, for the CLI and the evaluation (never probed with hasattr): "image" generates images,
    # "text-to-image" from prompts, "next-frame" the next screen of a world model, "encoder" none (CLIP).
    kind: ClassVar[ModelKind] = "image"
    # Its loss uses the caption, so the DataModule skips (and counts) samples without one instead of feeding "".
    trains_on_captions: ClassVar[bool] = False
    # The layout of this class's state dict (models.checkpoint_format), and the renames from format 1.
    checkpoint_format: ClassVar[int] = 2
    # Whether the model keeps an EMA copy of `net` (`ema.shadow`); CLIP does not.
    keeps_ema: ClassVar[bool] = True
    format_1_renames: ClassVar[tuple[Rule, ...]] = ()
    _last_ema_step = -1

    def adamw_with_warmup(
        self, params: Iterable[torch.nn.Parameter], restart_every: int | None = None
    ) -> dict[str, Any]:
        """AdamW with `warmup_steps` of linear warm-up, then the lr_schedule. `restart_every`: the warm-up starts
        again every that many steps (distillation rounds, each a fresh optimization)."""
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            params,
            lr=hp.lr,
            betas=tuple(hp.adam_betas),
            weight_decay=hp.weight_decay,
            # The fused kernel exists on CPU and CUDA in this torch and is the fastest AdamW on both
            # (bench/speed_features.py); models may expose `fused_adamw` to switch it off.
            fused=bool(hp.get("fused_adamw", True)) and not self._clipping_under_mixed_precision(),
        )
        warmup = max(0, int(hp.warmup_steps))
        total = self.trainer.estimated_stepping_batches if hp.lr_schedule == "cosine" else None
        if hp.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"model.lr_schedule={hp.lr_schedule!r}: expected 'constant' or 'cosine'")

        def factor(step: int) -> float:
            if restart_every and step % restart_every < warmup:
                return (step % restart_every + 1) / warmup
            if step < warmup:
                return (step + 1) / warmup
            if total is None or not math.isfinite(total):
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        # NHWC weights (the `channels_last` option of the image models) before the strategy wraps the model: DDP lays
        # out its gradient buckets by the parameters' strides when it is built. Converted later (in on_fit_start, as
        # before), every backward copied each convolution's gradient between layouts, and torch warned on each rank.
        if self.hparams.get("channels_last"):
            self.to(memory_format=torch.channels_last)

    def on_fit_start(self) -> None:
        silence_frozen_eval_warning(self)  # frozen pretrained parts are in eval mode on purpose

    def setup(self, stage: str) -> None:
        if stage == "fit" and (problem := strategy_problem(self, self.trainer.strategy)):
            raise UserInputError(problem)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except under FSDP, where Lightning refuses to clip by norm: each rank holds a shard
        of every gradient, so the norm must be taken over all of them, which FSDP's own clip_grad_norm_ does."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        by_norm = gradient_clip_algorithm in (None, "norm")  # by value is element-wise: Lightning's is right on shards
        if gradient_clip_val and by_norm and isinstance(root, FullyShardedDataParallel):
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _clipping_under_mixed_precision(self) -> bool:
        """Lightning refuses gradient clipping with an optimizer that "unscales gradients internally" (any fused
        one) under *-mixed precision, even bf16 where nothing is scaled: the step would crash. Then AdamW runs its
        multi-tensor (foreach) path instead, which is nearly as fast."""
        trainer = self._trainer
        return bool(trainer and "mixed" in str(trainer.precision) and trainer.gradient_clip_val)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if not self.trainer.strategy.handles_gradient_accumulation:
            # Right after the step, before any callback's batch-end hook: a checkpoint written there (every N steps,
            # SIGUSR1) holds this step's EMA, so a resumed run's EMA is the uninterrupted run's. The loop counts the
            # step once this hook returns.
            self.after_optimizer_step(self.trainer.global_step + 1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # DeepSpeed calls optimizer_step on every micro-batch and steps inside its engine: wait until it is counted.
        if self.trainer.strategy.handles_gradient_accumulation:
            self.after_optimizer_step(self.trainer.global_step)

    def after_optimizer_step(self, steps_done: int) -> None:
        """Called once per optimizer step (not per micro-batch under gradient accumulation): EMA updates go here."""

    def update_ema(self, ema: EMA, model: torch.nn.Module, steps_done: int) -> None:
        if steps_done != self._last_ema_step:
            self._last_ema_step = steps_done
            decay = ema.update(model)
            self.log("train/ema_decay", decay, on_step=True, on_epoch=False)

    def log_val_mean(self, name: str, value: torch.Tensor, count: int) -> None:
        """Log a val metric as its mean over every rank's samples, `value` being the mean of this batch's `count`.

        The count goes in as a float: at the end of validation Lightning averages the ranks' summed batch sizes
        (sum / world size) in the count's own dtype, so an int truncates (7 + 6 samples on 2 ranks: 6, not 6.5) and the
        metric comes out 13/12 too large (Lightning issue #21859). tests/test_val_split.py checks an odd count.
        """
        self.log(name, value, sync_dist=True, batch_size=float(count))  # type: ignore[arg-type]

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode for the block (dropout off, EMA/frozen parts as they are), then each submodule's mode restored."""
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            yield
        finally:
            for module, mode in modes.items():
                module.training = mode

    def sample(
        self,
        n: int,
        cond: Any = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """n images in [-1, 1], NCHW: the one generation interface (CLI, evaluation, callbacks, tests). None means
        the model's default (sampling_defaults). `cond` is typed by the model's kind: None for "image", prompts for
        "text-to-image", a NextFrame for "next-frame". `sampler`: a name, or a sampler object for settings a name
        does not carry (DDIM's eta). Models that do not generate (CLIP) keep this error."""
        raise TypeError(f"{type(self).__name__} does not generate images (it has no sample())")

    def sampling_defaults(self) -> dict[str, Any]:
        """What sample()'s settings left None resolve to (reports say what numbers were measured with)."""
        return {}

    def external_state_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of weights that live in a folder the model refers to (a Hugging Face VAE or text
        tower), not in its checkpoints: dropped when saving, refilled from the folder's weights when loading."""
        return ()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint["gen_lightning"] = {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "format": cls.checkpoint_format,
        }
        if prefixes := self.external_state_prefixes():
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith(prefixes)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning calls this before it loads the state dict (fit/validate --ckpt_path, auto-resume, hpc_ckpt):
        a checkpoint of an older format is mapped to this one first, and referenced weights are refilled so the
        strict load finds every key."""
        upgrade(checkpoint, type(self))
        if isinstance(checkpoint.get("state_dict"), dict):
            fill_external_state(self, checkpoint["state_dict"])

    @classmethod
    def upgrade_from_format_1(cls, checkpoint: dict[str, Any]) -> None:
        """A format-1 checkpoint (dict, in place) in this class's layout: its keys renamed by format_1_renames.
        Classes with more to do (reshaped or dropped tensors, new hyper-parameters) extend it."""
        checkpoint["state_dict"] = renamed(checkpoint["state_dict"], cls.format_1_renames)

    @classmethod
    def upgrade_from_format_2(cls, checkpoint: dict[str, Any]) -> None:
        """Format 3 changed only the autoencoder's hyper-parameters (VAEModel, LatentDiffusionModel extend this)."""


def fill_external_state(model: GenerativeModule, state_dict: dict[str, Any]) -> None:
    """`state_dict` (in place) completed with the model's own values of the keys under its external prefixes."""
    if prefixes := model.external_state_prefixes():
        for key, value in model.state_dict().items():
            if key.startswith(prefixes):
                state_dict.setdefault(key, value)


def strategy_problem(model: GenerativeModule, strategy: object) -> str | None:
    """Why `model` cannot train under `strategy`, or None.

    DeepSpeed owns every weight of the module it wraps: with bf16 it casts the EMA copy to
    bf16, where the EMA's per-step change (~1e-3 of the gap) rounds away, and ZeRO-3 frees partitioned weights outside
    forward, so the update changes nothing. Either way the EMA weights, which sampling and evaluation use, would
    silently stop following training."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(strategy, DeepSpeedStrategy) and any(isinstance(m, EMA) for m in model.modules()):
        return (
            f"{type(model).__name__} keeps an EMA copy of its weights, which DeepSpeed cannot keep (bf16 rounds its "
            "updates away; ZeRO-3 frees it outside forward). Train it with configs/trainer/fsdp.yaml (sharded) or "
            "configs/trainer/ddp-bf16.yaml; the DeepSpeed presets serve models without EMA (CLIP)."
        )
    return None
