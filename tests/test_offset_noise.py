"""Offset noise (model.offset_noise): one Gaussian value per sample and channel added to the training noise of every
objective; EDM's coefficients and loss weight see the larger noise as DIAMOND's do; 0 draws exactly what was drawn
before the option."""

import pytest
import torch
from torch import nn

from gen_lightning.diffusion import DiffusionLoss, EDMLoss, EDMPrecond, FlowMatchingLoss, NoiseSchedule
from gen_lightning.diffusion.edm import edm_coefficients
from gen_lightning.diffusion.noise import training_noise
from gen_lightning.errors import UserInputError
from gen_lightning.models import DiffusionModel
from tests.test_flow_math import RawNet
from tests.test_model_samplers import UNET

OFFSET = 0.5
SHAPE = (4000, 3, 32, 32)  # channel means of per-pixel noise have variance 1 / 1024: the offset's 0.25 dominates


def channel_mean_variance(x: torch.Tensor) -> float:
    return float(x.mean(dim=(2, 3)).var())


def test_zero_offset_draws_what_randn_draws_and_an_offset_moves_whole_channels() -> None:
    plain = training_noise((8, 3, 4, 4), 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(plain, torch.randn((8, 3, 4, 4), generator=torch.Generator().manual_seed(1)))
    noise = training_noise(SHAPE, OFFSET, torch.Generator().manual_seed(0))
    assert channel_mean_variance(noise) == pytest.approx(OFFSET**2 + 1 / 1024, rel=0.05)
    demeaned = noise - noise.mean(dim=(2, 3), keepdim=True)
    assert float(demeaned.var()) == pytest.approx(1.0, abs=0.01)  # the per-pixel part is unchanged
    with pytest.raises(ValueError, match="offset noise"):
        training_noise((1, 3, 2, 2), -0.1)


class Recorder(nn.Module):
    """Keeps what the loss feeds the network and returns zeros."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.x, self.t = x, t
        return torch.zeros_like(x)


def test_every_objective_trains_on_offset_noise() -> None:
    x0, generator = torch.zeros(SHAPE), torch.Generator().manual_seed(0)
    schedule = NoiseSchedule.from_name("cosine", 1000)
    seen = Recorder()
    DiffusionLoss(schedule, "v", offset_noise=OFFSET)(seen, x0, generator)
    noise = seen.x / (1 - schedule.alpha_bar(seen.t)).sqrt().reshape(-1, 1, 1, 1)  # x_t = sqrt(1 - a) eps for x0 = 0
    assert channel_mean_variance(noise) == pytest.approx(OFFSET**2 + 1 / 1024, rel=0.05)

    FlowMatchingLoss(offset_noise=OFFSET)(seen, x0, generator)
    noise = seen.x / (seen.t / 1000).reshape(-1, 1, 1, 1)  # x_t = t eps for x0 = 0 (the network sees t * 1000)
    assert channel_mean_variance(noise) == pytest.approx(OFFSET**2 + 1 / 1024, rel=0.05)

    def denoiser(noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.x, seen.t = noisy, sigma
        return noisy

    EDMLoss(offset_noise=OFFSET)(denoiser, x0, generator)
    # DIAMOND's x0 + offset + sigma n: the offset is not scaled by sigma. Where sigma < 0.5 the per-pixel part's channel
    # means are below 0.5 / 32, so the means' spread is the offset's.
    low = seen.t < 0.5
    assert int(low.sum()) > 1000
    assert channel_mean_variance(seen.x[low]) == pytest.approx(OFFSET**2, rel=0.1)


def test_edm_with_offset_noise_is_edm_at_the_effective_sigma() -> None:
    """EDMPrecond and EDMLoss with offset o at sigma are the plain ones at sqrt(sigma^2 + o^2): the raw network's input
    and target keep unit variance, and the loss stays its unit-weight MSE."""

    torch.manual_seed(0)
    raw = RawNet()
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 40.0], dtype=torch.float64)
    effective = (sigma**2 + OFFSET**2).sqrt()
    x0, noise = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    noisy = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    torch.testing.assert_close(EDMPrecond(raw, offset_noise=OFFSET)(noisy, sigma), EDMPrecond(raw)(noisy, effective))

    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in edm_coefficients(effective))
    raw_target = (x0 - c_skip * noisy) / c_out
    expected = (raw(c_in * noisy, 1000 * c_noise.flatten()) - raw_target).pow(2).mean(dim=(1, 2, 3))
    loss = EDMLoss(offset_noise=OFFSET).per_sample(EDMPrecond(raw, offset_noise=OFFSET), x0, sigma, noise)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("objective", ["vp", "flow", "edm"])
def test_the_model_option_reaches_the_loss_and_a_negative_one_is_refused(objective: str) -> None:
    model = DiffusionModel(unet=UNET, image_size=16, objective=objective, offset_noise=0.3, sample_steps=2)
    assert model.loss_fn.offset_noise == 0.3 and model.hparams.offset_noise == 0.3
    loss = model.loss_fn(model.net, torch.randn(2, 3, 16, 16), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert (getattr(model.net, "offset_noise", None) == 0.3) == (objective == "edm")
    with pytest.raises(UserInputError, match=r"model\.offset_noise=-0\.1"):
        DiffusionModel(unet=UNET, image_size=16, objective=objective, offset_noise=-0.1)
