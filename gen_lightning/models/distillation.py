"""DistilledDiffusionModel: a few-step student distilled from a trained DiffusionModel (the teacher) on the teacher's
own data shards ("DDIM and distillation cut it to a few").

- method="progressive" (Salimans & Ho 2022): the student starts as the teacher and learns to match two of its DDIM
  steps with one. Each round of `steps_per_round` optimizer steps halves the steps: teacher_steps → teacher_steps/2 →
  ... → teacher_steps / 2**rounds. At a round's start the teacher becomes the last round's student (its EMA weights),
  the student restarts from them, and the optimizer, its warm-up and the EMA start afresh. The round is a buffer and
  the teacher's weights are in the checkpoint, so a run resumes mid-round or between rounds; a checkpoint taken at a
  round's end samples with that round's steps.
- method="consistency" (Song et al. 2023, consistency distillation): the student learns to map any point of the
  teacher's DDIM trajectories (a `grid_steps`-point grid) to its start, against its own EMA as the target network;
  sampled by the multistep consistency sampler with any number of steps.

The teacher is read weights-only from `teacher_checkpoint` (its EMA weights), frozen; the student has its shape,
schedule and parameterisation. The checkpoint carries the teacher's hyper-parameters and weights, so a student
rebuilds, samples, evaluates and exports without the teacher's file. Losses: diffusion.distillation.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch

from gen_lightning.diffusion.distillation import ConsistencyDistillationLoss, ProgressiveDistillationLoss
from gen_lightning.errors import UserInputError
from gen_lightning.models.diffusion import DiffusionModel
from gen_lightning.models.loading import read_model_checkpoint

METHODS = ("progressive", "consistency")
# The student's own settings (how it trains and samples); everything else it takes from its teacher.
STUDENT_OPTIONS = frozenset(
    ("lr", "weight_decay", "adam_betas", "warmup_steps", "lr_schedule", "ema_max_decay", "ema_power", "sampler",
     "sample_steps", "channels_last", "compile", "fused_adamw")
)  # fmt: skip


class DistilledDiffusionModel(DiffusionModel):
    """Args (lr ... fused_adamw, sampler and sample_steps: as DiffusionModel's, for the student; the rest of its
    shape, schedule and parameterisation is the teacher's):
    teacher_checkpoint: a DiffusionModel checkpoint (vp objective) whose EMA weights are the teacher.
    method: "progressive" or "consistency" (module docstring).
    teacher_steps / rounds / steps_per_round: progressive: the teacher's DDIM steps at the start (divisible by
        2**rounds), the number of halvings, and the optimizer steps each round takes (trainer.max_steps should be
        rounds * steps_per_round; steps beyond keep training the last round).
    grid_steps / huber_c: consistency: the teacher's DDIM grid, and the pseudo-Huber constant (0: squared error).
    image_size: linked from data.image_size; must be the teacher's.
    teacher_config: the teacher's hyper-parameters, filled in from teacher_checkpoint (a student's checkpoint
        rebuilds from them).
    """

    def __init__(
        self,
        teacher_checkpoint: str,
        method: str = "progressive",
        teacher_steps: int = 64,
        rounds: int = 4,
        steps_per_round: int = 250,
        grid_steps: int = 50,
        huber_c: float = 0.001,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 20,
        lr_schedule: str = "constant",
        ema_max_decay: float = 0.999,
        ema_power: float = 2 / 3,
        sampler: str | None = None,
        sample_steps: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
        fused_adamw: bool = True,
        image_size: int | None = None,
        teacher_config: dict[str, Any] | None = None,
        **inherited_options: Any,
    ) -> None:
        if method not in METHODS:
            raise UserInputError(f"model.init_args.method={method!r}: expected one of {', '.join(METHODS)}")
        if rounds < 1 or teacher_steps % 2**rounds:
            raise UserInputError(
                f"model.init_args.teacher_steps={teacher_steps} must be divisible by 2**rounds = 2**{rounds}: each "
                "round halves the steps"
            )
        teacher_weights = None
        if teacher_config is None:  # a new student: the teacher's shape and weights from its file
            teacher_config, teacher_weights = read_teacher(teacher_checkpoint)
        inherited = {key: value for key, value in teacher_config.items() if key not in STUDENT_OPTIONS}
        if image_size is not None and image_size != inherited["image_size"]:
            raise UserInputError(
                f"data.image_size={image_size}, but the teacher {teacher_checkpoint!r} was trained at "
                f"{inherited['image_size']}: set data.image_size={inherited['image_size']}"
            )
        image_size = inherited["image_size"]
        # A student's checkpoint repeats them (a teacher saved before an option existed has its default); a config
        # must not set them.
        defaults = {name: p.default for name, p in inspect.signature(DiffusionModel.__init__).parameters.items()}
        for key, value in inherited_options.items():
            expected = inherited.get(key, defaults.get(key, inspect.Parameter.empty))
            if expected is inspect.Parameter.empty or expected != value:
                shown = "not an option" if expected is inspect.Parameter.empty else repr(expected)
                raise UserInputError(
                    f"model.init_args.{key}={value!r}: the student takes {key} from its teacher ({shown}); "
                    "leave it unset"
                )
        progressive = method == "progressive"
        options = {
            **inherited,
            "sampler": sampler or ("ddim" if progressive else "consistency"),
            "sample_steps": sample_steps or (teacher_steps // 2**rounds if progressive else 4),
            **dict(lr=lr, weight_decay=weight_decay, adam_betas=adam_betas, warmup_steps=warmup_steps,
                   lr_schedule=lr_schedule, ema_max_decay=ema_max_decay, ema_power=ema_power,
                   channels_last=channels_last, compile=compile, fused_adamw=fused_adamw),
        }  # fmt: skip
        super().__init__(**options)
        # What a student's checkpoint rebuilds from without the teacher's file (the CLI saved the config's values).
        self.hparams.update(teacher_config=teacher_config, image_size=image_size, sample_steps=options["sample_steps"])
        self.teacher = copy.deepcopy(self.net).requires_grad_(False)
        self.register_buffer("distill_round", torch.zeros((), dtype=torch.long))  # progressive: rounds begun
        clip = self.hparams.clip_sample
        if method == "progressive":
            self.loss_fn = ProgressiveDistillationLoss(self.schedule, self.hparams.prediction_type, clip)
        else:
            self.loss_fn = ConsistencyDistillationLoss(
                self.schedule, self.hparams.prediction_type, clip, grid_steps, huber_c
            )
        if teacher_weights is not None:
            for network in (self.teacher, self.net, self.ema.shadow):
                network.load_state_dict(teacher_weights)

    # --- rounds (progressive) -----------------------------------------------------------------------------------
    @property
    def student_steps(self) -> int:
        """The DDIM steps the student is being trained for in the current round."""
        return self.hparams.teacher_steps // 2 ** (int(self.distill_round) + 1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.hparams.method != "progressive":
            return
        due = min(self.trainer.global_step // self.hparams.steps_per_round, self.hparams.rounds - 1)
        while int(self.distill_round) < due:
            self.begin_next_round()
        self.hparams.sample_steps = self.student_steps  # saved with each checkpoint: it samples as trained

    @torch.no_grad()
    def begin_next_round(self) -> None:
        """The last round's student (EMA weights) becomes the teacher and the new student's start, with a fresh
        optimizer state, warm-up and EMA; the student's steps halve."""
        self.teacher.load_state_dict(self.ema.shadow.state_dict())
        self.net.load_state_dict(self.ema.shadow.state_dict())
        self.ema.num_updates.zero_()
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        self.distill_round += 1

    def configure_optimizers(self) -> dict[str, Any]:
        restart = self.hparams.steps_per_round if self.hparams.method == "progressive" else None
        return self.adamw_with_warmup((p for p in self.net.parameters() if p.requires_grad), restart_every=restart)

    # --- losses ---------------------------------------------------------------------------------------------------
    def distillation_loss(
        self, student: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x0 = self.diffusion_input(batch)
        # The teacher and the target network predict as when sampling (no dropout), whatever mode Lightning set.
        self.teacher.train(False)
        self.ema.shadow.train(False)
        if self.hparams.method == "progressive":
            return self.loss_fn(student, self.teacher, x0, self.student_steps, generator=generator)
        return self.loss_fn(student, self.ema.shadow, self.teacher, x0, generator=generator)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.distillation_loss(self.net, batch)
        batch_size = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("student_steps", float(self.hparams.sample_steps), batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # A fixed generator per batch, as DiffusionModel's: comparable between evaluations.
        generator = torch.Generator(device=self.device).manual_seed(1_000_003 * batch_idx + self.global_rank)
        loss = self.distillation_loss(self.ema.shadow, batch, generator)
        self.log_val_mean("val/loss", loss, batch["image"].shape[0])


def read_teacher(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(hyper-parameters, EMA network weights) of a DiffusionModel checkpoint, refused by name if it is another kind
    of model or a flow model (the distillation losses step a VP schedule with DDIM)."""
    cls, hparams, state_dict = read_model_checkpoint(path, DiffusionModel)
    if cls is not DiffusionModel:
        raise UserInputError(
            f"model.init_args.teacher_checkpoint={path!r} holds a {cls.__name__}; distillation takes a pixel "
            "DiffusionModel teacher"
        )
    if hparams.get("objective", "vp") != "vp":
        raise UserInputError(
            f"model.init_args.teacher_checkpoint={path!r} was trained with model.objective={hparams['objective']!r}; "
            "distillation steps a VP schedule with DDIM (objective vp)"
        )
    prefix = "ema.shadow."
    return hparams, {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
