"""Distillation to few steps: the targets against the real samplers, the student model (starts as its teacher,
rebuilds without the teacher's file, refuses teachers it cannot distil), progressive rounds through the CLI with a
resume, and the loss under 2 gloo ranks equal to one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gen_lightning.cli import main
from gen_lightning.diffusion import DDIMSampler, NoiseSchedule, sample_loop
from gen_lightning.diffusion.distillation import (
    ConsistencyDistillationLoss,
    ConsistencySampler,
    ProgressiveDistillationLoss,
    consistency_scalings,
    step_grid,
)
from gen_lightning.errors import UserInputError
from gen_lightning.models.distillation import DistilledDiffusionModel
from gen_lightning.models.loading import load_model, read_model_checkpoint
from tests.conftest import REPO, save_checkpoint, toy_data_args
from tests.test_datamodule import free_port

SCHEDULE = NoiseSchedule.from_name("cosine", 1000)


def random_network(seed: int = 0):
    """A fixed nonlinear function of (x, t) standing in for a trained network."""
    weights = torch.Generator().manual_seed(seed)
    mix = torch.randn(3, 3, generator=weights) * 0.5

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = (t.float() / 1000).view(-1, 1, 1, 1)
        return torch.tanh(torch.einsum("ij,njhw->nihw", mix, x)) * (1 + scale)

    return network


@pytest.mark.parametrize("steps", [1, 2, 4, 25, 32, 125])
def test_each_student_step_covers_exactly_two_teacher_steps(steps):
    assert torch.equal(step_grid(1000, 2 * steps)[::2], step_grid(1000, steps))
    assert step_grid(1000, steps)[0] == -1 and step_grid(1000, steps)[-1] == 999


@pytest.mark.parametrize("student_steps", [1, 4, 16])
def test_the_progressive_target_is_one_ddim_step_onto_where_two_teacher_steps_land(student_steps):
    """The teacher's two steps replayed with the real DDIMSampler (2N steps), and one DDIM step of the student's
    sampler (N steps) from the same z_t with x̃ as its x0, land on the same point."""
    teacher = random_network()
    loss = ProgressiveDistillationLoss(SCHEDULE, "v", clip_sample=1.0)
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    x_t, t, _, target = loss.targets(teacher, x0, student_steps, torch.Generator().manual_seed(0))
    teacher_sampler = DDIMSampler(SCHEDULE, "v", clip_sample=1.0)
    teacher_sampler.set_timesteps(2 * student_steps)
    one_step = DDIMSampler(SCHEDULE, "sample", clip_sample=None)
    one_step.set_timesteps(student_steps)
    for j in range(len(x0)):
        start = int(t[j])
        assert start in one_step.timesteps.tolist()
        x, now = x_t[j : j + 1], start
        for _ in range(2):
            x = teacher_sampler.step(teacher(x, torch.tensor([now])), now, x)
            now = teacher_sampler.previous_timestep(now)
        assert now == one_step.previous_timestep(start)  # both end on the same grid point
        landed = one_step.step(target[j : j + 1], start, x_t[j : j + 1])
        torch.testing.assert_close(landed, x, atol=1e-4, rtol=1e-4)


def test_a_student_that_predicts_the_target_has_zero_loss_and_one_that_does_not_has_more():
    teacher = random_network()
    loss = ProgressiveDistillationLoss(SCHEDULE, "sample", clip_sample=1.0)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    _, _, _, target = loss.targets(teacher, x0, 4, torch.Generator().manual_seed(1))
    oracle = lambda x, t: target  # noqa: E731 - same draws below: the student sees the same (z_t, t)
    assert float(loss(oracle, teacher, x0, 4, torch.Generator().manual_seed(1))) < 1e-10
    assert float(loss(random_network(1), teacher, x0, 4, torch.Generator().manual_seed(1))) > 1e-3


def test_the_consistency_function_is_the_identity_on_the_data_and_the_x0_prediction_elsewhere():
    c_skip, c_out = consistency_scalings(torch.tensor([-1, 0, 500]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] < 3e-3 and c_skip[2] < 1e-7 and c_out[2] > 1 - 1e-7


def test_the_consistency_target_at_the_data_end_is_the_teachers_ddim_step_to_the_data():
    teacher = random_network()
    loss = ConsistencyDistillationLoss(SCHEDULE, "sample", clip_sample=1.0, grid_steps=1)  # every pair ends at x0
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    x_t, t, _, target = loss.targets(random_network(5), teacher, x0, torch.Generator().manual_seed(0))
    assert (t == 999).all()
    torch.testing.assert_close(target, teacher(x_t, t).clamp(-1, 1))  # the target network is not asked there


@pytest.mark.parametrize("steps", [1, 3])
def test_consistency_sampling_returns_what_the_network_says_x0_is(steps):
    point = torch.rand(1, 3, 4, 4) * 2 - 1
    sampler = ConsistencySampler(SCHEDULE, "sample", clip_sample=1.0)
    drawn = sample_loop(lambda x, t: point.expand_as(x), sampler, torch.randn(5, 3, 4, 4), steps)
    torch.testing.assert_close(drawn, point.expand(5, -1, -1, -1), atol=1e-6, rtol=0)


def ema_weights(path: Path) -> dict[str, torch.Tensor]:
    _, _, state = read_model_checkpoint(path)
    return {k.removeprefix("ema.shadow."): v for k, v in state.items() if k.startswith("ema.shadow.")}


def test_a_student_starts_as_its_teachers_ema_and_rebuilds_without_the_teachers_file(tiny_teacher_checkpoint, tmp_path):
    teacher_ema = ema_weights(tiny_teacher_checkpoint)
    student = DistilledDiffusionModel(str(tiny_teacher_checkpoint), teacher_steps=8, rounds=3)
    for network in (student.net, student.teacher, student.ema.shadow):
        for key, value in network.state_dict().items():
            assert torch.equal(value, teacher_ema[key]), key
    assert student.hparams.sample_steps == 1 and student.hparams.sampler == "ddim"
    assert student.hparams.prediction_type == "v" and student.hparams.schedule == "cosine"
    moved = tmp_path / "teacher.ckpt"  # the student must not need it any more
    moved.write_bytes(tiny_teacher_checkpoint.read_bytes())
    student = DistilledDiffusionModel(str(moved), teacher_steps=8, rounds=3)
    saved = save_checkpoint(student, tmp_path / "student.ckpt")
    moved.unlink()
    rebuilt = load_model(saved)
    assert isinstance(rebuilt, DistilledDiffusionModel)
    drawn = [m.sample(2, generator=torch.Generator().manual_seed(0)) for m in (student, rebuilt)]
    torch.testing.assert_close(drawn[0], drawn[1], atol=0, rtol=0)


def test_a_student_of_a_teacher_saved_before_an_option_existed_rebuilds(tiny_teacher_checkpoint, tmp_path):
    """The student's checkpoint carries every option of today's DiffusionModel; its teacher's may lack newer ones."""
    old = torch.load(tiny_teacher_checkpoint, weights_only=True)
    for key in ("sigma_data", "p_mean", "time_shift"):
        old["hyper_parameters"].pop(key, None)
    torch.save(old, tmp_path / "old_teacher.ckpt")
    student = DistilledDiffusionModel(str(tmp_path / "old_teacher.ckpt"), teacher_steps=8, rounds=2)
    assert "sigma_data" in student.hparams and "sigma_data" not in student.hparams.teacher_config
    rebuilt = load_model(save_checkpoint(student, tmp_path / "student.ckpt"))
    assert rebuilt.hparams.teacher_config == student.hparams.teacher_config


def test_teachers_and_options_it_cannot_distil_are_refused_by_name(
    tiny_teacher_checkpoint, tiny_vae_checkpoint, tmp_path
):
    from gen_lightning.models.diffusion import DiffusionModel

    with pytest.raises(UserInputError, match="expected a DiffusionModel"):
        DistilledDiffusionModel(str(tiny_vae_checkpoint))
    flow = DiffusionModel(unet={"channels": [8], "attention_levels": []}, image_size=8, objective="flow")
    with pytest.raises(UserInputError, match="objective='flow'"):
        DistilledDiffusionModel(str(save_checkpoint(flow, tmp_path / "flow.ckpt")))
    with pytest.raises(UserInputError, match="divisible by 2\\*\\*rounds"):
        DistilledDiffusionModel(str(tiny_teacher_checkpoint), teacher_steps=12, rounds=3)
    with pytest.raises(UserInputError, match=r"data.image_size=32.*trained at 16"):
        DistilledDiffusionModel(str(tiny_teacher_checkpoint), image_size=32)
    with pytest.raises(UserInputError, match=r"schedule='linear'.*from its teacher"):
        DistilledDiffusionModel(str(tiny_teacher_checkpoint), schedule="linear")
    with pytest.raises(UserInputError, match="method='guidance'"):
        DistilledDiffusionModel(str(tiny_teacher_checkpoint), method="guidance")


def distill(shards: Path, root: Path, teacher: Path, *extra: str) -> None:
    main(
        [
            "fit",
            *toy_data_args(shards, root, "configs/distill_emoji.yaml"),
            f"--model.init_args.teacher_checkpoint={teacher}",
            "--model.init_args.teacher_steps=8",
            "--model.init_args.rounds=2",
            "--model.init_args.steps_per_round=2",
            "--model.init_args.warmup_steps=1",
            "--checkpoint.every_n_train_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            *extra,
        ]
    )


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_progressive_rounds_halve_the_steps_hand_the_student_on_and_resume_mid_round(
    toy_shards, tiny_teacher_checkpoint, tmp_path
):
    whole, split = tmp_path / "whole", tmp_path / "split"  # one run of 2 rounds; one cut and resumed
    distill(toy_shards, whole, tiny_teacher_checkpoint, "--trainer.max_steps=4")
    folder = whole / "checkpoints"
    after_round = {steps: checkpoint(folder / f"student-{steps}steps.ckpt") for steps in (4, 2)}
    assert [after_round[s]["hyper_parameters"]["sample_steps"] for s in (4, 2)] == [4, 2]
    assert [int(after_round[s]["state_dict"]["distill_round"]) for s in (4, 2)] == [0, 1]
    first, second = after_round[4]["state_dict"], after_round[2]["state_dict"]
    for key, value in first.items():  # round 2's teacher is round 1's student (its EMA weights)
        if key.startswith("ema.shadow."):
            assert torch.equal(second["teacher." + key.removeprefix("ema.shadow.")], value), key
    teacher = ema_weights(tiny_teacher_checkpoint)
    assert all(torch.equal(first["teacher." + k], v) for k, v in teacher.items())  # round 1's: the file's
    assert not torch.equal(second["net.out_conv.weight"], first["net.out_conv.weight"])  # the student trained on

    # Cut mid-round (step 3 of rounds of 2) and resumed: the resumed run keeps its round and its teacher (from the
    # checkpoint, not the teacher's file), and the optimizer restarted at the round's start, not at the resume.
    distill(toy_shards, split, tiny_teacher_checkpoint, "--trainer.max_steps=3")
    cut = checkpoint(split / "checkpoints" / "last.ckpt")
    distill(toy_shards, split, tiny_teacher_checkpoint, "--trainer.max_steps=4")
    resumed = checkpoint(split / "checkpoints" / "last.ckpt")
    handed_on = checkpoint(split / "checkpoints" / "student-4steps.ckpt")["state_dict"]
    assert cut["global_step"] == 3 and resumed["global_step"] == 4
    for key, value in handed_on.items():
        if key.startswith("ema.shadow."):
            name = "teacher." + key.removeprefix("ema.shadow.")
            assert torch.equal(cut["state_dict"][name], value) and torch.equal(resumed["state_dict"][name], value)
    assert int(resumed["state_dict"]["distill_round"]) == 1 and resumed["hyper_parameters"]["sample_steps"] == 2
    for run in (resumed, checkpoint(folder / "last.ckpt")):
        assert {int(s["step"]) for s in run["optimizer_states"][0]["state"].values()} == {2}  # steps 3 and 4
    student = load_model(folder / "student-2steps.ckpt")  # samples with its round's steps
    assert student.sampling_defaults()["steps"] == 2


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_the_distillation_loss_on_two_gloo_ranks_equals_one_process(method, tiny_teacher_checkpoint, tmp_path):
    from tests.distill_dist_probe import build_student, half_loss

    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    torch.save({"images": images}, tmp_path / "data.pt")
    probe = [sys.executable, str(REPO / "tests" / "distill_dist_probe.py"), str(tiny_teacher_checkpoint), method]
    subprocess.run([*probe, str(tmp_path / "data.pt"), str(tmp_path), str(free_port())], check=True, timeout=240)

    model = build_student(str(tiny_teacher_checkpoint), method)
    optimizer = torch.optim.SGD(model.net.parameters(), lr=0.1)
    loss = sum(half_loss(model, model.net, half, rank) for rank, half in enumerate(images.chunk(2))) / 2
    loss.backward()
    optimizer.step()
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["loss"] == pytest.approx(float(loss), rel=1e-5)
        weights = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in model.net.state_dict().items():
            torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=1e-5, msg=key)
