"""Pretrained parts in (interop.diffusers_vae, interop.clip_text): a diffusers AutoencoderKL folder as the frozen first
stage computes what diffusers itself does, a transformers CLIPTextModel folder gives transformers' own hidden states,
and folders that cannot serve (missing file, another architecture, pickled weights) are refused naming the file.
Every folder is a tiny random model built and save_pretrained'ed inside the test; no socket may connect."""

from __future__ import annotations

import json
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from gen_lightning.interop.clip_text import CLIPTextTower  # noqa: E402
from gen_lightning.interop.folders import PretrainedFolderError  # noqa: E402
from gen_lightning.models.vae import load_first_stage  # noqa: E402
from gen_lightning.nn.autoencoder import decode_fp32, encode_fp32  # noqa: E402
from gen_lightning.nn.text_unet import TextConditionedUNet  # noqa: E402
from gen_lightning.nn.unet import UNet, UNetConfig  # noqa: E402
from tests.hf_folders import offline, sd_pipeline_root, tiny_autoencoder_kl, tiny_clip_text  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("offline")


@pytest.mark.parametrize("layout", ["sd", "flux"])
def test_autoencoder_kl_folder_encodes_and_decodes_as_diffusers(layout, tmp_path):
    folder = tiny_autoencoder_kl(tmp_path / "vae", quant_conv=layout == "sd", scaling_factor=0.5 if layout == "sd"
                                 else 0.3, shift_factor=None if layout == "sd" else 0.1)  # fmt: skip
    first_stage = load_first_stage(folder)
    kl = diffusers.AutoencoderKL.from_pretrained(str(folder)).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        theirs = kl.encode(x).latent_dist
        mode = encode_fp32(first_stage.autoencoder, x)
        assert (mode - theirs.mode()).abs().max() <= 1e-5
        drawn = encode_fp32(first_stage.autoencoder, x, sample=True, generator=torch.Generator().manual_seed(0))
        assert (drawn - theirs.sample(torch.Generator().manual_seed(0))).abs().max() <= 1e-5
        decoded = decode_fp32(first_stage.autoencoder, mode)
        assert (decoded - kl.decode(mode).sample.clamp(-1, 1)).abs().max() <= 1e-5
        with torch.autocast("cpu", torch.bfloat16):  # the first stage stays fp32 whatever the caller's precision
            under_autocast = encode_fp32(first_stage.autoencoder, x)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, mode)
    assert first_stage.scaling_factor == (0.5 if layout == "sd" else 0.3)
    assert first_stage.shift_factor == (0.0 if layout == "sd" else 0.1)
    assert first_stage.external and first_stage.downsample_factor == 2 and first_stage.latent_channels == 4
    assert first_stage.fingerprint and first_stage.fingerprint == load_first_stage(folder).fingerprint


def test_a_pipeline_root_resolves_to_its_parts(tmp_path):
    root = sd_pipeline_root(tmp_path / "sd")
    assert load_first_stage(root).autoencoder.folder == root / "vae"
    tower = CLIPTextTower(root)
    assert tower.folder == root / "text_encoder" and tower.tokenizer_folder == root / "tokenizer"
    assert CLIPTextTower(root / "text_encoder").tokenizer_folder == root / "tokenizer"


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_clip_text_hidden_states_equal_transformers(layer, tmp_path):
    root = sd_pipeline_root(tmp_path / "sd")
    tower = CLIPTextTower(root, layer)
    model = transformers.CLIPTextModel.from_pretrained(str(root / "text_encoder")).eval()
    prompts = ["red circle", "", "a caption much longer than the sixteen token context"]
    ids, lengths = tower.tokenize(prompts)
    assert ids.shape == (3, 16) and lengths[2] > 16
    assert lengths[0] == 2 + len(tower._tokenizer.tokenizer.tokenize("red circle"))
    mask = tower.padding_mask(ids)
    eos = (ids == tower.eos_token_id).int().argmax(dim=1)
    assert torch.equal(mask.sum(dim=1), eos + 1)  # real tokens: up to and including the first EOS
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        expected = out.last_hidden_state if layer == "last" else model.final_layer_norm(out.hidden_states[-2])
        hidden, pooled = tower.encode(ids)
        assert (hidden - expected).abs().max() <= 1e-6
        assert (pooled - out.pooler_output).abs().max() <= 1e-6
        # Through latent diffusion's network, which trims to the longest caption: the same states where it attends.
        unet = UNet(UNetConfig(channels=(32,), attention_levels=(), context_dim=32, cond_dim=32, num_heads=1))
        net = TextConditionedUNet(unet, tower, pooled_text=True, train_text=False)
        trimmed, trimmed_mask, trimmed_pooled = net.encode(ids)
        assert trimmed.shape[1] == int(mask.sum(dim=1).max())
        assert (trimmed - expected[:, : trimmed.shape[1]])[trimmed_mask].abs().max() <= 1e-6
        assert (trimmed_pooled - out.pooler_output).abs().max() <= 1e-6


# --- refusals ---------------------------------------------------------------------------------------------------------
def test_missing_weights_are_named(tmp_path):
    folder = tiny_autoencoder_kl(tmp_path / "vae")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(PretrainedFolderError, match=r"has no diffusion_pytorch_model\.safetensors") as err:
        load_first_stage(folder)
    assert str(folder) in str(err.value)


def test_pickled_weights_are_refused_without_unpickling(tmp_path, monkeypatch):
    folder = tiny_autoencoder_kl(tmp_path / "vae")
    weights = folder / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), folder / "diffusion_pytorch_model.bin")
    weights.unlink()

    def never(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(PretrainedFolderError, match="pickled weights, which gen_lightning refuses") as err:
        load_first_stage(folder)
    assert str(folder / "diffusion_pytorch_model.bin") in str(err.value)


def test_a_folder_of_another_architecture_is_named(tmp_path):
    unet = diffusers.UNet2DModel(block_out_channels=(32, 32), norm_num_groups=32, layers_per_block=1,
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)  # fmt: skip
    unet.save_pretrained(str(tmp_path / "unet"))
    with pytest.raises(PretrainedFolderError, match="describes a UNet2DModel, not an AutoencoderKL") as err:
        load_first_stage(tmp_path / "unet")
    assert str(tmp_path / "unet" / "config.json") in str(err.value)
    text = tiny_clip_text(tmp_path / "text_encoder")
    config = json.loads((text / "config.json").read_text())
    (text / "config.json").write_text(json.dumps({**config, "model_type": "t5", "architectures": ["T5EncoderModel"]}))
    with pytest.raises(PretrainedFolderError, match=r"describes a t5 model \(T5EncoderModel\)"):
        CLIPTextTower(text)


def test_a_missing_tokenizer_is_named(tmp_path):
    text = tiny_clip_text(tmp_path / "text_encoder")
    for path in (tmp_path / "tokenizer").iterdir():
        path.unlink()
    with pytest.raises(PretrainedFolderError, match="no CLIP tokenizer for") as err:
        CLIPTextTower(text)
    assert str(text) in str(err.value)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    """diffusers itself would fill the missing tensor with random values and only log it."""
    from safetensors.torch import load_file, save_file

    folder = tiny_autoencoder_kl(tmp_path / "vae")
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["decoder.conv_out.weight"]
    save_file(state, weights)
    with pytest.raises(PretrainedFolderError, match=r"does not fit its config\.json: missing \['decoder\.conv_out"):
        load_first_stage(folder)


def test_per_channel_latent_statistics_are_refused(tmp_path):
    folder = tiny_autoencoder_kl(tmp_path / "vae")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}))
    with pytest.raises(PretrainedFolderError, match="latents_mean/latents_std"):
        load_first_stage(folder)


def test_without_the_extra_the_error_names_it(tmp_path, monkeypatch):
    folder = tiny_autoencoder_kl(tmp_path / "vae")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(PretrainedFolderError, match=r"pip install -e '\.\[hf\]'"):
        load_first_stage(folder)


def test_penultimate_needs_a_hugging_face_tower(tiny_vae_checkpoint):
    from gen_lightning.models.latent_diffusion import LatentDiffusionModel

    with pytest.raises(ValueError, match="text_layer='penultimate' needs a Hugging Face CLIP text folder"):
        LatentDiffusionModel(vae_checkpoint=str(tiny_vae_checkpoint), text_layer="penultimate", image_size=16)


def test_a_full_clip_model_folder_serves_its_text_tower(tmp_path):
    """A transformers CLIPModel folder (vision tower and projections too): only the text tower is read, exactly."""
    from tests.hf_folders import tiny_clip_tokenizer

    vocab = json.loads((tiny_clip_tokenizer(tmp_path) / "vocab.json").read_text())
    eos = vocab["<|endoftext|>"]
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(str(tmp_path))
    tower = CLIPTextTower(tmp_path)
    ids, _ = tower.tokenize(["red circle", ""])
    with torch.no_grad():
        hidden, pooled = tower.encode(ids)
        expected = model.text_model(input_ids=ids)
    assert torch.equal(hidden, expected.last_hidden_state) and torch.equal(pooled, expected.pooler_output)
