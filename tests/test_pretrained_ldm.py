"""Latent diffusion on Stable Diffusion's parts from a local folder (a tiny random pipeline root: vae/, text_encoder/,
tokenizer/): a 2-step fit, `sample --prompt`, `shards encode` with that VAE, a resume on those latents, and the
storage rule (the folder's weights are referenced by path and sha256, not copied into checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from gen_lightning.cli import main
from gen_lightning.data.shard_writer import read_manifest
from gen_lightning.models.latent_diffusion import LatentDiffusionModel
from gen_lightning.models.loading import load_model
from tests.conftest import toy_data_args
from tests.hf_folders import offline, sd_pipeline_root  # noqa: F401

pytestmark = [pytest.mark.usefixtures("offline"), pytest.mark.slow]


def pretrained_ldm_args(shards, root, run) -> list[str]:
    return [
        *toy_data_args(shards, run, "configs/ldm_emoji.yaml"),
        f"--model.init_args.vae_checkpoint={root}",
        f"--model.init_args.clip_checkpoint={root}",
        "--model.init_args.text=null",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.callbacks=[]",
        "--model.init_args.unet.channels=[32]",
        "--model.init_args.unet.attention_levels=[0]",
        "--model.init_args.unet.num_heads=1",
        "--model.init_args.sample_steps=2",
    ]


def test_two_step_fit_with_pretrained_parts_then_sample(toy_shards, tmp_path, capsys):
    root = sd_pipeline_root(tmp_path / "sd")
    main(["fit", *pretrained_ldm_args(toy_shards, root, tmp_path / "run"), "--trainer.max_steps=2"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    hparams, state = checkpoint["hyper_parameters"], checkpoint["state_dict"]
    assert float(state["latent_scale"]) == 0.5  # the folder's scaling_factor, not a measured one
    assert not [k for k in state if k.startswith(("vae.", "net.text.", "ema.shadow.text."))]
    assert hparams["vae_sha256"] and hparams["text_sha256"] and hparams["text"] is None
    assert hparams["vae_checkpoint"] == str(root.resolve())

    out = tmp_path / "grid.png"
    main(["sample", f"--ckpt={last}", "--prompt=red circle", "--n=2", "--steps=2", f"--out={out}"])
    assert "2 samples" in capsys.readouterr().out
    with Image.open(out) as grid:
        assert grid.size == (2 * 16 + 3 * 2, 16 + 2 * 2)

    latents = tmp_path / "latents"
    main(["shards", "encode", f"--vae={root}", f"--data={toy_shards}", f"--out={latents}", "--image-size=16"])
    assert "latent.npy" in read_manifest(latents)["fields"]
    first = next((latents).glob("train-*.tar"))
    import tarfile

    with tarfile.open(first) as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    assert meta["latent"]["vae_sha256"] == hparams["vae_sha256"] and meta["latent"]["shape"] == [4, 8, 8]

    # Resume on those latents: the referenced weights are refilled, so Lightning's strict load finds every key.
    args = pretrained_ldm_args(latents, root, tmp_path / "run")
    main(["fit", *args, f"--ckpt_path={last}", "--trainer.max_steps=3"])
    assert torch.load(last, weights_only=True)["global_step"] == 3

    # A folder whose weights changed since training is refused, naming it.
    weights = root / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    changed = load_file(weights)
    changed["decoder.conv_out.bias"] = changed["decoder.conv_out.bias"] + 1
    save_file(changed, weights)
    with pytest.raises(ValueError, match=r"trained with the VAE folder .*which now holds sha256"):
        load_model(last, LatentDiffusionModel)
