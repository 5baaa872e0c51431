"""The guidance interval (Kynkäänniemi et al. 2024): classifier-free guidance or autoguidance only at noise levels
low < sigma <= high, on EDM's sigma axis for every objective; outside it the second network call is skipped."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from gen_lightning.cli import main
from gen_lightning.diffusion import (
    AutoGuidanceDenoiser,
    CFGDenoiser,
    GuidanceInterval,
    sigma_to_timestep,
    timestep_to_sigma,
    vp_sigmas,
)
from gen_lightning.errors import UserInputError
from gen_lightning.models import DiffusionModel
from tests.conftest import save_checkpoint
from tests.test_autoguidance import Counted, seeded, tiny


def test_the_interval_is_half_open_and_checked():
    interval = GuidanceInterval(0.28, 5.42)
    inside = interval.contains(torch.tensor([0.28, 0.29, 5.42, 5.43, 0.0]))
    assert inside.tolist() == [False, True, True, False, False]
    for low, high in ((1.0, 1.0), (2.0, 1.0), (-0.1, 1.0)):
        with pytest.raises(ValueError, match=r"need 0 <= low < high"):
            GuidanceInterval(low, high)


@pytest.mark.parametrize("objective", ["vp", "flow", "edm"])
def test_noise_level_is_edms_sigma_for_every_objective(objective):
    options = {"schedule": "cosine"} if objective == "vp" else {}
    model = DiffusionModel(unet={"channels": [8], "attention_levels": []}, image_size=8, objective=objective, **options)
    if objective == "vp":
        table = vp_sigmas(model.schedule)
        torch.testing.assert_close(
            model.noise_level(torch.tensor([0, 500, 999])), table[[0, 500, 999]], rtol=1e-12, atol=0
        )
        sigma = torch.tensor([0.3, 1.0, 7.0], dtype=torch.float64)  # fractional timesteps round-trip
        torch.testing.assert_close(model.noise_level(sigma_to_timestep(sigma, table)), sigma)
    elif objective == "flow":  # x_t = (1 - t) x0 + t eps: sigma = t / (1 - t); the network sees 1000 t
        torch.testing.assert_close(model.noise_level(torch.tensor([250.0, 500.0])), torch.tensor([1 / 3, 1.0]).double())
    else:
        assert model.noise_level(torch.tensor([0.5, 80.0])).tolist() == [0.5, 80.0]


def test_timestep_to_sigma_interpolates_log_sigma():
    table = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(timestep_to_sigma(torch.tensor([0.0, 0.5, 1.5, 2.0]), table),
                               torch.tensor([0.1, 0.1**0.5, 10**0.5, 10.0], dtype=torch.float64))  # fmt: skip


def test_outside_the_interval_the_second_call_is_skipped():
    x, t = torch.randn(2, 4), torch.tensor([3.0, 3.0])
    inside_only = GuidanceInterval(1.0, 5.0).contains
    net, guide = Counted(2.0), Counted(0.5)
    guided = AutoGuidanceDenoiser(net, guide, 2.0, guided_at=inside_only)
    expected = guide(x, t) + 2.0 * (net(x, t) - guide(x, t))
    net.calls = guide.calls = 0
    torch.testing.assert_close(guided(x, t), expected)
    assert torch.equal(guided(x, t + 10), net(x, t + 10)) and guide.calls == 1  # not called outside
    mixed = guided(x, torch.tensor([3.0, 13.0]))  # one sample inside, one outside
    torch.testing.assert_close(mixed[0], expected[0])
    assert torch.equal(mixed[1], net(x, torch.tensor([3.0, 13.0]))[1])

    class Conditional(torch.nn.Module):  # the condition shifts the output
        calls = 0

        def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return x + c

    cond, uncond = {"c": torch.ones(2, 4)}, {"c": torch.zeros(2, 4)}
    network = Conditional()
    cfg = CFGDenoiser(network, 3.0, guided_at=inside_only)
    torch.testing.assert_close(cfg(x, t, cond, uncond), x + 3.0)  # uncond + 3 (cond - uncond)
    assert network.calls == 1  # both branches in one doubled batch
    torch.testing.assert_close(cfg(x, t + 10, cond, uncond), x + 1.0)  # the conditional branch alone
    assert network.calls == 2


def test_a_models_interval_guides_where_it_covers():
    model, guide = tiny(0), tiny(1)
    own = seeded(model)
    model.set_autoguidance(guide)
    everywhere = seeded(model, guidance=2.0)
    model.hparams.guidance_interval = [0.0, 1e9]
    assert torch.equal(seeded(model, guidance=2.0), everywhere)
    model.hparams.guidance_interval = [1e8, 1e9]  # no step in it: unguided, whatever the weight
    assert torch.equal(seeded(model, guidance=2.0), own)
    model.hparams.guidance_interval = [0.28, 5.42]  # some of the 3 steps
    partly = seeded(model, guidance=2.0)
    assert (partly - own).abs().max() > 1e-4 and (partly - everywhere).abs().max() > 1e-4
    assert model.sampling_defaults()["guidance_interval"] == [0.28, 5.42]
    model.hparams.guidance_interval = [5.0, 1.0]
    with pytest.raises(UserInputError, match=r"model.guidance_interval=\[5.0, 1.0\]: expected \[low, high\] sigmas"):
        seeded(model, guidance=2.0)
    with pytest.raises(UserInputError, match=r"model.guidance_interval"):
        tiny(0, guidance_interval=[1.0])


def test_sample_takes_a_guidance_interval(tmp_path):
    model_ckpt = save_checkpoint(tiny(0), tmp_path / "model.ckpt")
    guide_ckpt = save_checkpoint(tiny(1), tmp_path / "guide.ckpt")
    common = ["--n=4", "--steps=3", "--device=cpu", f"--ckpt={model_ckpt}"]
    guided = [*common, f"--guide-ckpt={guide_ckpt}", "--guidance=2"]
    main(["sample", *common, f"--out={tmp_path / 'own.png'}"])
    main(["sample", *guided, f"--out={tmp_path / 'everywhere.png'}"])
    main(["sample", *guided, "--guidance-interval", "1e8", "1e9", f"--out={tmp_path / 'nowhere.png'}"])
    main(["sample", *guided, "--guidance-interval", "0", "1e9", f"--out={tmp_path / 'all.png'}"])
    pixels = {name: Image.open(tmp_path / f"{name}.png").tobytes() for name in ("own", "everywhere", "nowhere", "all")}
    assert pixels["nowhere"] == pixels["own"] and pixels["all"] == pixels["everywhere"] != pixels["own"]
    with pytest.raises(UserInputError, match=r"--guidance-interval 0.28 5.42: .* needs --guide-ckpt"):
        main(["sample", *common, "--guidance-interval", "0.28", "5.42", f"--out={tmp_path / 'x.png'}"])
    with pytest.raises(UserInputError, match=r"--guidance-interval 5 1: guidance interval \(5.0, 1.0\]: need 0 <= "):
        main(["sample", *guided, "--guidance-interval", "5", "1", f"--out={tmp_path / 'x.png'}"])
