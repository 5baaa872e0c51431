"""A local Hugging Face CLIP directory as the CLIP score's encoder: a tiny random CLIP written by save_pretrained,
loaded offline (no socket may connect), scored against transformers itself; plus the errors and the file branch."""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from gen_lightning.evaluation.encoders import EncoderPathError, load_text_image_encoder  # noqa: E402
from gen_lightning.metrics.clip_score import CLIPScore, TextImageEncoder  # noqa: E402
from gen_lightning.metrics.hf_clip import HuggingFaceCLIP, HuggingFaceCLIPError, _import_transformers  # noqa: E402
from tests.conftest import save_checkpoint  # noqa: E402

CONTEXT = 12  # "blue square" fits (BOS + 10 + EOS), the long caption does not
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not OpenAI's: proves preprocessor_config.json is what is read


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory) -> Path:
    """A random CLIP (hidden 32, 2 layers, 32×32 images) with a lower-case-letters BPE tokenizer, as save_pretrained
    writes it."""
    path = tmp_path_factory.mktemp("hf_clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {c: i + 2 for i, c in enumerate(letters)}
    vocab |= {c + "</w>": i + 2 + len(letters) for i, c in enumerate(letters)}
    vocab |= {"re": len(vocab), "red</w>": len(vocab) + 1}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    transformers.CLIPTokenizer.from_pretrained(str(path)).save_pretrained(str(path))
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": CONTEXT,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    transformers.CLIPModel(config).save_pretrained(str(path))
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": MEAN,
        "image_std": STD,
        "do_convert_rgb": True,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Loading must need no network: the hub is told so, and any socket connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def smooth_images(n: int, height: int, width: int) -> torch.Tensor:
    """Low-frequency float [-1, 1] images: resampling filters agree on them up to rounding, unlike on noise."""
    y = torch.linspace(0, 1, height).view(1, 1, -1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, 1, -1)
    phase = torch.rand(n, 3, 1, 1) * 6.28
    return (torch.sin(3 * x + 2 * y + phase) * torch.cos(2 * x - y + phase)).clamp(-1, 1)


def test_clip_score_over_hf_directory_matches_transformers(hf_clip_dir, caplog):
    encoder = load_text_image_encoder(hf_clip_dir)
    assert isinstance(encoder, HuggingFaceCLIP) and isinstance(encoder, TextImageEncoder)
    assert encoder.context_length == CONTEXT and not any(p.requires_grad for p in encoder.parameters())
    images = smooth_images(3, 48, 40)  # not square and not 32: shortest side resized to 32, then center-cropped
    captions = ["red circle", "blue square", "a very long caption about a red circle"]
    metric = CLIPScore(encoder)
    with caplog.at_level(logging.WARNING, logger="gen_lightning"):
        metric.update(images[:2], captions[:2])
        metric.update(images[2:], captions[2:])

    model = transformers.CLIPModel.from_pretrained(str(hf_clip_dir), local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_clip_dir), local_files_only=True)
    ids = tokenizer(captions, truncation=True, max_length=CONTEXT, padding="max_length", return_tensors="pt")
    assert ids["input_ids"][2, -1] == tokenizer.eos_token_id  # truncation keeps the EOS the text tower pools at
    pixels = encoder.preprocess(images)
    assert pixels.shape == (3, 3, 32, 32)
    with torch.no_grad():
        image_out = model.get_image_features(pixel_values=pixels)
        text_out = model.get_text_features(**ids)  # with the attention mask: the encoder's maskless ids agree
    unwrap = [out if isinstance(out, torch.Tensor) else out.pooler_output for out in (image_out, text_out)]
    cosine = F.cosine_similarity(*unwrap)
    torch.testing.assert_close(metric.compute(), (100 * cosine.clamp(min=0)).mean())

    assert metric.truncation.count == 1
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and f"{CONTEXT}-token context" in warnings[0]
    _, lengths = encoder.tokenize(captions)
    assert lengths[0] == 2 + len(tokenizer.tokenize("red circle")) and lengths[2] > CONTEXT


def test_preprocessing_matches_the_directorys_image_processor(hf_clip_dir):
    """The torch pipeline against transformers' own (PIL) processor reading the same preprocessor_config.json."""
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_cls.from_pretrained(str(hf_clip_dir), local_files_only=True)
    images = smooth_images(2, 50, 70)
    pixels_uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    expected = processor(images=[img.permute(1, 2, 0).numpy() for img in pixels_uint8], return_tensors="pt")
    encoder = HuggingFaceCLIP(hf_clip_dir)
    ours = encoder.preprocess(pixels_uint8.float() / 127.5 - 1)
    expected = expected["pixel_values"]
    assert ours.shape == expected.shape == (2, 3, 32, 32)
    # PIL resamples and rounds in 8 bits, torch does not: they agree to about one grey level (1/255 ÷ std ≈ 0.02).
    assert (ours - expected).abs().mean() < 0.01 and (ours - expected).abs().max() < 0.04


def test_missing_and_non_clip_paths_are_named_in_the_error(tmp_path):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(
        EncoderPathError, match=r"no_such_clip.*does not exist.*Hugging Face CLIP directory.*checkpoint"
    ):
        load_text_image_encoder(missing)
    with pytest.raises(HuggingFaceCLIPError, match=r"no_such_clip.*does not exist"):
        HuggingFaceCLIP(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EncoderPathError, match=r"empty.*without config.json"):
        load_text_image_encoder(empty)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(HuggingFaceCLIPError, match=r"bert.*not a Hugging Face CLIP directory.*'bert'"):
        load_text_image_encoder(bert)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(HuggingFaceCLIPError, match=r"weightless.*cannot load"):
        load_text_image_encoder(weightless)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'gen-lightning\[hf\]'"):
        _import_transformers()


def test_a_file_loads_the_projects_clip_checkpoint(tmp_path):
    from gen_lightning.models.clip import CLIPModel
    from gen_lightning.nn.clip import CLIPNet
    from gen_lightning.nn.text import TextConfig
    from gen_lightning.nn.vision import VisionConfig

    torch.manual_seed(0)
    model = CLIPModel(
        vision=VisionConfig(patch_size=4, width=32, layers=1, heads=2),
        text=TextConfig(context_length=16, width=32, layers=1, heads=2),
        embed_dim=16,
        image_size=16,
    )
    encoder = load_text_image_encoder(save_checkpoint(model, tmp_path / "clip.ckpt"))
    assert isinstance(encoder, CLIPNet) and isinstance(encoder, TextImageEncoder)
    assert not any(p.requires_grad for p in encoder.parameters())
    images = smooth_images(2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_image(images), model.eval().net.encode_image(images))
