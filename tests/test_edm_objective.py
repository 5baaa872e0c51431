"""EDM (Karras et al. 2022) as DiffusionModel's objective, and so its subclasses': the trained network is EDMPrecond
around the conditioned network (whose keywords pass through), the loss is EDMLoss, the samplers edm_euler and
edm_heun; classifier-free guidance mixes the denoiser's x0 estimates; options and samplers of the other objectives
are refused by name, and so are the parts that only know a VP schedule (diffusers export, distillation)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from gen_lightning.actions import ACTION_DIM
from gen_lightning.callbacks import SampleGrid
from gen_lightning.cli import main
from gen_lightning.data.datamodule import ShardDataModule
from gen_lightning.diffusion import EDMHeunSampler, EDMLoss, EDMPrecond, EulerSampler, gaussian_noise
from gen_lightning.errors import UserInputError
from gen_lightning.export import ExportError, export
from gen_lightning.models import DiffusionModel
from gen_lightning.models.distillation import DistilledDiffusionModel
from gen_lightning.models.loading import load_model
from gen_lightning.nn.autoencoder import decode_fp32
from gen_lightning.nn.text_unet import TextConditionedUNet
from gen_lightning.nn.unet import UNet
from gen_lightning.nn.world_unet import WorldUNet
from gen_lightning.sampler_names import EDM_SAMPLER_NAMES
from tests.conftest import WORLD_CONTEXT, WORLD_SIZE, save_checkpoint, tiny_fit_args
from tests.test_latent_diffusion import tiny_ldm
from tests.test_model_samplers import UNET, perturbed
from tests.test_world_model import tiny_world_model

DIT = {"patch_size": 2, "width": 16, "depth": 2, "num_heads": 2}


def edm_model(**kwargs) -> DiffusionModel:
    torch.manual_seed(0)
    return perturbed(DiffusionModel(unet=UNET, image_size=16, objective="edm", sample_steps=3, **kwargs))


def two_steps(model: DiffusionModel, data: ShardDataModule, root: Path) -> dict[str, float]:
    """Two training steps and one validation batch in a real Trainer; the metrics it logged."""
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def test_every_family_trains_two_steps_and_samples_with_each_edm_sampler(
    tiny_vae_checkpoint, toy_shards, toy_world, tmp_path
):
    shards = {"train": str(toy_shards), "val": str(toy_shards)}
    world_shards = {"train": str(toy_world[0]), "val": str(toy_world[1])}
    families = {
        "diffusion": (DiffusionModel(unet=UNET, image_size=16, objective="edm", sample_steps=2), UNet, shards),
        "latent diffusion": (tiny_ldm(tiny_vae_checkpoint, objective="edm"), TextConditionedUNet, shards),
        "world model": (tiny_world_model(objective="edm"), WorldUNet, world_shards),
    }
    for family, (model, inner, data_args) in families.items():
        # One network: EDMPrecond around the family's conditioned network; the EMA copies that whole module.
        assert isinstance(model.net, EDMPrecond) and isinstance(model.net.inner, inner), family
        assert model.inner_net is model.net.inner and isinstance(model.ema.shadow, EDMPrecond), family
        assert all(key.startswith(("net.inner.", "ema.shadow.inner.")) for key in model.state_dict() if "net." in key)
        assert model.hparams.sampler == "edm_heun" and isinstance(model.loss_fn, EDMLoss), family
        before = [p.detach().clone() for p in model.net.parameters()]
        size = WORLD_SIZE if family == "world model" else 16
        data = ShardDataModule(**data_args, image_size=size, batch_size=4, num_workers=0, shuffle_buffer=8)
        metrics = two_steps(model, data, tmp_path / family)
        assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"]), (family, metrics)
        assert any((p != b).any() for p, b in zip(model.net.parameters(), before, strict=True)), family
        model.ema.copy_from(model.net)  # 2 steps from a zero output layer: sample from weights that say something
        for name in EDM_SAMPLER_NAMES:
            images = model.sample(2, steps=2, sampler=name, generator=torch.Generator().manual_seed(0))
            assert images.shape == (2, 3, size, size) and torch.isfinite(images).all(), (family, name)
    # A DiT holds the same place inside EDMPrecond.
    dit = perturbed(DiffusionModel(image_size=16, backbone="dit", dit=DIT, objective="edm", sample_steps=2))
    for name in EDM_SAMPLER_NAMES:
        assert torch.isfinite(dit.sample(2, sampler=name, generator=torch.Generator().manual_seed(0))).all()


def edm_loss_by_hand(inner, x0, sigma, noise, sigma_data, cond=None, pixel_weight=None) -> torch.Tensor:
    """EDM eq. 7, table 1 and eq. 8 written out: the inner network gets c_in y and 1000 ln(sigma) / 4."""
    s = sigma.reshape(-1, 1, 1, 1)
    y = x0 + s * noise
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    c_in = 1 / (s**2 + sigma_data**2).sqrt()
    denoised = c_skip * y + c_out * inner(c_in * y, 250 * sigma.log(), **(cond or {}))
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    squared = (denoised - x0).pow(2) * (1 if pixel_weight is None else pixel_weight)
    return (weight * squared).mean(dim=(1, 2, 3)).mean()


def draws(n: int, shape: tuple[int, ...], seed: int, p_mean: float = -1.2, p_std: float = 1.2):
    """What EDMLoss draws from a generator of this seed: ln sigma ~ N(p_mean, p_std^2), then the noise."""
    generator = torch.Generator().manual_seed(seed)
    sigma = (p_mean + p_std * torch.randn(n, generator=generator)).exp()
    return sigma, torch.randn((n, *shape), generator=generator)


def test_the_loss_is_edm_loss_by_hand_on_the_same_draws():
    model = edm_model(p_mean=-0.5, p_std=0.8)
    x0 = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    sigma, noise = draws(3, (3, 16, 16), seed=7, p_mean=-0.5, p_std=0.8)
    with torch.no_grad():
        drawn = model.loss_fn(model.net, x0, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(drawn, edm_loss_by_hand(model.inner_net, x0, sigma, noise, 0.5))
    loss = model.loss_fn(model.net, x0)  # what training_step computes: a scalar with a gradient for the UNet
    loss.backward()
    assert loss.ndim == 0 and model.inner_net.out_conv.weight.grad.abs().sum() > 0
    # The world model: its conditioning reaches WorldUNet through EDMPrecond, its pixel weights weigh the error.
    world = perturbed(tiny_world_model(objective="edm", change_weight=4.0, sigma_data=0.3))
    frames = torch.rand(2, WORLD_CONTEXT, 3, WORLD_SIZE, WORLD_SIZE) * 2 - 1
    image = frames[:, -1].clone()
    image[:, :, 2:6, 2:6] = 1.0  # a change from the newest context frame, so the weights are not all 1
    batch = {"frames": frames, "action": torch.rand(2, ACTION_DIM), "image": image}
    cond, weight = world.condition(batch, training=False), world.pixel_weight(batch)
    assert weight is not None and weight.std() > 0
    x0 = world.diffusion_input(batch)
    sigma, noise = draws(2, tuple(x0.shape[1:]), seed=3)
    with torch.no_grad():
        drawn = world.loss_fn(world.net, x0, generator=torch.Generator().manual_seed(3), pixel_weight=weight,
                              extra_args=cond)  # fmt: skip
        by_hand = edm_loss_by_hand(world.inner_net, x0, sigma, noise, 0.3, cond, weight)
    torch.testing.assert_close(drawn, by_hand)


def test_sigma_data_defaults_to_the_data_scale_of_each_family(tiny_vae_checkpoint):
    pixel, latent = edm_model(), tiny_ldm(tiny_vae_checkpoint, objective="edm")
    assert pixel.hparams.sigma_data == pixel.net.sigma_data == pixel.loss_fn.sigma_data == 0.5  # images in [-1, 1]
    assert latent.hparams.sigma_data == latent.net.sigma_data == latent.loss_fn.sigma_data == 1.0  # unit variance
    assert edm_model(sigma_data=0.25).net.sigma_data == 0.25
    assert edm_model(sigma_min=0.01, sigma_max=20.0, rho=5.0).sampling_defaults() == {
        "sampler": "edm_heun", "steps": 3, "sigma_min": 0.01, "sigma_max": 20.0, "rho": 5.0,
    }  # fmt: skip
    sampler = edm_model(sigma_min=0.01, sigma_max=20.0, rho=5.0).make_sampler()
    assert isinstance(sampler, EDMHeunSampler) and (sampler.sigma_min, sampler.sigma_max, sampler.rho) == (0.01, 20, 5)


def test_a_guided_latent_edm_sample_is_the_hand_written_cfg_heun_loop(tiny_vae_checkpoint):
    """CFG mixes the denoiser's x0 estimates, D = D_u + w (D_c - D_u); the ODE slope (x - D) / sigma is affine in D,
    so this is the same guidance as mixing eps or the score (k-diffusion's CFGDenoiser guides denoised outputs too)."""
    model = perturbed(tiny_ldm(tiny_vae_checkpoint, objective="edm", latent_scale=1.0, sample_steps=3))
    prompts, weight, steps = ["red circle", "sun"], 3.0, 3
    drawn = model.sample(2, prompts, guidance=weight, sampler="edm_heun", generator=torch.Generator().manual_seed(0))
    plain = model.sample(2, prompts, guidance=1.0, sampler="edm_heun", generator=torch.Generator().manual_seed(0))
    assert (drawn - plain).abs().max() > 1e-3
    with model.evaluating(), torch.no_grad():
        denoiser = model.ema.shadow  # EDMPrecond(TextConditionedUNet), called once per branch
        hidden, mask, pooled = denoiser.inner.encode(model.tokenize([*prompts, ""]))
        cond = (hidden[:-1], mask[:-1], pooled[:-1])
        uncond = tuple(part[-1:].expand(2, *part.shape[1:]) for part in (hidden, mask, pooled))

        def guided(x: torch.Tensor, sigma: float) -> torch.Tensor:
            s = torch.full((2,), sigma)
            conditional, unconditional = denoiser(x, s, context=cond), denoiser(x, s, context=uncond)
            return unconditional + weight * (conditional - unconditional)

        ramp = [i / (steps - 1) for i in range(steps)]
        sigmas = [(80 ** (1 / 7) + r * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for r in ramp] + [0.0]
        x = 80 * gaussian_noise((2, *model.sample_shape), torch.Generator().manual_seed(0))
        for sigma, sigma_next in itertools.pairwise(sigmas):
            slope = (x - guided(x, sigma)) / sigma
            euler = x + (sigma_next - sigma) * slope
            if sigma_next > 0:  # Heun's correction (EDM Algorithm 1), not in the step to sigma = 0
                euler = x + (sigma_next - sigma) * (slope + (euler - guided(euler, sigma_next)) / sigma_next) / 2
            x = euler
        by_hand = decode_fp32(model.vae, x / model.latent_scale + model.latent_shift)
    torch.testing.assert_close(drawn, by_hand, rtol=1e-4, atol=1e-4)


def test_options_and_samplers_of_other_objectives_are_refused_by_name(tmp_path):
    with pytest.raises(UserInputError, match=r"model.p_mean=-1.0 is an option of model.objective='edm'.*'vp'"):
        DiffusionModel(unet=UNET, p_mean=-1.0)
    with pytest.raises(UserInputError, match=r"model.sigma_data=0.5 is an option of model.objective='edm'.*'flow'"):
        DiffusionModel(unet=UNET, objective="flow", sigma_data=0.5)
    with pytest.raises(UserInputError, match=r"model.prediction_type='v' is an option of model.objective='vp'"):
        DiffusionModel(unet=UNET, objective="edm", prediction_type="v")
    with pytest.raises(UserInputError, match=r"model.time_shift=3.0 is an option of model.objective='flow'"):
        DiffusionModel(unet=UNET, objective="edm", time_shift=3.0)
    with pytest.raises(UserInputError, match=r"model.objective='score': expected one of vp, flow, edm"):
        DiffusionModel(unet=UNET, objective="score")
    with pytest.raises(ValueError, match=r"sigma_data.*must be > 0"):
        DiffusionModel(unet=UNET, objective="edm", sigma_data=0.0)
    with pytest.raises(UserInputError, match=r"sampler 'ddim' integrates model.objective='vp'.*valid: edm_euler"):
        DiffusionModel(unet=UNET, objective="edm", sampler="ddim")
    edm, vp = edm_model(), DiffusionModel(unet=UNET, image_size=16)
    with pytest.raises(UserInputError, match=r"sampler 'edm_heun' integrates model.objective='edm'"):
        vp.sample(1, sampler="edm_heun")
    with pytest.raises(UserInputError, match=r"sampler 'flow_euler' integrates model.objective='flow'"):
        edm.sample(1, sampler="flow_euler")
    with pytest.raises(UserInputError, match=r"EulerSampler samples model.objective='vp'"):
        edm.sample(1, sampler=EulerSampler(vp.schedule))
    with pytest.raises(UserInputError, match=r"EDMHeunSampler samples model.objective='edm'"):
        vp.sample(1, sampler=EDMHeunSampler())
    with pytest.raises(UserInputError, match=r"eta is DDIM's noise scale"):
        edm.make_sampler("edm_euler", eta=0.5)
    with pytest.raises(UserInputError, match=r"model.objective='edm'"):
        SampleGrid(sampler="dpm++").on_fit_start(None, edm)  # a callback's sampler is checked when the fit starts
    with pytest.raises(UserInputError, match=r"sampler 'edm_euler' integrates model.objective='edm'"):
        SampleGrid(sampler="edm_euler").on_fit_start(None, vp)
    # Distillation steps a VP schedule: an edm teacher is refused by name.
    teacher = DiffusionModel(unet={"channels": [8], "attention_levels": []}, image_size=8, objective="edm")
    with pytest.raises(UserInputError, match="objective='edm'"):
        DistilledDiffusionModel(str(save_checkpoint(teacher, tmp_path / "edm.ckpt")))


def test_a_tiny_edm_fit_through_the_cli_samples_exports_and_reloads(toy_shards, tmp_path, capsys):
    main(
        [
            "fit",
            *tiny_fit_args(toy_shards, tmp_path, config="configs/edm_unet_emoji.yaml"),
            "--model.init_args.objective=edm",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.callbacks.every_n_steps=2",
            "--trainer.callbacks.num_samples=2",
            "--trainer.callbacks.steps=2",
            "--trainer.callbacks.sampler=edm_euler",
        ]
    )
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["hyper_parameters"]["objective"] == "edm" and state["hyper_parameters"]["sigma_data"] == 0.5
    weights = [key for key in state["state_dict"] if key.startswith(("net.", "ema.shadow."))]
    assert weights and all(key.startswith(("net.inner.", "ema.shadow.inner.")) for key in weights)
    model = load_model(ckpt)
    assert isinstance(model.net, EDMPrecond) and model.hparams.sampler == "edm_heun"
    for name in EDM_SAMPLER_NAMES:
        main(["sample", f"--ckpt={ckpt}", "--sampler", name, "--steps=2", "--n=2", "--seed=1",
              f"--out={tmp_path / name}.png"])  # fmt: skip
        assert (tmp_path / f"{name}.png").is_file()
    with pytest.raises(UserInputError, match=r"sampler 'ddim' integrates model.objective='vp'"):
        main(["sample", f"--ckpt={ckpt}", "--sampler", "ddim", f"--out={tmp_path / 'x.png'}"])
    # The export holds EDMPrecond's keys; reloaded, it samples what the checkpoint samples.
    export(ckpt, tmp_path / "exported")
    exported = load_model(tmp_path / "exported")
    seeded = lambda: {"steps": 2, "generator": torch.Generator().manual_seed(0)}  # noqa: E731
    torch.testing.assert_close(exported.sample(2, **seeded()), model.sample(2, **seeded()), rtol=0, atol=0)
    with pytest.raises(ExportError, match=r"model.objective='edm'.*DDIMPipeline samples the vp objective"):
        export(ckpt, tmp_path / "diffusers", fmt="diffusers")


def test_a_vp_recipe_switched_to_edm_names_the_vp_option_left_set(toy_shards, tmp_path):
    # LightningCLI reports the model's UserInputError inside its own ValueError (the config did not validate).
    with pytest.raises(ValueError, match=r"model.schedule='cosine' is an option of model.objective='vp'"):
        main(["fit", *tiny_fit_args(toy_shards, tmp_path), "--model.init_args.objective=edm", "--trainer.max_steps=1"])


def test_referenced_text_tower_stays_out_of_an_edm_checkpoint_under_its_inner_prefix(tmp_path, tiny_vae_checkpoint):
    """The storage rule of Hugging Face parts holds under EDMPrecond: the CLIP tower's weights (net.inner.text.*,
    ema.shadow.inner.text.*) are referenced, not saved, and refilled from the folder on load."""
    pytest.importorskip("transformers")
    from tests.hf_folders import tiny_clip_text

    folder = tiny_clip_text(tmp_path / "text_encoder")
    model = tiny_ldm(tiny_vae_checkpoint, clip_checkpoint=str(folder), text=None, objective="edm", latent_scale=1.0)
    assert model.external_state_prefixes() == ("net.inner.text.", "ema.shadow.inner.text.")
    tower = [key for key in model.state_dict() if ".text." in key]
    assert tower and all(key.startswith(model.external_state_prefixes()) for key in tower)
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)  # what Lightning calls when it saves
    torch.save(checkpoint, tmp_path / "ldm.ckpt")
    saved = checkpoint["state_dict"]
    assert not [key for key in saved if ".text." in key] and any(k.startswith("net.inner.unet.") for k in saved)
    rebuilt = load_model(tmp_path / "ldm.ckpt")
    seeded = lambda: {"steps": 2, "generator": torch.Generator().manual_seed(0)}  # noqa: E731
    torch.testing.assert_close(rebuilt.sample(2, ["sun"], **seeded()), model.sample(2, ["sun"], **seeded()))
