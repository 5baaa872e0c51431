"""Rectified flow, EDM preconditioning and the keyword-argument CFG denoiser: closed forms, exact ODE solutions and
distribution checks."""

import itertools
import math

import pytest
import torch
from torch import nn

from gen_lightning.diffusion.edm import (
    EDMEulerSampler,
    EDMHeunSampler,
    EDMLoss,
    EDMPrecond,
    edm_coefficients,
    edm_loss_weight,
    edm_noise_label_to_sigma,
)
from gen_lightning.diffusion.flow import (
    FlowEulerSampler,
    FlowHeunSampler,
    FlowMatchingLoss,
    flow_interpolate,
    flow_velocity,
    resolution_shift,
    sample_flow_time,
    shift_time,
    x0_from_velocity,
)
from gen_lightning.diffusion.guidance import CFGDenoiser
from gen_lightning.diffusion.samplers import sample_loop, sample_steps

F64 = torch.float64
MU, STD = 0.3, 0.5


def _noise(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


class GaussianFlowVelocity(nn.Module):
    """The exact flow velocity E[eps - x0 | x_t] for data ~ N(MU, std^2) (std = 0: the point MU); t comes in scaled by
    1000 as the samplers and the loss give it."""

    def __init__(self, std: float = STD) -> None:
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        t = (label.to(F64) / 1000).reshape(-1, *[1] * (x.ndim - 1))
        # (x0, eps, x_t) are jointly Gaussian: x_t = (1 - t) x0 + t eps has mean (1 - t) MU and variance
        # (1 - t)^2 std^2 + t^2; regress x0 and eps on x_t.
        variance = (1 - t) ** 2 * self.std**2 + t**2
        centred = x.to(F64) - (1 - t) * MU
        x0 = MU + (1 - t) * self.std**2 / variance * centred
        eps = t / variance * centred
        return (eps - x0).to(x.dtype)


# 1. the path and its velocity


def test_interpolation_endpoints_are_data_and_noise() -> None:
    x0, noise = _noise(4, 3, 2, 2), _noise(4, 3, 2, 2, seed=1)
    assert torch.equal(flow_interpolate(x0, noise, torch.zeros(4)), x0)
    assert torch.equal(flow_interpolate(x0, noise, torch.ones(4)), noise)
    half = flow_interpolate(x0, noise, torch.full((4,), 0.5))
    torch.testing.assert_close(half, (x0 + noise) / 2)


def test_velocity_is_the_derivative_of_the_path_and_gives_back_x0() -> None:
    x0, noise = _noise(4, 3, 2, 2), _noise(4, 3, 2, 2, seed=1)
    t, h = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=F64), 1e-6
    derivative = (flow_interpolate(x0, noise, t + h) - flow_interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(derivative, flow_velocity(x0, noise))
    x_t = flow_interpolate(x0, noise, t)
    torch.testing.assert_close(x0_from_velocity(x_t, flow_velocity(x0, noise), t), x0)


# 2. the flow samplers


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sampler_class", [FlowEulerSampler, FlowHeunSampler])
def test_straight_paths_are_integrated_exactly(sampler_class: type, shift: float) -> None:
    # One data point: every path x_t = (1 - t) MU + t x_1 is a straight line, whose velocity (x - MU) / t Euler follows
    # exactly: one step from t = 1 lands on the point, as does any number of steps on a shifted grid.
    x_1 = _noise(3, 3, 4, 4)
    for num_steps in (1, 2, 7):
        sample = sample_loop(GaussianFlowVelocity(std=0.0), sampler_class(shift=shift), x_1, num_steps)
        torch.testing.assert_close(sample, torch.full_like(sample, MU), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("sampler_class", "order"), [(FlowEulerSampler, 1), (FlowHeunSampler, 2)])
def test_gaussian_data_converges_at_the_methods_order(sampler_class: type, order: int) -> None:
    # For N(MU, STD^2) data the flow ODE maps x_1 linearly: x_t = (1 - t) MU + sqrt((1 - t)^2 STD^2 + t^2) x_1.
    x_1 = _noise(4, 3, 4, 4)
    exact = MU + STD * x_1
    errors = [
        float((sample_loop(GaussianFlowVelocity(), sampler_class(), x_1, n) - exact).abs().max()) for n in (8, 16, 32)
    ]
    for a, b in itertools.pairwise(errors):
        assert order - 0.3 < math.log2(a / b) < order + 0.5, errors


def test_flow_grid_is_shifted_and_scaled_for_the_network() -> None:
    sampler = FlowHeunSampler(shift=3.0)
    sampler.set_timesteps(4)
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64)
    torch.testing.assert_close(sampler.sigmas, shift_time(grid, 3.0))
    assert sampler.sigmas[2] == pytest.approx(0.75)  # shift 3 moves t = 1/2 to 3/4
    assert sampler.num_evaluations == 7
    assert sampler.timesteps[0] == 1000 and sampler.timesteps[1] == pytest.approx(1000 * float(sampler.sigmas[1]))


# 3. training times


def test_logit_normal_times_have_the_asked_logit_moments() -> None:
    t = sample_flow_time(200_000, "logit_normal", 0.5, 0.8, generator=torch.Generator().manual_seed(0)).double()
    logit = torch.log(t / (1 - t))
    assert float(logit.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(logit.std()) == pytest.approx(0.8, abs=0.01)
    uniform = sample_flow_time(200_000, "uniform", generator=torch.Generator().manual_seed(0)).double()
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(uniform.var()) == pytest.approx(1 / 12, abs=0.002)


def test_shift_keeps_the_ends_and_moves_the_law_as_its_inverse_says() -> None:
    t = torch.linspace(0, 1, 101, dtype=F64)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:] > shifted[:-1]).all())
    assert shift_time(t, 1.0).equal(t)
    # shifted uniform: P(T' <= u) = P(T <= u / (s - (s - 1) u))
    draws = sample_flow_time(200_000, "uniform", shift=3.0, generator=torch.Generator().manual_seed(0))
    for u in (0.25, 0.5, 0.75, 0.9):
        expected = u / (3.0 - 2.0 * u)
        assert float((draws <= u).double().mean()) == pytest.approx(expected, abs=0.005)
    assert resolution_shift(64 * 64, 32 * 32) == 2.0


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="time sampling"):
        sample_flow_time(4, "cosine")
    with pytest.raises(ValueError, match="shift"):
        FlowEulerSampler(shift=0.0)
    with pytest.raises(ValueError, match="time sampling"):
        FlowMatchingLoss(time_sampling="normal")


# 4. the flow-matching loss


def test_flow_loss_is_the_velocity_mse_and_zero_for_the_exact_velocity_of_one_point() -> None:
    loss = FlowMatchingLoss(time_sampling="uniform")
    x0 = torch.full((8, 3, 4, 4), MU, dtype=F64)
    assert float(loss(GaussianFlowVelocity(std=0.0), x0, torch.Generator().manual_seed(0))) < 1e-12  # float32 t

    seen = {}

    def model(x: torch.Tensor, label: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        seen.update(label=label, context=context)
        return 0.5 * x

    t, noise, context = torch.tensor([0.2, 0.9], dtype=F64), _noise(2, 3, 4, 4, seed=2), torch.ones(2, 5)
    data = _noise(2, 3, 4, 4, seed=3)
    per_sample = loss.per_sample(model, data, t, noise, extra_args={"context": context})
    squared = (0.5 * flow_interpolate(data, noise, t) - (noise - data)).pow(2)
    torch.testing.assert_close(per_sample, squared.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(seen["label"], 1000 * t)
    assert seen["context"] is context
    weight = torch.rand(2, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(4)) * 2
    weighted = loss.per_sample(model, data, t, noise, weight, {"context": context})
    torch.testing.assert_close(weighted, (squared * weight).mean(dim=(1, 2, 3)))


# 5. EDM preconditioning


SIGMAS = torch.tensor([0.002, 0.1, 0.5, 2.0, 80.0], dtype=F64)


def test_ideal_raw_output_gives_back_the_data() -> None:
    x0, noise = _noise(5, 3, 4, 4), _noise(5, 3, 4, 4, seed=1)
    sigma = SIGMAS.reshape(-1, 1, 1, 1)
    noisy = x0 + sigma * noise
    c_skip, c_out, _, c_noise = edm_coefficients(sigma)
    ideal_raw = (x0 - c_skip * noisy) / c_out  # F's training target (EDM eq. 8 rearranged)
    torch.testing.assert_close(c_skip * noisy + c_out * ideal_raw, x0)
    torch.testing.assert_close(c_noise.flatten(), SIGMAS.log() / 4)
    torch.testing.assert_close(edm_loss_weight(SIGMAS) * edm_coefficients(SIGMAS)[1] ** 2, torch.ones_like(SIGMAS))

    class IdealRaw(nn.Module):
        def forward(self, scaled: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            s = edm_noise_label_to_sigma(label).reshape(-1, 1, 1, 1)
            skip, out, inp, _ = edm_coefficients(s)
            return (x0 - skip * scaled / inp) / out

    torch.testing.assert_close(EDMPrecond(IdealRaw())(noisy, SIGMAS), x0)


def test_raw_input_and_target_have_unit_variance_for_data_of_sigma_data() -> None:
    x0 = 0.5 * _noise(200_000)  # std = sigma_data
    noise = _noise(200_000, seed=1)
    for sigma in SIGMAS.tolist():
        c_skip, c_out, c_in, _ = edm_coefficients(torch.tensor(sigma, dtype=F64))
        noisy = x0 + sigma * noise
        assert float((c_in * noisy).var()) == pytest.approx(1.0, abs=0.02)
        assert float(((x0 - c_skip * noisy) / c_out).var()) == pytest.approx(1.0, abs=0.02)


class RawNet(nn.Module):
    """A raw EDM network F(scaled input, noise label) whose output depends on both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1).double()

    def forward(self, scaled: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.conv(scaled) * (1 + 0.1 * torch.tanh(label / 1000)).reshape(-1, 1, 1, 1)


def test_edm_loss_is_the_unit_weight_mse_of_the_raw_network() -> None:
    raw = RawNet()
    model = EDMPrecond(raw)
    x0, noise, sigma = _noise(5, 3, 4, 4), _noise(5, 3, 4, 4, seed=1), SIGMAS
    noisy = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in edm_coefficients(sigma))
    raw_target = (x0 - c_skip * noisy) / c_out
    expected = (raw(c_in * noisy, 1000 * c_noise.flatten()) - raw_target).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(EDMLoss().per_sample(model, x0, sigma, noise), expected)

    seen = []
    EDMLoss()(lambda y, s: seen.append(s) or y, _noise(50_000, 1), torch.Generator().manual_seed(0))
    log_sigma = seen[0].log()
    assert float(log_sigma.mean()) == pytest.approx(-1.2, abs=0.02)
    assert float(log_sigma.std()) == pytest.approx(1.2, abs=0.02)


def _gaussian_denoiser(std: float):
    def denoise(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(F64).reshape(-1, *[1] * (y.ndim - 1))
        return MU + std**2 / (std**2 + s**2) * (y.to(F64) - MU)

    return denoise


@pytest.mark.parametrize(("sampler_class", "order"), [(EDMEulerSampler, 1), (EDMHeunSampler, 2)])
def test_edm_samplers_land_on_the_exact_solution(sampler_class: type, order: int) -> None:
    z = _noise(4, 3, 4, 4)
    sample = sample_loop(_gaussian_denoiser(0.0), sampler_class(), z, 3)  # one point: exact in any step count
    torch.testing.assert_close(sample, torch.full_like(sample, MU), rtol=0, atol=1e-10)
    # Gaussian data: y - MU scales as sqrt(STD^2 + sigma^2) along the ODE; the last step returns D(y, sigma_min).
    sigma_min, sigma_max = 0.002, 80.0
    exact = MU + sigma_max * z * STD**2 / math.sqrt((STD**2 + sigma_min**2) * (STD**2 + sigma_max**2))
    errors = [
        float((sample_loop(_gaussian_denoiser(STD), sampler_class(), z, n) - exact).abs().max()) for n in (16, 32, 64)
    ]
    for a, b in itertools.pairwise(errors):
        assert order - 0.3 < math.log2(a / b) < order + 0.5, errors


# 6. classifier-free guidance through keyword arguments


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_mask=None) -> torch.Tensor:
        self.calls.append({"batch": x.shape[0], "context": context, "mask": context_mask})
        return x * context.sum(dim=(1, 2)).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1)


def test_cfg_denoiser_passes_an_absent_mask_and_refuses_mismatched_keys() -> None:
    inner = _Recorder()
    x, t = torch.randn(3, 2, 4, 4), torch.full((3,), 7.0)
    cond, null = torch.rand(3, 5, 8), torch.zeros(1, 5, 8)  # a batch-1 null context is repeated
    guided = CFGDenoiser(inner, 3.0)
    out = guided(x, t, cond={"context": cond, "context_mask": None}, uncond={"context": null, "context_mask": None})
    assert len(inner.calls) == 1 and inner.calls[0]["batch"] == 6 and inner.calls[0]["mask"] is None
    cond_out, uncond_out = inner(x, t, cond), inner(x, t, null.expand(3, 5, 8))
    torch.testing.assert_close(out, uncond_out + 3.0 * (cond_out - uncond_out))
    with pytest.raises(ValueError, match="keys"):
        guided(x, t, cond={"context": cond}, uncond={"mask": None})


def test_samplers_drive_the_guided_model_through_extra_args() -> None:
    inner = _Recorder()
    x_1 = torch.randn(2, 2, 4, 4)
    extra = {"cond": {"context": torch.rand(2, 5, 8)}, "uncond": {"context": torch.zeros(1, 5, 8)}}
    steps = list(sample_steps(CFGDenoiser(inner, 2.0), FlowHeunSampler(), x_1, 3, extra_args=extra))
    assert len(steps) == 5 and len(inner.calls) == 5 and all(c["batch"] == 4 for c in inner.calls)
