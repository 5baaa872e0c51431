"""DPM-Solver++(2M), Euler and Heun on VP schedules: step-by-step agreement with diffusers' schedulers, exact landing
when the data is one point, and convergence at the methods' orders to the exact PF-ODE solution for Gaussian data."""

import itertools
import math

import pytest
import torch
from torch import nn

from gen_lightning.diffusion import (
    ALL_SAMPLER_NAMES,
    DDIMSampler,
    EDMEulerSampler,
    EDMHeunSampler,
    NoiseSchedule,
    build_edm_sampler,
    build_flow_sampler,
    build_sampler,
    eps_from_x0,
    sample_loop,
    sample_steps,
    training_target,
)
from gen_lightning.diffusion.dpm_solver import DPMSolverSampler
from gen_lightning.diffusion.karras import karras_sigmas, sigma_to_timestep, vp_noise_levels, vp_sigmas
from gen_lightning.diffusion.ode_samplers import EulerSampler, HeunSampler

F64 = torch.float64
MU, STD = 0.3, 0.5  # the Gaussian data distribution N(MU, STD^2) of the exact denoiser
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}


def timestep_to_sigma(t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Inverse of sigma_to_timestep: log sigma interpolated linearly between training steps."""
    log_table = vp_sigmas(schedule).log()
    t = t.to(F64).clamp(0, len(log_table) - 1)
    low = t.floor().long().clamp(max=len(log_table) - 2)
    weight = t - low
    return (log_table[low] * (1 - weight) + log_table[low + 1] * weight).exp()


class GaussianDenoiser(nn.Module):
    """The exact prediction (eps, v or x0) at x_t for data ~ N(MU, STD^2) per pixel (STD = 0: the point MU), at any
    fractional timestep; plus `wobble` times a small fixed conv net of (x, t), so that samplers disagree visibly."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str, std: float = STD, wobble: float = 0.0) -> None:
        super().__init__()
        self.schedule, self.prediction_type, self.std, self.wobble = schedule, prediction_type, std, wobble
        generator = torch.Generator().manual_seed(1)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.3

    def forward(self, x: torch.Tensor, t: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        sigma = timestep_to_sigma(t, self.schedule)[:, None, None, None]
        x64 = x.to(F64)
        y = x64 * (1 + sigma**2).sqrt()  # x_t / sqrt(alpha_bar) = x0 + sigma eps
        x0 = MU + self.std**2 / (self.std**2 + sigma**2) * (y - MU)  # E[x0 | y] for Gaussian x0
        alpha_bar = 1 / (1 + sigma**2)
        out = gain * training_target(self.prediction_type, x0, eps_from_x0(x64, x0, alpha_bar), alpha_bar)
        if self.wobble:
            h = torch.tanh(self.conv1(x.float())) * (1 + 0.5 * torch.sin(t.float() / 150))[:, None, None, None]
            out = out + self.wobble * self.conv2(h).to(F64)
        return out.to(x.dtype)


def exact_sample(x_T: torch.Tensor, sigma_max: float, sigma_min: float, std: float = STD) -> torch.Tensor:
    """Where the PF-ODE from y = x_T sqrt(1 + sigma_max^2) at sigma_max, run to sigma_min, then denoised (every
    sampler's last step is x0 = D(y, sigma_min)) lands for N(MU, std^2) data: y - MU grows as sqrt(std^2 + sigma^2)."""
    y_T = x_T.to(F64) * math.sqrt(1 + sigma_max**2)
    return MU + (y_T - MU) * std**2 / math.sqrt((std**2 + sigma_min**2) * (std**2 + sigma_max**2))


# 1. noise levels


def test_karras_sigmas_follow_edm_eq5() -> None:
    sigmas = karras_sigmas(3, 0.002, 80.0, rho=7.0)
    middle = ((80.0 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    torch.testing.assert_close(sigmas, torch.tensor([80.0, middle, 0.002, 0.0], dtype=F64))
    assert karras_sigmas(1, 0.1, 5.0).tolist() == pytest.approx([5.0, 0.0])


def test_sigma_to_timestep_inverts_the_table_and_interpolates_log_sigma() -> None:
    schedule = NoiseSchedule.from_name("linear", 1000)
    table = vp_sigmas(schedule)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(sigma_to_timestep(table[t], table), t.to(F64))
    between = (table[10].log() * 0.75 + table[11].log() * 0.25).exp()
    torch.testing.assert_close(sigma_to_timestep(between, table), torch.tensor(10.25, dtype=F64))
    torch.testing.assert_close(timestep_to_sigma(torch.tensor([10.25]), schedule), between.reshape(1))
    assert sigma_to_timestep(torch.tensor([1e-6, 1e6]), table).tolist() == [0.0, 999.0]  # clamped to [0, T-1]


def test_noise_levels_karras_are_fractional_discrete_are_the_ddim_timesteps() -> None:
    schedule = NoiseSchedule.from_name("linear", 1000)
    sigmas, times = vp_noise_levels(schedule, 10, sigma_max=float(vp_sigmas(schedule)[-1]))
    assert times.dtype == F64 and times[0] == pytest.approx(999) and times[-1] == pytest.approx(0, abs=1e-9)
    assert sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    sigmas, times = vp_noise_levels(schedule, 10, spacing="trailing")
    assert times.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    torch.testing.assert_close(sigmas[:-1], vp_sigmas(schedule)[times])


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_karras_grid_starts_at_most_at_80_unless_told(name: str) -> None:
    # the cosine schedule's last sigma is ~2e4: Heun from there gives noise on the demo model (bench/RESULTS.md)
    schedule = NoiseSchedule.from_name(name, 1000)
    last_sigma = float(vp_sigmas(schedule)[-1])
    assert last_sigma > 80
    sigmas, times = vp_noise_levels(schedule, 5)
    assert float(sigmas[0]) == pytest.approx(80.0) and float(times[0]) < 999
    sigmas, times = vp_noise_levels(schedule, 5, sigma_max=last_sigma)
    assert float(sigmas[0]) == pytest.approx(last_sigma) and float(times[0]) == pytest.approx(999)


# 2. agreement with diffusers, step by step


def _diffusers_scheduler(name: str, schedule: NoiseSchedule, prediction_type: str, spacing: str):
    diffusers = pytest.importorskip("diffusers")
    kwargs = {"trained_betas": schedule.betas.float().numpy(), "prediction_type": DIFFUSERS_PREDICTION[prediction_type]}
    if name == "dpm++":
        if spacing == "karras":
            kwargs["use_karras_sigmas"] = True
        else:
            kwargs["timestep_spacing"] = spacing
        return diffusers.DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++", **kwargs)
    cls = diffusers.EulerDiscreteScheduler if name == "euler" else diffusers.HeunDiscreteScheduler
    if spacing == "karras":
        return cls(use_karras_sigmas=True, **kwargs)
    return cls(timestep_spacing=spacing, **kwargs)


def _share_grid(reference, ours, name: str) -> None:
    """Give diffusers our float64 noise grid (as float32): diffusers computes sigma_min from a float32 alpha_bar[0]
    (1 - 0.9999 loses 3 digits), which moves its Karras sigmas by up to 1e-4 relative; the steps are compared on the
    same grid, the grids themselves separately."""
    sigmas = ours.sigmas.float()
    if name == "heun":
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    reference.sigmas = sigmas
    reference.timesteps = ours.timesteps.float()


CASES = [
    ("dpm++", "trailing"),
    ("dpm++", "karras"),
    ("euler", "karras"),
    ("euler", "trailing"),
    ("heun", "karras"),
]


# diffusers 0.42 converts a torch tensor with np.array(..., copy=False), which numpy 2 warns about.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
@pytest.mark.parametrize(("name", "spacing"), CASES)
def test_steps_match_diffusers(name: str, spacing: str, prediction_type: str) -> None:
    schedule = NoiseSchedule.from_name("linear", 1000)
    model = GaussianDenoiser(schedule, prediction_type, wobble=0.05)
    # diffusers starts a Karras grid at the schedule's last sigma (157 here); ours caps it at 80 unless told
    uncapped = {"sigma_max": float(vp_sigmas(schedule)[-1])} if spacing == "karras" else {}
    ours = build_sampler(name, schedule, prediction_type, timestep_spacing=spacing, **uncapped)
    reference = _diffusers_scheduler(name, schedule, prediction_type, spacing)
    num_steps = 10
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        our_steps = list(sample_steps(model, ours, x_T, num_steps))

    reference.set_timesteps(num_steps)
    # The grids agree to diffusers' float32 precision (DPM-Solver's Karras timesteps: diffusers rounds them to
    # integers, and evaluates the network there)...
    time_tolerance = 0.5 if (name, spacing) == ("dpm++", "karras") else 2e-2
    torch.testing.assert_close(reference.timesteps.to(F64), ours.timesteps.to(F64), rtol=0, atol=time_tolerance)
    level_sigmas = reference.sigmas if name != "heun" else torch.cat([reference.sigmas[::2], reference.sigmas[-1:]])
    torch.testing.assert_close(level_sigmas.to(F64), ours.sigmas, rtol=2e-4, atol=1e-6)
    # ...and on the same grid each step lands on the same point. diffusers' Euler/Heun carry y = x_t sqrt(1 + sigma^2)
    # and divide it back for the network (scale_model_input); DPM-Solver carries x_t as we do. Same noise x_T.
    _share_grid(reference, ours, name)
    sample = x_T * (1.0 if name == "dpm++" else math.sqrt(1 + float(ours.sigmas[0]) ** 2))
    assert len(reference.timesteps) == len(our_steps) == ours.num_evaluations
    with torch.no_grad():
        for i, (t, (our_t, our_x)) in enumerate(zip(reference.timesteps, our_steps, strict=True)):
            assert float(t) == pytest.approx(our_t, abs=1e-3)
            model_input = reference.scale_model_input(sample, t)
            sample = reference.step(model(model_input, t.expand(len(x_T))), t, sample).prev_sample
            sigma = 0.0 if name == "dpm++" else float(reference.sigmas[reference.step_index])
            torch.testing.assert_close(sample / math.sqrt(1 + sigma**2), our_x, rtol=0, atol=1e-5, msg=f"step {i}")
    assert our_steps[-1][1].abs().max() > 0.5  # a real sample, not a collapsed one


# 3. exact solutions


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("name", ["dpm++", "euler", "heun"])
def test_single_point_data_is_reached_exactly_in_any_number_of_steps(name: str, prediction_type: str) -> None:
    # For one data point every ODE path is a straight line in (sigma, y): Euler, Heun and DPM-Solver are exact.
    schedule = NoiseSchedule.from_name("cosine", 1000)
    model = GaussianDenoiser(schedule, prediction_type, std=0.0)
    x_T = torch.randn(3, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    for num_steps in (1, 3, 10):
        sample = sample_loop(model, build_sampler(name, schedule, prediction_type), x_T, num_steps)
        torch.testing.assert_close(sample, torch.full_like(sample, MU), rtol=0, atol=1e-9)


@pytest.mark.parametrize(("name", "order"), [("euler", 1), ("heun", 2), ("dpm++", 2)])
def test_gaussian_data_converges_at_the_methods_order(name: str, order: int) -> None:
    schedule = NoiseSchedule.from_name("linear", 1000)
    model = GaussianDenoiser(schedule, "epsilon")
    x_T = torch.randn(4, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    errors = []
    for num_steps in (16, 32, 64):
        sampler = build_sampler(name, schedule, "epsilon", timestep_spacing="karras")
        sample = sample_loop(model, sampler, x_T, num_steps)
        exact = exact_sample(x_T, float(sampler.sigmas[0]), float(sampler.sigmas[-2]))
        errors.append(float((sample - exact).abs().max()))
    observed = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    assert errors[-1] < 0.1 * errors[0] if order == 2 else errors[-1] < 0.3 * errors[0]
    for rate in observed:  # halving the step divides the error by 2^order
        assert order - 0.3 < rate < order + 0.5, (errors, observed)


# 4. relations, the loop and its contract


def test_dpm_solver_first_step_is_ddim() -> None:
    schedule = NoiseSchedule.from_name("linear", 1000)
    model = GaussianDenoiser(schedule, "v", wobble=0.1)
    dpm = DPMSolverSampler(schedule, "v", timestep_spacing="trailing")
    ddim = DDIMSampler(schedule, "v", clip_sample=None, timestep_spacing="trailing")
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    (_, dpm_x), *_ = sample_steps(model, dpm, x_T, 10)
    (_, ddim_x), *_ = sample_steps(model, ddim, x_T, 10)
    torch.testing.assert_close(dpm_x, ddim_x, rtol=1e-5, atol=1e-6)


def test_loop_passes_keyword_arguments_and_gives_integer_or_fractional_times() -> None:
    schedule = NoiseSchedule.from_name("linear", 1000)
    model = GaussianDenoiser(schedule, "epsilon", wobble=0.1)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ddim = DDIMSampler(schedule, "epsilon")
    ours = sample_loop(model, ddim, x_T, 5, extra_args={"gain": 1.0})
    by_hand = x_T
    for t in ddim.timesteps.tolist():  # set to 5 steps by the loop above
        by_hand = ddim.step(model(by_hand, torch.full((2,), t), gain=1.0), t, by_hand)
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=0)
    assert not torch.allclose(ours, sample_loop(model, ddim, x_T, 5, extra_args={"gain": 0.5}))
    for sampler, dtype in ((EulerSampler(schedule), torch.float32), (ddim, torch.int64)):
        seen = []
        sample_loop(lambda x, t, seen=seen: seen.append(t) or torch.zeros_like(x), sampler, x_T, 3)
        assert len(seen) == 3 and all(t.dtype == dtype and t.shape == (2,) for t in seen)


def test_heun_evaluates_twice_per_step_but_the_last() -> None:
    schedule = NoiseSchedule.from_name("linear", 1000)
    heun = HeunSampler(schedule)
    heun.set_timesteps(4)
    assert heun.num_evaluations == 7
    t = heun.timesteps.tolist()
    assert t[1] == t[2] and t[3] == t[4] and t[5] == t[6]


def test_bad_use_raises() -> None:
    schedule = NoiseSchedule.from_name("linear", 100)
    assert ALL_SAMPLER_NAMES == (
        "ddim", "ddpm", "dpm++", "euler", "heun", "consistency", "flow_euler", "flow_heun", "edm_euler", "edm_heun"
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown sampler"):
        build_sampler("lms", schedule)
    with pytest.raises(ValueError, match=r"rectified flow.*use build_flow_sampler"):
        build_sampler("flow_euler", schedule)
    with pytest.raises(ValueError, match=r"VP schedule.*use build_sampler"):
        build_flow_sampler("ddim")
    with pytest.raises(ValueError, match=r"EDM's preconditioned denoiser.*use build_edm_sampler"):
        build_sampler("edm_heun", schedule)
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        build_edm_sampler("lms")
    assert build_flow_sampler("flow_heun", shift=3.0).shift == 3.0
    heun = build_edm_sampler("edm_heun", sigma_min=0.01, sigma_max=10.0, rho=5.0)
    assert isinstance(heun, EDMHeunSampler) and (heun.sigma_min, heun.sigma_max, heun.rho) == (0.01, 10.0, 5.0)
    assert isinstance(build_edm_sampler("edm_euler"), EDMEulerSampler)
    with pytest.raises(ValueError, match="rho must be > 0"):
        build_edm_sampler("edm_euler", rho=0.0)
    with pytest.raises(ValueError, match="noise spacing"):
        EulerSampler(schedule, timestep_spacing="uniform")
    with pytest.raises(ValueError, match="zero terminal SNR"):
        DPMSolverSampler(NoiseSchedule.from_name("linear", 100, zero_terminal_snr=True), "epsilon")
    sampler = EulerSampler(schedule)
    sampler.set_timesteps(2)
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="expects timestep"):
        sampler.step(x, 12.0, x)
    for t in sampler.timesteps.tolist():
        x = sampler.step(torch.zeros_like(x), t, x)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sampler.step(x, 0.0, x)


def test_zero_terminal_snr_v_prediction_starts_from_a_finite_sigma() -> None:
    schedule = NoiseSchedule.from_name("linear", 1000, zero_terminal_snr=True)
    model = GaussianDenoiser(schedule, "v", std=0.0)
    x_T = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    for name in ("dpm++", "euler", "heun"):
        sample = sample_loop(model, build_sampler(name, schedule, "v"), x_T, 6)
        torch.testing.assert_close(sample, torch.full_like(sample, MU), rtol=0, atol=1e-6)
