"""Autoguidance (Karras et al. 2024): a model's samples guided by a weaker checkpoint of itself, `guide + w (net -
guide)` at every network call; in the model (set_autoguidance) and on the command line (--guide-ckpt), for
unconditional image models and world models."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from gen_lightning.actions import encode_action
from gen_lightning.cli import main
from gen_lightning.diffusion import AutoGuidanceDenoiser
from gen_lightning.errors import UserInputError
from gen_lightning.models import DiffusionModel
from gen_lightning.models.world_model import NextFrame, WorldModel
from tests.conftest import WORLD_CONTEXT, WORLD_SIZE, save_checkpoint
from tests.test_world_model import tiny_world_model

UNET = {"channels": [8, 16], "attention_levels": [], "num_heads": 2}


def tiny(seed: int, **options) -> DiffusionModel:
    """A 16 px model whose EMA network gives some output (the UNet's last layer starts at zero); `seed` draws both
    the initial weights and the perturbation, so two seeds are two different networks."""
    torch.manual_seed(seed)
    model = DiffusionModel(unet=UNET, image_size=16, schedule="cosine", prediction_type="v", sample_steps=3, **options)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.ema.copy_from(model.net)
    return model.eval()


class Counted(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale, self.calls = scale, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        self.calls += 1
        return self.scale * x + t.view(-1, 1) + shift


def test_the_denoiser_extrapolates_from_the_guide_and_skips_it_at_weight_one():
    net, guide = Counted(2.0), Counted(0.5)
    x, t = torch.randn(3, 4), torch.tensor([0.1, 0.2, 0.3])
    net_out, guide_out = net(x, t, shift=1.0), guide(x, t, shift=1.0)
    net.calls = guide.calls = 0
    torch.testing.assert_close(AutoGuidanceDenoiser(net, guide, 2.5)(x, t, shift=1.0),
                               guide_out + 2.5 * (net_out - guide_out))  # fmt: skip
    assert (net.calls, guide.calls) == (1, 1)  # the conditioning reaches both
    assert torch.equal(AutoGuidanceDenoiser(net, guide, 0.0)(x, t, shift=1.0), guide_out)
    assert torch.equal(AutoGuidanceDenoiser(net, guide, 1.0)(x, t, shift=1.0), net_out)
    assert guide.calls == 2  # not called at weight 1


def seeded(model: DiffusionModel, **options) -> torch.Tensor:
    return model.sample(4, generator=torch.Generator().manual_seed(0), **options)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_a_guided_model_samples_the_guides_images_at_zero_and_its_own_at_one(sampler):
    model, guide = tiny(0), tiny(1)
    own, guides = seeded(model, sampler=sampler), seeded(guide, sampler=sampler)
    assert not torch.allclose(own, guides, atol=1e-3)
    model.set_autoguidance(guide)
    assert torch.equal(seeded(model, sampler=sampler, guidance=1.0), own)
    assert torch.equal(seeded(model, sampler=sampler), own)  # no weight given: 1
    torch.testing.assert_close(seeded(model, sampler=sampler, guidance=0.0), guides)
    extrapolated = seeded(model, sampler=sampler, guidance=2.0)
    assert not torch.allclose(extrapolated, own, atol=1e-3) and not torch.allclose(extrapolated, guides, atol=1e-3)
    assert set(model.state_dict()) == set(tiny(2).state_dict())  # the guide is not saved with the model
    model.set_autoguidance(None)
    assert torch.equal(seeded(model, sampler=sampler), own)


def test_a_guide_trained_another_way_is_refused_by_name():
    model = tiny(0)
    with pytest.raises(UserInputError, match=r"guide's prediction_type='epsilon' differs from the model's 'v'"):
        model.set_autoguidance(DiffusionModel(unet=UNET, image_size=16, schedule="cosine"))
    with pytest.raises(UserInputError, match=r"guide's image_size=32"):
        model.set_autoguidance(DiffusionModel(unet=UNET, image_size=32, schedule="cosine", prediction_type="v"))
    with pytest.raises(UserInputError, match=r"guide's objective='flow'"):
        model.set_autoguidance(DiffusionModel(unet=UNET, image_size=16, objective="flow"))
    with pytest.raises(UserInputError, match=r"got a WorldModel"):
        model.set_autoguidance(tiny_world_model())
    with pytest.raises(ValueError, match=r"guidance needs an autoguidance model"):
        model.sample(2, guidance=2.0)


def test_sample_takes_a_guide_checkpoint(tmp_path, capsys):
    model_ckpt = save_checkpoint(tiny(0), tmp_path / "model.ckpt")
    guide_ckpt = save_checkpoint(tiny(1), tmp_path / "guide.ckpt")
    common = ["--n=4", "--steps=3", "--device=cpu"]
    main(["sample", f"--ckpt={guide_ckpt}", *common, f"--out={tmp_path / 'guide.png'}"])
    main(["sample", f"--ckpt={model_ckpt}", *common, f"--out={tmp_path / 'own.png'}"])
    guided = ["sample", f"--ckpt={model_ckpt}", f"--guide-ckpt={guide_ckpt}", *common]
    main([*guided, "--guidance=0", f"--out={tmp_path / 'zero.png'}"])
    main([*guided, "--guidance=2", f"--out={tmp_path / 'two.png'}"])
    pixels = {name: Image.open(tmp_path / f"{name}.png").tobytes() for name in ("guide", "own", "zero", "two")}
    assert pixels["zero"] == pixels["guide"] and pixels["two"] not in (pixels["own"], pixels["guide"])
    with pytest.raises(UserInputError, match=r"--guide-ckpt needs --guidance W"):
        main([*guided, f"--out={tmp_path / 'x.png'}"])
    with pytest.raises(UserInputError, match=r"--guidance: .*is an unconditional DiffusionModel.*--guide-ckpt"):
        main(["sample", f"--ckpt={model_ckpt}", *common, "--guidance=2", f"--out={tmp_path / 'x.png'}"])


# --- world models ----------------------------------------------------------------------------------------------------
def perturbed_world(seed: int, **options) -> WorldModel:
    """A tiny world model (tests/test_world_model.py) whose EMA network gives some output, different for each seed."""
    model = tiny_world_model(**options)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.ema.copy_from(model.net)
    return model.eval()


def test_a_world_model_is_guided_by_a_weaker_world_model():
    model, guide = perturbed_world(0), perturbed_world(1)
    torch.manual_seed(2)
    frames = torch.rand(2, WORLD_CONTEXT, 3, WORLD_SIZE, WORLD_SIZE) * 2 - 1
    actions = torch.stack([encode_action({"x": 0.3, "y": 0.6, "button": 1, "click": 1, "key": "a"})] * 2)

    def next_frame(world: WorldModel, **options) -> torch.Tensor:
        return world.sample(2, NextFrame(frames, actions), generator=torch.Generator().manual_seed(0), **options)

    def rolled_out(world: WorldModel, **options) -> torch.Tensor:
        steps = actions[:, None].expand(2, 3, -1)
        return world.rollout(frames, steps, generator=torch.Generator().manual_seed(0), **options)

    own, guides, guides_rollout = next_frame(model), next_frame(guide), rolled_out(guide)
    with pytest.raises(ValueError, match=r"guidance needs an autoguidance model"):
        next_frame(model, guidance=2.0)
    model.set_autoguidance(guide)
    assert torch.equal(next_frame(model, guidance=1.0), own) and torch.equal(next_frame(model), own)
    torch.testing.assert_close(next_frame(model, guidance=0.0), guides)
    assert (next_frame(model, guidance=2.0) - own).abs().max() > 1e-3
    torch.testing.assert_close(rolled_out(model, guidance=0.0), guides_rollout)
    # a guide that reads other inputs or diffuses another target is refused by the option that differs
    for option, value in (("click_maps", True), ("target", "delta"), ("cursor_sigma", 3.0)):
        with pytest.raises(UserInputError, match=rf"the guide's {option}={value!r} differs"):
            model.set_autoguidance(perturbed_world(1, **{option: value}))


def test_evaluate_guides_a_world_model_with_guide_ckpt(toy_world, tmp_path, capsys):
    model_ckpt = save_checkpoint(perturbed_world(0), tmp_path / "model.ckpt")
    guide_ckpt = save_checkpoint(perturbed_world(1), tmp_path / "guide.ckpt")
    common = [f"--data={toy_world[1]}", "--num-samples=4", "--rollouts=1", "--rollout-steps=2", "--max-real=8",
              "--num-workers=0", f"--cache-dir={tmp_path / 'cache'}"]  # fmt: skip

    def report(name: str, *args: str) -> dict:
        main(["evaluate", *args, *common, f"--out={tmp_path / name / 'report.json'}"])
        return json.loads((tmp_path / name / "report.json").read_text())

    guides = report("guide", f"--ckpt={guide_ckpt}")
    at_zero = report("zero", f"--ckpt={model_ckpt}", f"--guide-ckpt={guide_ckpt}", "--guidance=0")
    assert at_zero["guidance"] == 0.0 and at_zero["guide_checkpoint"] == str(guide_ckpt)
    for key in ("psnr", "ssim", "rollout_psnr", "fid"):  # weight 0 samples the guide's frames
        assert at_zero[key] == pytest.approx(guides[key], rel=1e-4), key
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a weight without a guide is refused, as before
        main(["evaluate", f"--ckpt={model_ckpt}", *common, "--guidance=2"])
    assert "--guidance: not used for a world model" in capsys.readouterr().err
