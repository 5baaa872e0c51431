"""Unit tests of gen_lightning.diffusion: closed forms against recursions, sampler equivalences, oracle sampling."""

import math
from collections.abc import Callable

import pytest
import torch

from gen_lightning.diffusion import (
    CFGDenoiser,
    DDIMSampler,
    DDPMSampler,
    DiffusionLoss,
    NoiseSchedule,
    build_sampler,
    classifier_free_guidance,
    eps_from_v,
    eps_from_x0,
    gaussian_noise,
    q_posterior_mean_variance,
    q_sample,
    sample_loop,
    sample_steps,
    spaced_timesteps,
    to_x0_and_eps,
    training_target,
    v_from_eps,
    x0_from_eps,
    x0_from_v,
)
from gen_lightning.diffusion.losses import min_snr_weight

F64 = torch.float64
PREDICTION_TYPES = ("epsilon", "v", "sample")


def _seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return gaussian_noise(shape, torch.Generator().manual_seed(seed))


def _two_step_schedule() -> NoiseSchedule:
    # alpha_bar = [0.9, 0.5] -> snr = [9, 1]: small enough to check weights by hand.
    return NoiseSchedule(torch.tensor([0.1, 1 - 0.5 / 0.9], dtype=F64))


def _oracle(schedule: NoiseSchedule, x_star: torch.Tensor, prediction_type: str):
    """The exact denoiser when the data distribution is a single point x*: x0 = x*, eps read off x_t."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alpha_bar(t, dtype=F64)
        x_t64 = x_t.to(F64)
        x0 = x_star.to(F64).expand_as(x_t64)
        eps = eps_from_x0(x_t64, x0, ab)
        return training_target(prediction_type, x0, eps, ab).to(x_t.dtype)

    return model


# 1. closed-form q(x_t | x_0) against the step-by-step chain q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
def test_q_sample_matches_stepwise_recursion(name: str) -> None:
    sched = NoiseSchedule.from_name(name, 1000)
    t = torch.arange(1000)
    # q_sample's own coefficients: mean coefficient with (x0=1, noise=0), std with (x0=0, noise=1).
    mean_coef = q_sample(sched, torch.ones(1000, dtype=F64), t, torch.zeros(1000, dtype=F64))
    std = q_sample(sched, torch.zeros(1000, dtype=F64), t, torch.ones(1000, dtype=F64))
    m, v = 1.0, 0.0  # x_{-1} = x0 exactly
    expected_m, expected_v = [], []
    for beta in sched.betas.tolist():
        m, v = math.sqrt(1 - beta) * m, (1 - beta) * v + beta
        expected_m.append(m)
        expected_v.append(v)
    torch.testing.assert_close(mean_coef, torch.tensor(expected_m, dtype=F64), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(std**2, torch.tensor(expected_v, dtype=F64), rtol=1e-12, atol=1e-14)


def test_q_sample_broadcasts_over_any_rank() -> None:
    sched = NoiseSchedule.from_name("linear", 100)
    t = torch.tensor([3, 70])
    for shape in [(2,), (2, 5), (2, 3, 4, 4), (2, 2, 3, 4, 4)]:
        x0, noise = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
        x_t = q_sample(sched, x0, t, noise)
        for i in range(2):
            ab = sched.alphas_cumprod[t[i]]
            torch.testing.assert_close(x_t[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * noise[i])


def test_q_sample_monte_carlo_matches_simulated_chain() -> None:
    # n chains simulated step by step; at the checked t compare empirical mean/var with q_sample's closed form.
    # Standard errors: mean sqrt(var/n) <= 1/sqrt(n) ~ 0.0071; variance var*sqrt(2/(n-1)) <= 0.01 (Gaussian, var <= 1).
    # 5 standard errors (seeded, so deterministic) leaves no room for a wrong coefficient, e.g. alpha vs sqrt(alpha).
    n, x0_val, checks = 20_000, 0.7, {0, 10, 100, 299}
    sched = NoiseSchedule.from_name("linear", 1000)
    gen = torch.Generator().manual_seed(0)
    x = torch.full((n,), x0_val, dtype=F64)
    for t in range(max(checks) + 1):
        beta = float(sched.betas[t])
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn(n, generator=gen, dtype=F64)
        if t in checks:
            tt = torch.tensor([t])
            mean = float(q_sample(sched, torch.tensor([x0_val], dtype=F64), tt, torch.zeros(1, dtype=F64)))
            var = float(q_sample(sched, torch.zeros(1, dtype=F64), tt, torch.ones(1, dtype=F64))) ** 2
            assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / n), t
            assert abs(float(x.var()) - var) < 5 * var * math.sqrt(2 / (n - 1)), t


def test_q_posterior_matches_bayes_rule() -> None:
    # q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): product of Gaussians in x_{t-1}, precisions add.
    sched = NoiseSchedule.from_name("cosine", 200)
    t = torch.tensor([1, 50, 199])
    x0, x_t = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    mean, var = q_posterior_mean_variance(sched, x0, x_t, t)
    beta, ab_prev = sched.betas[t][:, None], sched.alphas_cumprod[t - 1][:, None]
    prec = (1 - beta) / beta + 1 / (1 - ab_prev)
    expected_mean = ((1 - beta).sqrt() / beta * x_t + ab_prev.sqrt() / (1 - ab_prev) * x0) / prec
    torch.testing.assert_close(var, 1 / prec)
    torch.testing.assert_close(mean, expected_mean)
    # t=0: x_{-1} is x0 itself
    mean0, var0 = q_posterior_mean_variance(sched, x0, x_t, torch.zeros(3, dtype=torch.long))
    assert float(var0.abs().max()) == 0.0
    torch.testing.assert_close(mean0, x0)


# 2. DDIM(eta=1, all steps) is DDPM


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_eta1_variance_is_ddpm_posterior_variance(name: str) -> None:
    sched = NoiseSchedule.from_name(name, 1000)
    ddim, ddpm = DDIMSampler(sched, eta=1.0), DDPMSampler(sched)
    t = torch.arange(1000)
    _, post_var = q_posterior_mean_variance(sched, torch.zeros(1000, dtype=F64), torch.zeros(1000, dtype=F64), t)
    ddim_var = torch.tensor([ddim.variance(i) for i in range(1000)], dtype=F64)
    ddpm_var = torch.tensor([ddpm.variance(i) for i in range(1000)], dtype=F64)
    torch.testing.assert_close(ddim_var, post_var, rtol=1e-10, atol=0)
    torch.testing.assert_close(ddpm_var, post_var, rtol=1e-10, atol=0)
    # eta scales sigma^2 by eta^2; eta=0 is deterministic
    assert DDIMSampler(sched, eta=0.5).variance(500) == pytest.approx(0.25 * float(post_var[500]), rel=1e-12)
    assert DDIMSampler(sched, eta=0.0).variance(500) == 0.0


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clip_sample", [None, 1.0])
def test_ddim_eta1_step_equals_ddpm_step(prediction_type: str, clip_sample: float | None) -> None:
    sched = NoiseSchedule.from_name("linear", 1000)
    ddim = DDIMSampler(sched, prediction_type, eta=1.0, clip_sample=clip_sample)
    ddpm = DDPMSampler(sched, prediction_type, clip_sample=clip_sample)
    x_t, out = torch.randn(2, 3, 4, 4, dtype=F64), 2 * torch.randn(2, 3, 4, 4, dtype=F64)  # 2x: clipping bites
    for t in [999, 500, 20, 1, 0]:
        a = ddim.step(out, t, x_t, generator=torch.Generator().manual_seed(t))
        b = ddpm.step(out, t, x_t, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # and DDPM's step is the posterior mean plus sqrt(var) * the generator's noise
    x0, _ = to_x0_and_eps(prediction_type, out, x_t, sched.alphas_cumprod[500])
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    mean, var = q_posterior_mean_variance(sched, x0, x_t, torch.full((2,), 500))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    got = ddpm.step(out, 500, x_t, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, mean + var.sqrt() * z, rtol=1e-10, atol=1e-10)


def test_respaced_ddpm_equals_ddim_eta1_on_same_steps() -> None:
    # Respacing recomputes betas from the kept alpha_bars; DDIM's sigma formula must give the same chain.
    sched = NoiseSchedule.from_name("cosine", 1000)
    ddim, ddpm = DDIMSampler(sched, "v", eta=1.0, clip_sample=None), DDPMSampler(sched, "v", clip_sample=None)
    ddim.set_timesteps(37)
    ddpm.set_timesteps(37)
    x_t, out = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    for t in ddim.timesteps.tolist():
        a = ddim.step(out, t, x_t, generator=torch.Generator().manual_seed(1))
        b = ddpm.step(out, t, x_t, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        prev = ddpm.previous_timestep(t)
        ab_prev = 1.0 if prev < 0 else float(sched.alphas_cumprod[prev])
        beta = 1 - float(sched.alphas_cumprod[t]) / ab_prev  # improved-DDPM respaced beta
        assert ddpm.variance(t) == pytest.approx(beta * (1 - ab_prev) / (1 - float(sched.alphas_cumprod[t])))


# 3. conversions round-trip


def test_parameterization_round_trips() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 64
    x0, eps = torch.randn(n, 3, 4, 4, generator=gen, dtype=F64), torch.randn(n, 3, 4, 4, generator=gen, dtype=F64)
    ab = torch.rand(n, generator=gen, dtype=F64).clamp(1e-3, 1 - 1e-3)
    x_t = ab.sqrt()[:, None, None, None] * x0 + (1 - ab).sqrt()[:, None, None, None] * eps
    for prediction_type in PREDICTION_TYPES:
        target = training_target(prediction_type, x0, eps, ab)
        x0_hat, eps_hat = to_x0_and_eps(prediction_type, target, x_t, ab)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)
    v = training_target("v", x0, eps, ab)
    torch.testing.assert_close(v_from_eps(x_t, eps, ab), v, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_from_v(x_t, v, ab), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_from_v(x_t, v, ab), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_from_eps(x_t, eps, ab), x0, rtol=1e-9, atol=1e-9)
    # v is a rotation of (x0, eps): the norm of (x_t, v) equals the norm of (x0, eps) per element
    torch.testing.assert_close(x_t**2 + v**2, x0**2 + eps**2)
    # Python-float alpha_bar behaves like a tensor one
    torch.testing.assert_close(x0_from_eps(x_t[:1], eps[:1], float(ab[0])), x0[:1], rtol=1e-9, atol=1e-9)


# 4. oracle sampling lands on the single data point


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_oracle_ddim_and_ddpm_land_on_data_point(prediction_type: str) -> None:
    sched = NoiseSchedule.from_name("linear", 1000)
    x_star = torch.linspace(-0.9, 0.9, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    model = _oracle(sched, x_star, prediction_type)
    for spacing in ("leading", "trailing", "linspace"):
        for steps in (10, 50):
            sampler = DDIMSampler(sched, prediction_type, eta=0.0, timestep_spacing=spacing)
            out = sample_loop(model, sampler, _seeded_noise((2, 3, 4, 4), steps), steps)
            torch.testing.assert_close(out, x_star, rtol=0, atol=1e-4, msg=f"DDIM {spacing} {steps}")
    sampler = DDPMSampler(sched, prediction_type)
    generator = torch.Generator().manual_seed(1)
    out = sample_loop(model, sampler, gaussian_noise((2, 3, 4, 4), generator), 50, generator=generator)
    torch.testing.assert_close(out, x_star, rtol=0, atol=1e-4)


def test_sample_steps_yields_each_step_and_ends_where_sample_loop_does() -> None:
    sched = NoiseSchedule.from_name("linear", 1000)
    model = _oracle(sched, torch.linspace(-0.9, 0.9, 12).reshape(1, 3, 2, 2), "epsilon")
    sampler = DDPMSampler(sched)  # stochastic: the same generator seed must give the same draws in both loops
    generator = torch.Generator().manual_seed(3)
    steps = list(sample_steps(model, sampler, gaussian_noise((1, 3, 2, 2), generator), 7, generator=generator))
    assert [t for t, _ in steps] == sampler.timesteps.tolist() and len(steps) == 7
    assert not torch.equal(steps[0][1], steps[-1][1])
    generator = torch.Generator().manual_seed(3)
    out = sample_loop(model, sampler, gaussian_noise((1, 3, 2, 2), generator), 7, generator=generator)
    torch.testing.assert_close(steps[-1][1], out, rtol=0, atol=0)


def test_oracle_zero_terminal_snr_v_prediction() -> None:
    # The first trailing step has alpha_bar = 0 (pure noise): only v/sample predictions can say where x0 is.
    sched = NoiseSchedule.from_name("scaled_linear", 1000, zero_terminal_snr=True)
    x_star = torch.tensor([[0.5, -0.25, 0.8]])
    for sampler in (DDIMSampler(sched, "v", clip_sample=None), DDPMSampler(sched, "v", clip_sample=None)):
        out = sample_loop(_oracle(sched, x_star, "v"), sampler, _seeded_noise((1, 3), 0), 20)
        torch.testing.assert_close(out, x_star, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_deterministic_path_keeps_its_noise(spacing: str) -> None:
    # DDIM (eta=0) with the oracle keeps x_s = sqrt(ab_s) x* + sqrt(1 - ab_s) eps0 with the SAME eps0 at every visited
    # step s; a wrong step coefficient or a wrong "previous timestep" (e.g. t - T // n, wrong for 7 steps) breaks this
    # even where the final x0 step would hide it.
    sched = NoiseSchedule.from_name("cosine", 1000)
    x_star, eps0 = torch.tensor([[0.3, -0.6]], dtype=F64), torch.tensor([[1.5, -0.4]], dtype=F64)
    sampler = DDIMSampler(sched, "epsilon", clip_sample=None, timestep_spacing=spacing)
    sampler.set_timesteps(7)
    model = _oracle(sched, x_star, "epsilon")
    ts = sampler.timesteps.tolist()
    ab = [float(sched.alphas_cumprod[t]) for t in ts] + [1.0]  # the step after the last lands on clean data
    x = math.sqrt(ab[0]) * x_star + math.sqrt(1 - ab[0]) * eps0
    for i, t in enumerate(ts):
        x = sampler.step(model(x, torch.tensor([t])), t, x)
        torch.testing.assert_close(x, math.sqrt(ab[i + 1]) * x_star + math.sqrt(1 - ab[i + 1]) * eps0, msg=str(t))


def test_ddpm_respaced_chain_keeps_marginals_of_q() -> None:
    # With the oracle for one point x*, each ancestral step maps q(x_t|x*) exactly onto q(x_prev|x*). Monte-Carlo over
    # n chains at the kept steps: mean SE sqrt(var/n), variance SE var*sqrt(2/(n-1)); 5 SE (seeded).
    n, x_val = 20_000, 0.6
    sched = NoiseSchedule.from_name("linear", 1000)
    sampler = DDPMSampler(sched, "epsilon", clip_sample=None)
    sampler.set_timesteps(20)
    model = _oracle(sched, torch.tensor([[x_val]], dtype=F64), "epsilon")
    gen = torch.Generator().manual_seed(0)
    x = q_sample(sched, torch.full((n, 1), x_val, dtype=F64), torch.full((n,), 999), torch.randn(n, 1, dtype=F64))
    for t in sampler.timesteps.tolist():
        x = sampler.step(model(x, torch.full((n,), t)), t, x, generator=gen)
        prev = sampler.previous_timestep(t)
        if prev in (949, 499, 49):
            ab = float(sched.alphas_cumprod[prev])
            mean, var = math.sqrt(ab) * x_val, 1 - ab
            assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / n), prev
            assert abs(float(x.var()) - var) < 5 * var * math.sqrt(2 / (n - 1)), prev


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [
        ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ],
)
def test_timestep_spacings_match_diffusers(spacing: str, expected: list[int]) -> None:
    # Values from Lin et al. 2023 table 2 / diffusers' DDIMScheduler with T=1000, 10 steps.
    assert spaced_timesteps(1000, 10, spacing).tolist() == expected
    sampler = DDIMSampler(NoiseSchedule.from_name("linear", 1000), timestep_spacing=spacing)
    sampler.set_timesteps(10)
    assert sampler.timesteps.dtype == torch.int64 and sampler.timesteps.tolist() == expected


def test_timestep_spacings_any_count() -> None:
    # Counts that do not divide T: still n distinct descending steps in range (np.arange float drift can add one).
    assert spaced_timesteps(1000, 3, "trailing").tolist() == [999, 666, 332]
    assert spaced_timesteps(1000, 3, "linspace").tolist() == [999, 500, 0]  # 499.5 rounds half to even, like numpy
    for spacing in ("leading", "trailing", "linspace"):
        for n in (1, 3, 7, 999, 1000):
            ts = spaced_timesteps(1000, n, spacing)
            assert len(ts) == n and int(ts.min()) >= 0 and int(ts.max()) <= 999
            assert bool((ts[:-1] > ts[1:]).all())
        with pytest.raises(ValueError, match="num_steps"):
            spaced_timesteps(1000, 1001, spacing)


# 5. classifier-free guidance


def test_cfg_endpoints_and_extrapolation() -> None:
    cond, uncond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0), cond)
    assert torch.equal(classifier_free_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 7.5), uncond + 7.5 * (cond - uncond))


class KeywordNet(torch.nn.Module):
    """net(x_t, t, **cond) with a context tensor and a per-sample scale: records each call's batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return x * context[:, :1, None, None] * scale[:, None, None, None] + t[:, None, None, None]


def test_cfg_denoiser_runs_both_branches_as_one_doubled_forward() -> None:
    net = KeywordNet()
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    cond = {"context": torch.randn(3, 8), "scale": torch.rand(3)}
    uncond = {"context": torch.randn(1, 8), "scale": torch.rand(1)}  # one null conditioning, repeated to the batch
    out = CFGDenoiser(net, 3.0)(x, t, cond=cond, uncond=uncond)
    assert net.batch_sizes == [6]
    expanded = {k: v.expand(3, *v.shape[1:]) for k, v in uncond.items()}
    torch.testing.assert_close(out, classifier_free_guidance(net(x, t, **cond), net(x, t, **expanded), 3.0))
    assert torch.equal(CFGDenoiser(net, 0.0)(x, t, cond=cond, uncond=uncond), net(x, t, **expanded))
    net.batch_sizes.clear()
    assert torch.equal(CFGDenoiser(net, 1.0)(x, t, cond=cond, uncond=uncond), net(x, t, **cond))
    assert net.batch_sizes == [3, 3]  # w = 1: the unconditional branch is not run


def test_samplers_and_the_loss_pass_the_conditioning_as_arguments() -> None:
    sched = NoiseSchedule.from_name("linear", 10)
    net = KeywordNet()
    cond = {"context": torch.ones(2, 8), "scale": torch.tensor([0.5, 2.0])}
    sampled = sample_loop(net, build_sampler("ddim", sched), _seeded_noise((2, 1, 2, 2), 0), 3, extra_args=cond)
    assert net.batch_sizes == [2, 2, 2] and torch.isfinite(sampled).all()
    loss = DiffusionLoss(sched)
    x0, t, noise = torch.randn(2, 1, 2, 2), torch.tensor([3, 9]), torch.randn(2, 1, 2, 2)
    by_hand = loss.per_sample(lambda x, t: net(x, t, **cond), x0, t, noise)
    torch.testing.assert_close(loss.per_sample(net, x0, t, noise, extra_args=cond), by_hand)


# 6. loss weighting and the loss itself


def test_min_snr_weights_hand_computed() -> None:
    sched = _two_step_schedule()
    torch.testing.assert_close(sched.snr(torch.tensor([0, 1]), F64), torch.tensor([9.0, 1.0], dtype=F64))
    t = torch.tensor([0, 1])
    # gamma = 5: snr 9 is clipped to 5, snr 1 is not
    expected = {"epsilon": [5 / 9, 1.0], "v": [5 / 10, 1 / 2], "sample": [5.0, 1.0]}
    for prediction_type, values in expected.items():
        loss = DiffusionLoss(sched, prediction_type, weighting="min_snr", min_snr_gamma=5.0)
        torch.testing.assert_close(loss.weight(t), torch.tensor(values))
        torch.testing.assert_close(DiffusionLoss(sched, prediction_type).weight(t), torch.ones(2))
    # snr = 0 (zero terminal SNR): eps weight takes its limit 1 instead of 0/0
    assert float(min_snr_weight(torch.tensor([0.0]), "epsilon", 5.0)) == 1.0


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_diffusion_loss_zero_for_oracle_positive_otherwise(prediction_type: str, weighting: str) -> None:
    sched = NoiseSchedule.from_name("cosine", 1000)
    x_star = torch.tensor([0.4, -0.2, 0.9], dtype=F64).reshape(1, 3, 1, 1)
    x0 = x_star.expand(16, 3, 2, 2)
    oracle = _oracle(sched, x_star, prediction_type)
    loss = DiffusionLoss(sched, prediction_type, weighting)
    assert float(loss(oracle, x0, generator=torch.Generator().manual_seed(0))) < 1e-12
    wrong = loss(lambda x, t: oracle(x, t) + 0.1, x0, generator=torch.Generator().manual_seed(0))
    assert wrong.ndim == 0 and float(wrong) > 1e-4


def test_diffusion_loss_is_weighted_mse_of_the_target() -> None:
    # A fixed wrong prediction (zeros) gives loss = mean_i w(t_i) mean(target_i^2), with t and noise from the generator.
    sched = NoiseSchedule.from_name("linear", 1000)
    x0 = torch.randn(8, 3, 4, 4, dtype=F64)
    loss = DiffusionLoss(sched, "v", "min_snr")
    got = loss(lambda x, t: torch.zeros_like(x), x0, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (8,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    target = training_target("v", x0, noise, sched.alpha_bar(t, F64))
    snr = sched.snr(t, F64)
    w = snr.clamp(max=5.0) / (snr + 1)
    torch.testing.assert_close(got, (w * target.pow(2).flatten(1).mean(1)).mean())


def test_pixel_weights_multiply_the_squared_error_before_the_pixel_mean() -> None:
    sched = NoiseSchedule.from_name("linear", 1000)
    x0 = torch.randn(4, 3, 4, 4, dtype=F64)
    weight = torch.rand(4, 1, 4, 4, dtype=F64) * 3
    loss = DiffusionLoss(sched, "epsilon", "uniform")
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731  (the prediction's error is the whole target: -noise)
    got = loss(zero, x0, generator=torch.Generator().manual_seed(5), pixel_weight=weight)
    gen = torch.Generator().manual_seed(5)
    torch.randint(0, 1000, (4,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    torch.testing.assert_close(got, (noise.pow(2) * weight).flatten(1).mean(1).mean())
    # Weights of 1 everywhere are the plain loss.
    plain = loss(zero, x0, generator=torch.Generator().manual_seed(5))
    ones = loss(zero, x0, generator=torch.Generator().manual_seed(5), pixel_weight=torch.ones(4, 1, 4, 4))
    torch.testing.assert_close(plain, ones)


# 7. zero terminal SNR and error messages


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(name: str) -> None:
    base = NoiseSchedule.from_name(name, 1000)
    zsnr = NoiseSchedule.from_name(name, 1000, zero_terminal_snr=True)
    assert base.terminal_alpha_bar > 0
    assert float(zsnr.alphas_cumprod[-1]) == 0.0
    assert float(zsnr.alpha_bar(torch.tensor([999]))) == 0.0
    torch.testing.assert_close(zsnr.alphas_cumprod[0], base.alphas_cumprod[0], rtol=1e-12, atol=0)
    assert bool((zsnr.alphas_cumprod[1:] < zsnr.alphas_cumprod[:-1]).all())
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        DDIMSampler(zsnr, "epsilon")
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        DDPMSampler(zsnr, "epsilon")
    DDIMSampler(zsnr, "v")  # fine
    DDPMSampler(zsnr, "sample")


def test_linear_schedule_scales_with_num_timesteps() -> None:
    s1000, s250 = NoiseSchedule.from_name("linear", 1000), NoiseSchedule.from_name("linear", 250)
    assert float(s1000.betas[0]) == pytest.approx(1e-4) and float(s1000.betas[-1]) == pytest.approx(0.02)
    assert float(s250.betas[0]) == pytest.approx(4e-4) and float(s250.betas[-1]) == pytest.approx(0.08)
    # same shape of alpha_bar over normalised time
    assert float(s250.alphas_cumprod[124]) == pytest.approx(float(s1000.alphas_cumprod[499]), rel=0.02)
    sd = NoiseSchedule.from_name("scaled_linear", 1000)
    assert float(sd.betas[0]) == pytest.approx(0.00085) and float(sd.betas[-1]) == pytest.approx(0.012)
    cos = NoiseSchedule.from_name("cosine", 1000)
    assert float(cos.betas.max()) <= 0.999
    # alpha_bar after 500 of 1000 steps: cos^2(0.508/1.008 * pi/2) / cos^2(0.008/1.008 * pi/2) = 0.49377 / 0.99984
    assert float(cos.alphas_cumprod[499]) == pytest.approx(0.49384, abs=1e-4)
    # tiny T: scaled betas would pass 1; clamped so alpha_bar stays positive
    tiny = NoiseSchedule.from_name("linear", 10)
    assert float(tiny.betas.max()) == 0.999 and tiny.terminal_alpha_bar > 0


def test_alpha_bar_is_float32_on_callers_device() -> None:
    sched = NoiseSchedule.from_name("linear", 10)
    ab = sched.alpha_bar(torch.tensor([0, 9]))
    assert ab.dtype == torch.float32 and ab.device == torch.device("cpu")
    assert sched.alphas_cumprod.dtype == F64


@pytest.mark.parametrize(
    ("make", "bad"),
    [
        (lambda: NoiseSchedule.from_name("sigmoidal"), "sigmoidal"),
        (lambda: DiffusionLoss(_two_step_schedule(), "x_start"), "x_start"),
        (lambda: DiffusionLoss(_two_step_schedule(), weighting="p2"), "p2"),
        (lambda: build_sampler("lms", _two_step_schedule()), "lms"),
        (lambda: DDIMSampler(_two_step_schedule(), timestep_spacing="karras"), "karras"),
        (lambda: training_target("score", torch.zeros(1), torch.zeros(1), 0.5), "score"),
        (lambda: to_x0_and_eps("eps", torch.zeros(1), torch.zeros(1), 0.5), "eps"),
    ],
)
def test_bad_names_raise_value_error_naming_them(make: Callable[[], object], bad: str) -> None:
    with pytest.raises(ValueError, match=f"'{bad}'") as info:
        make()
    assert "valid" in str(info.value)


def test_build_sampler_and_step_outside_timesteps() -> None:
    sched = NoiseSchedule.from_name("linear", 100)
    ddim = build_sampler("ddim", sched, "v", eta=0.3, clip_sample=None)
    assert isinstance(ddim, DDIMSampler) and ddim.eta == 0.3 and ddim.clip_sample is None
    assert isinstance(build_sampler("ddpm", sched), DDPMSampler)
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 50"):
        ddim.step(torch.zeros(1), 50, torch.zeros(1))
