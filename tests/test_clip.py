"""CLIP: byte tokenizer, contrastive loss (single and 2-process DDP), retrieval/zero-shot scores, the encoder
interface the CLIP score and latent diffusion use, and a CLI fit on real shards read back from W&B."""

from __future__ import annotations

import logging
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gen_lightning.cli import main
from gen_lightning.metrics.clip_score import CLIPScore, TextImageEncoder
from gen_lightning.metrics.retrieval import recall_at_k, same_caption, zero_shot_accuracy
from gen_lightning.models.clip import CLIPModel, class_prompt, load_clip
from gen_lightning.models.loading import load_model
from gen_lightning.nn.contrastive import ClipLoss
from gen_lightning.nn.text import EOT, PAD, SOT, ByteTokenizer, TextConfig, TextEncoder
from gen_lightning.nn.vision import VisionConfig
from tests.conftest import REPO, save_checkpoint
from tests.test_datamodule import free_port
from tests.wandb_reader import history


def tiny_clip(local_loss: bool = False, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(
        vision=VisionConfig(patch_size=4, width=32, layers=1, heads=2),
        text=TextConfig(context_length=16, width=32, layers=1, heads=2),
        embed_dim=16,
        image_size=16,
        local_loss=local_loss,
    )


# --- tokenizer -------------------------------------------------------------------------------------------------------
def test_byte_tokenizer_layout_lengths_and_explicit_truncation():
    tokenizer = ByteTokenizer(context_length=8)
    ids, lengths = tokenizer(["Ab", "  café  ", "a much longer caption"])
    assert ids[0].tolist() == [SOT, ord("a") + 3, ord("b") + 3, EOT, PAD, PAD, PAD, PAD]  # lower-cased
    assert tokenizer.decode(ids[1]) == "café" and lengths[1] == 2 + len("café".encode())
    assert lengths[2] == 2 + len("a much longer caption") and lengths[2] > 8
    assert ids[2, -1] == EOT and tokenizer.decode(ids[2]) == "a much"  # cut, EOT kept last


def test_text_encoder_pools_the_eot_state_and_ignores_padding():
    torch.manual_seed(0)
    encoder = TextEncoder(TextConfig(context_length=12, width=16, layers=1, heads=2))
    short, _ = encoder.tokenize(["red"])
    hidden = encoder(short)
    # causal attention: what follows EOT (padding or anything else) cannot change the pooled state
    altered = short.clone()
    altered[0, 6:] = 42
    torch.testing.assert_close(TextEncoder.pool(short, hidden), TextEncoder.pool(short, encoder(altered)))
    assert TextEncoder.padding_mask(short)[0].tolist() == [True] * 5 + [False] * 7


# --- scores ----------------------------------------------------------------------------------------------------------
def test_recall_at_k_counts_ties_against_and_accepts_duplicate_captions():
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.7], [0.3, 0.3, 0.3]])
    # query 0: right answer first; query 1: two wrong above it; query 2: tied with two wrong -> ranked last
    assert recall_at_k(similarity, ks=(1, 2, 3)) == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: 1.0}
    relevant = same_caption(["red", "blue", "red"])
    assert relevant.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    # text 0 ("red") ranks image 2 (also "red") first: a right answer only when duplicates count
    texts_to_images = torch.tensor([[0.5, 0.2, 0.9], [0.6, 0.5, 0.1], [0.5, 0.2, 0.9]])
    assert recall_at_k(texts_to_images, relevant, ks=(1,))[1] == pytest.approx(2 / 3)
    assert recall_at_k(texts_to_images, ks=(1,))[1] == pytest.approx(1 / 3)
    assert recall_at_k(torch.ones(3, 3), ks=(1,))[1] == 0.0  # a constant model retrieves nothing


def test_zero_shot_accuracy_and_chance():
    classes = F.normalize(torch.eye(3), dim=-1)
    images = torch.tensor([[1.0, 0.1, 0], [0, 0.2, 1.0], [0.9, 0, 0.2], [0, 1.0, 0]])
    accuracy, chance = zero_shot_accuracy(images, classes, torch.tensor([0, 2, 1, 1]))
    assert accuracy == 0.75 and chance == pytest.approx(1 / 3)
    assert class_prompt("face-smiling") == "face smiling" and class_prompt("Smileys & Emotion") == "smileys & emotion"


def test_clip_loss_is_symmetric_cross_entropy():
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * images @ texts.T
    expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(ClipLoss()(images, texts, scale), expected)
    assert ClipLoss()(images, images, torch.tensor(100.0)) < 1e-3  # perfectly matched pairs


@pytest.mark.parametrize("loss_kind", ["global", "local"])
def test_two_process_loss_and_gradients_equal_single_process(loss_kind, tmp_path):
    """2 gloo ranks under DDP, each with half the batch, gathered with gradient: same loss, same gradients."""
    torch.manual_seed(1)
    model = tiny_clip(local_loss=loss_kind == "local")
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    captions = ["red circle", "blue square", "green circle", "yellow square", "red square", "a", "b c", "blue"]
    torch.save({"images": images, "captions": captions, "state_dict": model.state_dict()}, tmp_path / "batch.pt")
    probe = REPO / "tests" / "clip_dist_probe.py"
    subprocess.run(
        [sys.executable, str(probe), str(tmp_path / "batch.pt"), str(tmp_path), str(free_port()), loss_kind],
        check=True,
        timeout=180,
        cwd=REPO,
    )
    image_features, text_features = model.embed(images, captions)
    loss = model.loss_fn(image_features, text_features, model.net.logit_scale.exp())
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # global loss: every rank computes the full loss; local loss: the mean of the ranks' losses is the full loss
    distributed_loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(distributed_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        for r in ranks:  # DDP leaves the same averaged gradient on every rank
            torch.testing.assert_close(r["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- model ------------------------------------------------------------------------------------------------------------
def test_clip_learns_a_batch_and_clamps_its_temperature():
    model = tiny_clip()
    images = torch.rand(12, 3, 16, 16) * 2 - 1
    captions = [f"item {i}" for i in range(12)]  # distinct within the 16-byte context
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(120):  # random-noise images start with near-identical features; ~30 steps to break symmetry
        image_features, text_features = model.embed(images, captions)
        loss = model.loss_fn(image_features, text_features, model.net.logit_scale.exp())
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * math.log(12) < first  # ln 12: the loss of guessing among 12 pairs
    with torch.no_grad():
        image_features, text_features = model.embed(images, captions)
    assert recall_at_k(image_features @ text_features.T, ks=(1,))[1] >= 0.75
    model.net.logit_scale.data.fill_(10.0)  # exp(10) > 100
    model.after_optimizer_step(1)
    assert model.net.logit_scale.item() == pytest.approx(math.log(100))


def test_checkpoint_serves_as_clip_score_encoder_and_text_tower(tmp_path, caplog):
    model = tiny_clip()
    loaded = load_clip(save_checkpoint(model, tmp_path / "clip.ckpt"))
    assert isinstance(loaded, TextImageEncoder) and not any(p.requires_grad for p in loaded.parameters())
    images = torch.rand(3, 3, 32, 32) * 2 - 1  # another size than training: resized on encode
    captions = ["red circle", "blue square", "x" * 40]
    metric = CLIPScore(loaded)
    with caplog.at_level(logging.WARNING, logger="gen_lightning"):
        metric.update(images, captions)
    with torch.no_grad():
        net = model.net
        cosine = F.cosine_similarity(net.encode_image(images), net.encode_text(net.tokenize(captions)[0]))
    torch.testing.assert_close(metric.compute(), (100 * cosine.clamp(min=0)).mean())
    assert metric.truncation.count == 1 and any("16-token context" in r.getMessage() for r in caplog.records)
    tokens, _ = loaded.text.tokenize(["red circle"])
    assert loaded.text(tokens).shape == (1, 16, 32)  # hidden states for cross-attention
    with pytest.raises(TypeError, match="does not generate"):
        load_model(tmp_path / "clip.ckpt").sample(2)


def test_clip_fit_logs_retrieval_and_zero_shot_to_wandb(toy_shards, tmp_path):
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/clip_emoji.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            f"--data.train={toy_shards}",
            f"--data.val={toy_shards}",
            "--data.image_size=16",
            "--data.batch_size=16",
            "--data.num_workers=0",
            "--data.shuffle_buffer=16",
            "--trainer.max_steps=40",
            "--trainer.val_check_interval=40",
            "--trainer.log_every_n_steps=5",
            "--model.init_args.vision.width=32",
            "--model.init_args.vision.layers=1",
            "--model.init_args.text.width=32",
            "--model.init_args.text.layers=1",
            "--model.init_args.embed_dim=16",
            "--model.init_args.warmup_steps=5",
            "--model.init_args.zero_shot_keys=[color, shape]",
        ]
    )
    rows = history(next(tmp_path.glob("wandb/offline-run-*")))
    val = {k: v for row in rows for k, v in row.items() if k.startswith("val/")}
    assert val["val/num_samples"] > 20
    for key in ("image_to_text_R@1", "text_to_image_R@5", "zeroshot_color_top1", "zeroshot_shape_top1"):
        assert 0.0 <= val[f"val/{key}"] <= 1.0, key
    assert val["val/zeroshot_color_chance"] == pytest.approx(1 / 4)
    # toy captions name colour and shape; 40 steps learn colour well above chance
    assert val["val/zeroshot_color_top1"] > 0.5, val
    assert any("train/loss" in row for row in rows)


def test_zero_shot_skips_missing_and_empty_labels():
    """A val sample's json may lack a label or hold an empty one: it is left out of the zero-shot score, not fatal."""
    model = tiny_clip()
    features = F.normalize(torch.randn(5, 16), dim=-1)
    labels = [{"group": "x"}, {"group": "y"}, {"group": ""}, {}, {"group": "x"}]
    scores = model.validation_scores(features, features, ["a", "b", "c", "d", "e"], labels)
    key = f"zeroshot_{model.hparams.zero_shot_keys[0]}_chance"
    assert scores[key] == pytest.approx(1 / 2)  # two classes, scored on the three labelled samples


def test_checkpoints_with_a_zero_dim_temperature_still_load_and_resume():
    """The temperature is one element since DeepSpeed (which cannot broadcast a 0-dim parameter); weights and AdamW
    moments written when it was 0-dim (checkpoint format 1, the towers at CLIPModel's top level) load into the new
    shape through the hook Lightning calls before it loads a resumed state dict."""
    model = tiny_clip()
    old = {
        k.removeprefix("net."): (v.reshape(()) if k == "net.logit_scale" else v) for k, v in model.state_dict().items()
    }
    moments = {"step": torch.tensor(3.0), "exp_avg": torch.tensor(0.5), "exp_avg_sq": torch.tensor(0.25)}
    checkpoint = {"state_dict": old, "optimizer_states": [{"state": {0: moments}}], "gen_lightning": {"format": 1}}
    loaded = tiny_clip(seed=1)
    loaded.on_load_checkpoint(checkpoint)
    loaded.load_state_dict(checkpoint["state_dict"])
    assert loaded.net.logit_scale.shape == (1,) and torch.equal(loaded.net.logit_scale, model.net.logit_scale)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    state = checkpoint["optimizer_states"][0]["state"][0]
    assert state["exp_avg"].shape == (1,) and state["exp_avg_sq"].shape == (1,) and state["step"].ndim == 0
