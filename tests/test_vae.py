"""The KL-VAE: posterior math, the likelihood / bits-per-dim bound, fp32 first stage, shapes, checkpoints, learning."""

from __future__ import annotations

import io
import math

import lightning as L
import pytest
import torch
from PIL import Image

from gen_lightning.images import pil_to_tensor
from gen_lightning.models.loading import load_model
from gen_lightning.models.vae import BIN_WIDTH, VAEModel, bits_per_dim, dequantize, gaussian_nll
from gen_lightning.nn.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from tests.conftest import toy_samples

TINY = {"channels": [8, 16], "latent_channels": 2, "num_heads": 1}


def toy_images(n: int, size: int = 16) -> torch.Tensor:
    return torch.stack([pil_to_tensor(Image.open(io.BytesIO(s["png"]))) for s in toy_samples(n, size=size)])


def tiny_model(**kwargs) -> VAEModel:
    torch.manual_seed(0)
    return VAEModel(autoencoder=AutoencoderConfig(**TINY), image_size=16, **kwargs)


# --- posterior ------------------------------------------------------------------------------------------------------
def test_kl_of_standard_normal_posterior_is_exactly_zero():
    posterior = DiagonalGaussian(torch.zeros(3, 8, 4, 4))  # mean 0, logvar 0
    assert torch.equal(posterior.kl(), torch.zeros(3))


def test_analytic_kl_matches_monte_carlo():
    torch.manual_seed(0)
    params = torch.randn(2, 6, 1, 1)  # 3 latent dims per sample, varied means and variances
    posterior = DiagonalGaussian(params)
    z = posterior.mean + posterior.std * torch.randn(200_000, *posterior.mean.shape)
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    log_ratio = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).flatten(2).sum(-1)  # [S, N]
    estimate, stderr = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(z.shape[0])
    assert torch.all((posterior.kl() - estimate).abs() < 4 * stderr), (posterior.kl(), estimate, stderr)


def test_posterior_logvar_is_clamped_like_ldm():
    params = torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -1e4)], dim=1)
    posterior = DiagonalGaussian(params)
    assert posterior.logvar.item() == -30.0 and torch.isfinite(posterior.kl()).all()


def test_sample_is_reparameterised_and_seeded():
    params = torch.randn(2, 4, 3, 3, requires_grad=True)
    posterior = DiagonalGaussian(params)
    a = posterior.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, posterior.sample(torch.Generator().manual_seed(1)))
    a.sum().backward()
    assert params.grad is not None and params.grad[:, 2:].abs().sum() > 0  # gradient reaches logvar too


# --- likelihood and bound -------------------------------------------------------------------------------------------
def test_gaussian_nll_and_bits_per_dim_by_hand():
    target = torch.tensor([0.5, -0.5]).reshape(1, 1, 1, 2)
    mean = torch.zeros_like(target)
    logvar = torch.tensor(math.log(0.25))  # σ = 0.5: each residual is exactly one σ
    per_dim = 0.5 * (1.0 + math.log(0.25) + math.log(2 * math.pi))  # 0.72579...
    nll = gaussian_nll(target, mean, logvar)
    assert nll.item() == pytest.approx(2 * per_dim, abs=1e-6)
    assert bits_per_dim(nll, 2).item() == pytest.approx((2 * per_dim + 2 * math.log(127.5)) / (2 * math.log(2)))
    assert bits_per_dim(nll, 2).item() == pytest.approx(8.04145, abs=1e-4)


def test_uniform_density_on_minus_one_one_costs_log2_255_bits():
    # density 1/2 per dimension on [-1, 1] is uniform over the 255 bin widths of the 8-bit grid
    dims = 12
    assert bits_per_dim(torch.tensor([dims * math.log(2.0)]), dims).item() == pytest.approx(math.log2(255))


def test_dequantisation_stays_inside_the_bin():
    images = torch.randint(0, 256, (4, 3, 8, 8)).float() / 127.5 - 1
    noisy = dequantize(images, torch.Generator().manual_seed(0))
    assert (noisy - images).abs().max() <= BIN_WIDTH / 2 + 1e-7
    assert (noisy - images).abs().max() > BIN_WIDTH / 4  # and really spreads


def test_val_elbo_and_bpd_match_their_terms():
    model = tiny_model()
    images = toy_images(4)
    logged: dict[str, float] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    model._trainer = type("Trainer", (), {"global_rank": 0, "is_global_zero": False, "sanity_checking": False})()
    with torch.no_grad():
        model.validation_step({"image": images}, 0)
    assert logged["val/elbo"] == pytest.approx(-(logged["val/recon"] + logged["val/kl"]), rel=1e-5)
    dims = images[0].numel()
    bpd = (logged["val/recon"] + logged["val/kl"] + dims * math.log(127.5)) / (dims * math.log(2))
    assert logged["val/bpd"] == pytest.approx(bpd, rel=1e-5)  # mean of per-image bpd = bpd of mean (it is affine)
    mse = (model.decode(model.encode(images)) - images).div(2).pow(2).flatten(1).mean(1)  # on the [0, 1] scale
    assert logged["val/psnr"] == pytest.approx(float((-10 * mse.log10()).mean()), rel=1e-5)


# --- first-stage interface ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("channels", "factor"), [([8], 1), ([8, 8], 2), ([8, 8, 16], 4), ([8, 8, 8, 16], 8)])
def test_latent_shape_follows_the_downsampling_factor(channels, factor):
    model = VAEModel(autoencoder=AutoencoderConfig(channels=channels, latent_channels=3), image_size=16)
    images = toy_images(2)
    latents = model.encode(images)
    assert latents.shape == (2, 3, 16 // factor, 16 // factor) == (2, *model.latent_shape)
    assert model.decode(latents).shape == images.shape
    assert model.sample(3).shape == (3, 3, 16, 16)


def test_input_not_divisible_by_the_factor_is_rejected():
    with pytest.raises(ValueError, match="divisible by 4"):
        Autoencoder(AutoencoderConfig(channels=(8, 8, 8))).encode(torch.zeros(1, 3, 18, 18))
    with pytest.raises(ValueError, match="not divisible"):
        VAEModel(autoencoder=AutoencoderConfig(channels=(8, 8, 8)), image_size=18)


def test_encode_and_decode_run_in_fp32_under_bf16_autocast():
    model = tiny_model().eval()
    images = toy_images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.net.encoder(images).dtype == torch.bfloat16  # autocast is really active here
        latents = model.encode(images)
        decoded = model.decode(latents)
        sampled = model.encode(images, sample=True, generator=torch.Generator().manual_seed(0))
    assert latents.dtype == decoded.dtype == sampled.dtype == torch.float32
    assert torch.equal(latents, model.encode(images))  # bit-identical to the fp32 path: no bf16 op in between
    assert torch.equal(decoded, model.decode(latents))
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_sample_rejects_conditioning():
    model = tiny_model()
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(2, cond=["a red circle"])
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(2, guidance=3.0)
    gen = torch.Generator().manual_seed(0)
    images = model.sample(2, steps=5, sampler="ddim", generator=gen)  # the shared interface's arguments are accepted
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


# --- training -------------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_through_load_model(tmp_path):
    model = tiny_model(ema_max_decay=0.9, kl_warmup_steps=2)
    loader = torch.utils.data.DataLoader([{"image": image} for image in toy_images(8)], batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, loader)
    trainer.save_checkpoint(tmp_path / "vae.ckpt")
    loaded = load_model(tmp_path / "vae.ckpt", expected=VAEModel)  # weights-only: hparams must be plain types
    assert isinstance(loaded, VAEModel) and loaded.hparams.autoencoder == model.hparams.autoencoder
    images = toy_images(2)
    model.eval()
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert torch.equal(loaded.encode(images, use_ema=False), model.encode(images, use_ema=False))
    assert not torch.equal(loaded.encode(images), loaded.encode(images, use_ema=False))  # the EMA was saved too
    assert loaded.logvar.item() == model.logvar.item() != 0.0  # the learned σ was trained and saved


def test_loss_decreases_on_a_fixed_batch():
    model = tiny_model(lr=3e-3, warmup_steps=0, kl_warmup_steps=10, dequantize=False)
    optimizer = model.configure_optimizers()["optimizer"]
    images = toy_images(8)
    generator = torch.Generator().manual_seed(0)

    def elbo_and_mse() -> tuple[float, float]:
        with torch.no_grad():
            recon, kl, _ = model.terms(model.net, images, torch.Generator().manual_seed(1))
            mse = (model.decode(model.encode(images, use_ema=False), use_ema=False) - images).pow(2).mean()
        return (recon + kl).mean().item(), mse.item()

    elbo_before, mse_before = elbo_and_mse()
    for step in range(30):
        recon, kl, _ = model.terms(model.net, images, generator)
        loss = (recon + model.beta_at(step) * kl).mean() / images[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    elbo_after, mse_after = elbo_and_mse()
    assert model.beta_at(29) == 1.0 and model.beta_at(0) == pytest.approx(0.1)
    assert elbo_after < elbo_before - 0.3 * abs(elbo_before), (elbo_before, elbo_after)
    assert mse_after < 0.5 * mse_before, (mse_before, mse_after)  # reconstructions improved, not only σ
