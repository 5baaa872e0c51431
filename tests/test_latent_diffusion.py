"""Latent text-to-image diffusion: frozen first stage, latent scale, caption dropout, CFG through the model, a
checkpoint that stands alone, the frozen CLIP text tower, and the sample CLI with prompts."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from gen_lightning.cli import main
from gen_lightning.data.datamodule import ShardDataModule
from gen_lightning.data.shard_writer import read_manifest
from gen_lightning.models.clip import CLIPModel, load_clip
from gen_lightning.models.diffusion import DiffusionModel
from gen_lightning.models.latent_diffusion import LatentDiffusionModel
from gen_lightning.models.loading import load_model
from gen_lightning.models.vae import VAEModel
from gen_lightning.nn.layers import SpatialAttention
from gen_lightning.nn.text import TextConfig, TextEncoder
from gen_lightning.nn.text_unet import TextConditionedUNet
from gen_lightning.nn.unet import UNet
from gen_lightning.nn.vision import VisionConfig
from tests.conftest import save_checkpoint, toy_data_args
from tests.wandb_reader import history

TINY_UNET = {"channels": [16, 16], "attention_levels": [1], "num_heads": 2}
TINY_TEXT = TextConfig(context_length=16, width=16, layers=1, heads=2)


def tiny_ldm(vae_checkpoint, **kwargs) -> LatentDiffusionModel:
    torch.manual_seed(0)
    defaults = {"unet": TINY_UNET, "text": TINY_TEXT, "image_size": 16, "sample_steps": 3, "warmup_steps": 1}
    return LatentDiffusionModel(vae_checkpoint=str(vae_checkpoint), **{**defaults, **kwargs})


def test_unet_runs_in_the_vae_latent_space_with_text_cross_attention(tiny_vae_checkpoint):
    model = tiny_ldm(tiny_vae_checkpoint)
    assert model.sample_shape == (4, 8, 8)  # 16 px / f=2, 4 latent channels
    assert model.net.unet.config.in_channels == 4 and model.net.unet.config.context_dim == 16
    assert not any(p.requires_grad for p in model.vae.parameters())
    groups = model.configure_optimizers()["optimizer"].param_groups
    optimized = [p for group in groups for p in group["params"]]
    assert {id(p) for p in optimized}.isdisjoint(id(p) for p in model.vae.parameters())
    # One network, trained whole (the small text transformer too), in the order format-1 checkpoints stored it
    assert [id(p) for p in optimized] == [id(p) for p in [*model.net.unet.parameters(), *model.net.text.parameters()]]


def test_pooled_caption_state_reaches_the_time_embedding(tiny_vae_checkpoint):
    """pooled_text: the EOT token's hidden state of each caption is the UNet's per-sample cond embedding (added to the
    time embedding), so the prediction depends on the caption even with the cross-attention outputs zeroed."""
    model = tiny_ldm(tiny_vae_checkpoint).eval()
    net = model.net
    assert net.unet.cond_proj is not None and net.unet.cond_proj.in_features == 16
    seen: list[torch.Tensor] = []
    net.unet.cond_proj.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    captions = ["red heart", "blue cat face"]
    x, t = torch.randn(2, *model.sample_shape), torch.tensor([500, 500])
    net(x, t, **model.condition({"caption": captions}, training=False))
    tokens, _ = net.text.tokenize(captions)
    expected = net.text(tokens)[torch.arange(2), torch.tensor([len("red heart"), len(captions[1])]) + 1]
    torch.testing.assert_close(seen[0], expected)
    with torch.no_grad():
        for p in net.unet.parameters():  # zero-initialised output layers would hide any input: wake them
            if not p.any():
                p.normal_(std=0.1)
        for module in net.unet.modules():  # then silence the text's other path; the pooled state must still steer
            if isinstance(module, SpatialAttention) and module.cross_attn is not None:
                module.cross_attn.out.weight.zero_()
    outputs = [net(x, t, **model.condition({"caption": [c] * 2}, training=False)) for c in captions]
    assert not torch.allclose(outputs[0], outputs[1])
    assert tiny_ldm(tiny_vae_checkpoint, pooled_text=False).net.unet.cond_proj is None


def test_checkpoint_from_before_pooled_text_loads_without_it(tiny_vae_checkpoint, tmp_path):
    """A checkpoint whose hyper-parameters predate `pooled_text` was trained without it and must load as such."""
    old = tiny_ldm(tiny_vae_checkpoint, pooled_text=False)
    old._hparams.pop("pooled_text")
    path = save_checkpoint(old, tmp_path / "old.ckpt")
    loaded = load_model(path)
    assert loaded.net.unet.cond_proj is None and loaded.hparams.pooled_text is False
    torch.testing.assert_close(loaded.state_dict(), old.state_dict(), equal_nan=True)  # latent_scale: not yet set
    assert load_model(save_checkpoint(tiny_ldm(tiny_vae_checkpoint), tmp_path / "new.ckpt")).hparams.pooled_text


def test_captions_are_encoded_only_as_long_as_the_longest_one(tiny_vae_checkpoint):
    """The padding is trimmed to the batch's longest caption; the states of real tokens and the pooled state are the
    ones the full context gives (causal encoder)."""
    model = tiny_ldm(tiny_vae_checkpoint).eval()
    captions = ["cat", "red heart"]
    tokens, _ = model.net.tokenize(captions)
    hidden, mask, pooled = model.net.encode(tokens)
    assert hidden.shape[1] == mask.shape[1] == len("red heart") + 2  # SOT, bytes, EOT
    full = model.net.text(tokens)
    assert tokens.shape[1] == 16 > hidden.shape[1]
    torch.testing.assert_close(hidden[mask], full[:, : hidden.shape[1]][mask])
    torch.testing.assert_close(pooled, full[torch.arange(2), torch.tensor([4, 10])])


def test_caption_dropout_rate_in_training_mode_only():
    """The network drops captions itself (DiT's token_drop): the empty caption's tokens at the configured rate in
    training mode, none in eval mode (validation, sampling), and exactly the rows asked for when told which."""
    torch.manual_seed(0)
    text = TextEncoder(TINY_TEXT)
    net = TextConditionedUNet(UNet({**TINY_UNET, "context_dim": 16}), text, pooled_text=False, caption_dropout=0.25)
    tokens = net.tokenize(["a cat"] * 4000)[0]
    empty = net.tokenize([""])[0]
    out = net.token_drop(tokens)
    dropped = (out == empty).all(dim=1)
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert torch.equal(out[~dropped], tokens[~dropped])  # the others are left as they were
    assert torch.equal(net.eval().token_drop(tokens), tokens)
    forced = torch.tensor([True, False, True, False])
    assert torch.equal((net.token_drop(tokens[:4], forced) == empty).all(dim=1), forced)


def test_latent_scale_is_estimated_once_from_data(tiny_vae_checkpoint):
    model = tiny_ldm(tiny_vae_checkpoint)
    assert math.isnan(model.latent_scale.item())
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    latents = model.diffusion_input({"image": images, "caption": ["x"] * 6})
    assert latents.std().item() == pytest.approx(1.0, rel=0.05)  # population std of this very batch
    scale = model.latent_scale.item()
    model.diffusion_input({"image": images * 0.1, "caption": ["x"] * 6})
    assert model.latent_scale.item() == scale  # fixed after the first batch
    given = tiny_ldm(tiny_vae_checkpoint, latent_scale=0.5)
    assert given.latent_scale.item() == 0.5


def test_guidance_zero_is_the_unconditional_sample_and_checkpoint_stands_alone(tiny_vae_checkpoint, tmp_path):
    model = tiny_ldm(tiny_vae_checkpoint, latent_scale=1.0)
    with torch.no_grad():  # make the text matter: an untrained UNet's cross-attention output is zero-initialised
        for p in model.net.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.ema.copy_from(model.net)

    def draw(**kwargs) -> torch.Tensor:
        return model.sample(2, steps=3, generator=torch.Generator().manual_seed(0), **kwargs)

    unconditional = draw(cond=["", ""], guidance=1.0)
    torch.testing.assert_close(draw(cond=["red apple", "sun"], guidance=0.0), unconditional, atol=1e-5, rtol=1e-4)
    conditional = draw(cond=["red apple", "sun"], guidance=1.0)
    assert (conditional - unconditional).abs().max() > 1e-3  # the prompt changes the image
    guided = draw(cond=["red apple", "sun"], guidance=3.0)
    assert (guided - conditional).abs().max() > 1e-3
    assert conditional.shape == (2, 3, 16, 16) and conditional.abs().max() <= 1

    # The checkpoint carries the VAE: it loads after the first-stage file is gone, and samples the same.
    vae_copy = tmp_path / "vae.ckpt"
    vae_copy.write_bytes(tiny_vae_checkpoint.read_bytes())
    model.hparams["vae_checkpoint"] = str(vae_copy)
    path = save_checkpoint(model, tmp_path / "ldm.ckpt")
    vae_copy.unlink()
    reloaded = load_model(path, expected=LatentDiffusionModel)
    torch.testing.assert_close(
        reloaded.sample(2, cond=["red apple", "sun"], steps=3, generator=torch.Generator().manual_seed(0)), guided
    )


def test_latents_are_not_clipped_to_the_pixel_range(tiny_vae_checkpoint):
    """Scaled latents have unit variance, not a [-1, 1] range: the last DDIM step must return a predicted latent of 3
    as it is, where the pixel model clips it to 1."""
    model = tiny_ldm(tiny_vae_checkpoint, latent_scale=1.0)
    pixels = DiffusionModel(unet=TINY_UNET, image_size=16)
    for sampler, bound in ((model.make_sampler("ddim"), 3.0), (pixels.make_sampler("ddim"), 1.0)):
        sampler.set_timesteps(5)
        t = int(sampler.timesteps[-1])
        ab = float(sampler.schedule.alphas_cumprod[t])
        x_t = torch.randn(2, 4, 8, 8)
        eps = (x_t - ab**0.5 * 3.0) / (1 - ab) ** 0.5  # the prediction whose x0 is 3 everywhere
        torch.testing.assert_close(sampler.step(eps, t, x_t), torch.full_like(x_t, bound))
    assert model.hparams.clip_sample is None and pixels.hparams.clip_sample == 1.0


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    clip = CLIPModel(
        vision=VisionConfig(width=16, layers=1, heads=2),
        text=TextConfig(context_length=16, width=24, layers=1, heads=2),
        embed_dim=8,
        image_size=16,
    )
    return save_checkpoint(clip, tmp_path_factory.mktemp("clip") / "clip.ckpt")


@pytest.mark.parametrize("text", [None, TINY_TEXT], ids=["text=null", "config's text block"])
def test_frozen_clip_text_tower(text, tiny_vae_checkpoint, tiny_clip_checkpoint, tmp_path, caplog):
    clip = load_clip(tiny_clip_checkpoint)
    clip_copy = tmp_path / "clip.ckpt"
    clip_copy.write_bytes(tiny_clip_checkpoint.read_bytes())
    with caplog.at_level(logging.WARNING, logger="gen_lightning.models.latent_diffusion"):
        model = tiny_ldm(tiny_vae_checkpoint, text=text, clip_checkpoint=str(clip_copy), latent_scale=1.0)
    # A `text:` block (configs/ldm_emoji.yaml has one) must not turn the tower into a frozen random encoder.
    assert ("text is ignored" in caplog.text) == (text is not None)
    assert model.net.unet.config.context_dim == 24 and model.hparams.text_from_clip
    assert not any(p.requires_grad for p in model.net.text.parameters())
    torch.testing.assert_close(model.net.text.state_dict(), clip.text.state_dict())
    groups = model.configure_optimizers()["optimizer"].param_groups
    optimized = {id(p) for group in groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in model.net.text.parameters())  # not optimised
    torch.testing.assert_close(model.ema.shadow.text.state_dict(), clip.text.state_dict())  # the EMA's equal copy
    model.train()
    assert not model.net.text.training and not model.vae.training

    # The checkpoint carries the tower: it rebuilds with the CLIP file gone.
    path = save_checkpoint(model, tmp_path / "ldm.ckpt")
    clip_copy.unlink()
    reloaded = load_model(path, expected=LatentDiffusionModel)
    torch.testing.assert_close(reloaded.net.text.state_dict(), clip.text.state_dict())
    assert not any(p.requires_grad for p in reloaded.net.text.parameters())


def tiny_ldm_args(shards: Path, vae_checkpoint: Path, root: Path) -> list[str]:
    """configs/ldm_emoji.yaml shrunk to seconds on toy shards, without its sample-grid callback."""
    return [
        *toy_data_args(shards, root, "configs/ldm_emoji.yaml"),
        f"--model.init_args.vae_checkpoint={vae_checkpoint}",
        "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=1",
        "--trainer.callbacks=[]",
        "--model.init_args.unet.channels=[16, 16]",
        "--model.init_args.unet.num_heads=2",
        "--model.init_args.text.width=16",
        "--model.init_args.text.layers=1",
        "--model.init_args.text.heads=2",
    ]


def test_fit_then_sample_cli_with_prompts(toy_shards, tiny_vae_checkpoint, tmp_path, capsys):
    main(["fit", *tiny_ldm_args(toy_shards, tiny_vae_checkpoint, tmp_path), "--trainer.max_steps=4"])
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    # the first stage keeps its own hyper-parameters (LightningCLI's argument context must not leak into it)
    vae_config = torch.load(checkpoint, weights_only=True)["hyper_parameters"]["vae_config"]
    assert "autoencoder" in vae_config and "vae_checkpoint" not in vae_config
    out = tmp_path / "grid.png"
    args = ["sample", f"--ckpt={checkpoint}", "--prompt=red circle", "--prompt=blue square", "--n=3"]
    main([*args, "--guidance=3", "--steps=2", f"--out={out}"])
    assert "rows: 'red circle', 'blue square'" in capsys.readouterr().out
    with Image.open(out) as grid:  # 2 rows of 3 images of 16 px with 2 px padding
        assert grid.size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)
    with pytest.raises(SystemExit):
        main(["sample", f"--ckpt={tiny_vae_checkpoint}", "--prompt=red", f"--out={out}"])


@pytest.mark.parametrize("with_clip", [True, False])
def test_evaluation_callback_clip_score_on_val_captions(
    with_clip, toy_shards, tiny_vae_checkpoint, tiny_clip_checkpoint, tmp_path, caplog
):
    clip_args = [f"--trainer.callbacks.clip={tiny_clip_checkpoint}"] if with_clip else []
    with caplog.at_level(logging.INFO, logger="gen_lightning"):
        main(
            [
                "fit",
                *tiny_ldm_args(toy_shards, tiny_vae_checkpoint, tmp_path),
                "--trainer.max_steps=2",
                "--trainer.log_every_n_steps=1",
                "--trainer.callbacks+=gen_lightning.callbacks.GenerativeEvaluation",
                "--trainer.callbacks.num_samples=4",
                "--trainer.callbacks.steps=2",
                "--trainer.callbacks.max_real=8",
                f"--trainer.callbacks.cache_dir={tmp_path / 'fid_cache'}",
                *clip_args,
            ]
        )
    rows = history(next(tmp_path.glob("wandb/offline-run-*")))
    logged = {k: v for row in rows for k, v in row.items()}
    assert "val/fid" in logged
    skipped = [r for r in caplog.records if "CLIP score skipped: no CLIP configured" in r.getMessage()]
    if with_clip:
        assert 0.0 <= logged["val/clip_score"] <= 100.0 and not skipped
    else:
        assert "val/clip_score" not in logged and len(skipped) == 1


def test_evaluate_cli_reports_clip_score(toy_shards, tiny_vae_checkpoint, tiny_clip_checkpoint, tmp_path, capsys):
    main(["fit", *tiny_ldm_args(toy_shards, tiny_vae_checkpoint, tmp_path), "--trainer.max_steps=2"])
    report_path = tmp_path / "report.json"
    main(
        [
            "evaluate",
            f"--ckpt={tmp_path / 'checkpoints' / 'last.ckpt'}",
            f"--data={toy_shards}",
            "--num-samples=4",
            "--max-real=8",
            "--steps=2",
            "--num-workers=0",
            f"--clip={tiny_clip_checkpoint}",
            f"--cache-dir={tmp_path / 'fid_cache'}",
            f"--out={report_path}",
        ]
    )
    report = json.loads(report_path.read_text())
    assert 0.0 <= report["clip_score"] <= 100.0 and report["clip"] == str(tiny_clip_checkpoint)
    assert report["guidance"] == 3.0 and report["num_samples"] == 4


def test_pre_encoded_latent_shards_train_and_refuse_another_vae(toy_shards, tiny_vae_checkpoint, tmp_path):
    latent_dir = tmp_path / "latents"
    main(["shards", "encode", f"--vae={tiny_vae_checkpoint}", f"--data={toy_shards}", f"--out={latent_dir}"])
    source, encoded = read_manifest(toy_shards), read_manifest(latent_dir)
    for split in ("train", "val"):  # same keys, so the same split
        assert encoded["splits"][split]["num_samples"] == source["splits"][split]["num_samples"]
    assert "latent.npy" in encoded["fields"]

    data = ShardDataModule(val=str(latent_dir), image_size=16, batch_size=4, num_workers=0)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    vae = load_model(tiny_vae_checkpoint)
    torch.testing.assert_close(batch["latent"], vae.encode(batch["image"]), atol=1e-5, rtol=1e-4)

    model = tiny_ldm(tiny_vae_checkpoint, latent_scale=1.0)
    torch.testing.assert_close(model.diffusion_input(batch), batch["latent"])
    torch.manual_seed(1)
    other_vae = save_checkpoint(VAEModel(autoencoder=vae.hparams.autoencoder, image_size=16), tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=f"sample {batch['__key__'][0]}: its latent.npy was encoded by VAE"):
        tiny_ldm(other_vae, latent_scale=1.0).diffusion_input(batch)

    main(["fit", *tiny_ldm_args(latent_dir, tiny_vae_checkpoint, tmp_path / "run"), "--trainer.max_steps=2"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
