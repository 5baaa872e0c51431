"""The bad-input corpus (issue 7): every input is generated here in a tmp dir and goes through the real code path
(ShardDataModule streaming real tar shards, the `gen-lightning` CLI, models.loading). Each one either fails with an
error naming the culprit, or is converted / skipped and counted, as docs/bad_inputs.md says row by row."""

from __future__ import annotations

import io
import logging
import os
import struct
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from PIL import Image

from gen_lightning.callbacks import DataThroughput
from gen_lightning.cli import main
from gen_lightning.data import decode
from gen_lightning.data.datamodule import ShardDataModule, model_trains_on_captions
from gen_lightning.data.decode import UnusableDataError, drain_skipped
from gen_lightning.data.shard_writer import write_shards
from gen_lightning.data.urls import ShardPatternError
from gen_lightning.models.clip import CLIPModel
from gen_lightning.models.diffusion import DiffusionModel
from gen_lightning.models.latent_diffusion import LatentDiffusionModel
from gen_lightning.models.loading import CheckpointError, load_model
from gen_lightning.models.vae import VAEModel
from gen_lightning.nn.text import TextConfig
from gen_lightning.nn.vision import VisionConfig
from tests.conftest import save_checkpoint, toy_data_args, toy_samples, write_tar

SIZE = 8  # output side: uniform test images keep their exact colour through the resize


# --- making bad inputs -----------------------------------------------------------------------------------------------
def encoded(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def solid(color: tuple[int, int, int], size: tuple[int, int] = (6, 6)) -> bytes:
    return encoded(Image.new("RGB", size, color))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what Pillow will not write: 16-bit RGB, a header promising 400M pixels."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def captioned(key: str, color: tuple[int, int, int], caption: bytes) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", solid(color)), (f"{key}.txt", caption)]


# --- reading them through the DataModule ------------------------------------------------------------------------------
def read_val(pattern: str | Path, require_captions: bool | None = None) -> tuple[dict[str, list], int]:
    """Stream `pattern` as validation data (each sample once, in order): ({"key", "caption", "image"} lists, number
    of samples skipped). The skip tally is per process: taken from the batches, plus any left after the last one."""
    drain_skipped()
    data = ShardDataModule(
        val=str(pattern), image_size=SIZE, batch_size=3, num_workers=0, require_captions=require_captions
    )
    data.setup("validate")
    batches = list(data.val_dataloader())
    out: dict[str, list] = {"key": [], "caption": [], "image": []}
    for batch in batches:
        out["key"] += batch["__key__"]
        out["caption"] += batch["caption"]
        out["image"] += list(batch["image"])
    return out, sum(batch["skipped"] for batch in batches) + drain_skipped()


def rgb(image: torch.Tensor) -> list[float]:
    """Mean colour of a [-1, 1] CHW image, in 0..255."""
    return [round(float(v), 1) for v in (image.mean(dim=(1, 2)) + 1) * 127.5]


@pytest.fixture(autouse=True)
def skip_warnings(monkeypatch, caplog):
    """Every test sees its own skip warnings (they stop after MAX_WARNINGS_PER_PROCESS in one process)."""
    monkeypatch.setattr(decode, "_warned", 0)
    caplog.set_level(logging.WARNING, logger="gen_lightning.data.decode")
    return caplog


def warnings_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "gen_lightning.data.decode")


# --- tar shards ------------------------------------------------------------------------------------------------------
def test_truncated_tar_keeps_the_complete_samples_and_counts_the_break(tmp_path, caplog):
    write_shards(toy_samples(6, size=6), tmp_path, samples_per_shard=6, val_fraction=0.0)
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    fourth = next(m for m in members if m.name.startswith("toy_00003."))  # first member of the 4th sample
    shard.write_bytes(shard.read_bytes()[: fourth.offset_data + fourth.size // 2])
    read, skipped = read_val(shard)
    assert read["key"] == ["toy_00000", "toy_00001", "toy_00002"]
    assert skipped == 1  # one break per shard (webdataset reports it twice; counted once)
    assert f"data in shard {shard}: unreadable tar data (ReadError: unexpected end of data)" in warnings_text(caplog)


def test_a_cut_pipe_shard_is_named_not_the_one_before_it(tmp_path, caplog):
    """A `pipe:` stream's read error names a process, not a file: the shard is the one being read, even when the cut is
    in its first member (the last member seen came from the shard before)."""
    write_shards(toy_samples(6, size=6), tmp_path, samples_per_shard=3, val_fraction=0.0)
    second = tmp_path / "train-000001.tar"
    with tarfile.open(second) as tar:
        first_member = tar.getmembers()[0]
    second.write_bytes(second.read_bytes()[: first_member.offset_data + first_member.size // 2])
    read, skipped = read_val(f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar")
    assert read["key"] == ["toy_00000", "toy_00001", "toy_00002"] and skipped == 1
    assert f"data in shard pipe:cat {second}: unreadable tar data" in warnings_text(caplog)


def test_empty_cut_header_and_non_tar_shards_each_count_once_per_pass(tmp_path, caplog):
    good = write_tar(tmp_path / "s-0.tar", captioned("a", (255, 0, 0), b"red"))
    (tmp_path / "s-1.tar").write_bytes(b"")
    (tmp_path / "s-2.tar").write_bytes(good.read_bytes()[:100])  # inside the first header
    (tmp_path / "s-3.tar").write_bytes(b"not a tar at all " * 64)
    for _ in range(2):  # a second pass (next epoch) counts them again: each pass is a new read
        read, skipped = read_val(tmp_path / "s-{0..3}.tar")
        assert read["key"] == ["a"] and skipped == 3
        assert read_val(tmp_path / "s-1.tar")[1] == 1  # also when the same broken shard comes right after itself
    text = warnings_text(caplog)
    assert "s-1.tar: unreadable tar data (ReadError: empty file)" in text
    assert "s-2.tar: unreadable tar data (ReadError: truncated header)" in text
    assert "s-3.tar: unreadable tar data (ReadError: invalid header)" in text


def test_members_that_are_not_images_are_skipped_and_named(tmp_path, caplog):
    jpeg_named_png = encoded(Image.new("RGB", (6, 6), (0, 0, 255)), "JPEG", quality=95)
    png = solid((255, 0, 0))
    shard = write_tar(
        tmp_path / "mixed.tar",
        [
            ("garbage.png", b"\x00\x01 these bytes are no image"),
            ("garbage.txt", b"a caption"),
            ("cut.png", png[: len(png) // 2]),
            ("captiononly.txt", b"no image member here"),
            ("lying.png", jpeg_named_png),  # decoded by its content, not by its name
            ("good.png", png),
        ],
    )
    read, skipped = read_val(shard)
    assert read["key"] == ["lying", "good"] and skipped == 3
    blue = rgb(read["image"][0])
    assert blue[2] > 250 and blue[0] < 5
    text = warnings_text(caplog)
    assert f"sample garbage from {shard}: png is not a decodable image (cannot identify image file" in text
    assert f"sample cut from {shard}: png is not a decodable image" in text
    assert f"sample captiononly from {shard}: no image member (looked for png, jpg, jpeg, webp; found [" in text


# --- image modes and sizes -------------------------------------------------------------------------------------------
def mode_images() -> dict[str, tuple[bytes, list[float]]]:
    """key -> (encoded image, expected RGB in 0..255 after decoding)."""
    palette = Image.new("P", (6, 6), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 0
    rgb16 = raw_png(4, 4, 16, 2, (b"\x00" + b"\xff\xff\x00\x00\x80\x00" * 4) * 4)  # (65535, 0, 32768) per pixel
    return {
        "gray": (encoded(Image.new("L", (6, 6), 64)), [64, 64, 64]),
        "bilevel": (encoded(Image.new("1", (6, 6), 1)), [255, 255, 255]),
        # red at alpha 128 composited on white: 255·(1 - 128/255) = 127 in green and blue
        "rgba": (encoded(Image.new("RGBA", (6, 6), (255, 0, 0, 128))), [255, 127, 127]),
        "gray_alpha": (encoded(Image.new("LA", (6, 6), (0, 64))), [191, 191, 191]),
        "gray16": (encoded(Image.new("I;16", (6, 6), 32768)), [128, 128, 128]),  # scaled by 65535, not clipped
        "rgb16": (rgb16, [255, 0, 128]),  # 16-bit RGB keeps its high byte
        "palette": (encoded(palette), [0, 0, 255]),
        "palette_transparent": (encoded(transparent_palette, transparency=0), [255, 255, 255]),
        "cmyk": (encoded(Image.new("CMYK", (6, 6), (0, 255, 255, 0)), "JPEG", quality=100), [255, 0, 0]),
    }


def test_every_image_mode_becomes_rgb_with_the_right_colour(tmp_path):
    images = mode_images()
    ext = {"cmyk": "jpg"}
    shard = write_tar(
        tmp_path / "modes.tar", [(f"{key}.{ext.get(key, 'png')}", data) for key, (data, _) in images.items()]
    )
    read, skipped = read_val(shard)
    assert skipped == 0 and read["key"] == list(images)
    for key, image in zip(read["key"], read["image"], strict=True):
        assert image.shape == (3, SIZE, SIZE)
        assert rgb(image) == pytest.approx(images[key][1], abs=3), key


def test_tiny_huge_and_thin_images_come_out_at_the_training_size(tmp_path):
    huge = Image.new("RGB", (4000, 3000), (0, 0, 255))
    huge.paste((255, 0, 0), (2000, 0, 4000, 3000))  # left half blue, right half red
    thin = raw_png(1, 2_000_000, 8, 0, b"\x00\x80" * 2_000_000)  # 1×2,000,000 gray, a 4 KB file
    shard = write_tar(
        tmp_path / "sizes.tar",
        [
            ("tiny.png", solid((0, 255, 0), (3, 2))),
            ("dot.png", solid((255, 0, 0), (1, 1))),
            ("huge.png", encoded(huge)),
            ("thin.png", thin),
        ],
    )
    start = time.perf_counter()
    read, skipped = read_val(shard)
    # Resizing the whole strip up to 8 px wide first took 7.6 s and 1.7 GB here; only the kept square is resized now.
    assert time.perf_counter() - start < 5.0
    assert skipped == 0 and read["key"] == ["tiny", "dot", "huge", "thin"]
    tiny, dot, big, strip = read["image"]
    assert rgb(tiny) == pytest.approx([0, 255, 0], abs=1) and rgb(dot) == pytest.approx([255, 0, 0], abs=1)
    assert rgb(big[:, :, :1]) == pytest.approx([0, 0, 255], abs=2)  # center crop 500..3500: blue on the left,
    assert rgb(big[:, :, -1:]) == pytest.approx([255, 0, 0], abs=2)  # red on the right
    assert rgb(strip) == pytest.approx([128, 128, 128], abs=1)


def test_decompression_bomb_is_skipped_and_counted(tmp_path, caplog):
    bomb = raw_png(20_000, 20_000, 8, 2, b"")  # 400M pixels promised, > 2× Pillow's MAX_IMAGE_PIXELS; 60 bytes
    shard = write_tar(tmp_path / "bomb.tar", [("bomb.png", bomb), ("ok.png", solid((0, 0, 0)))])
    read, skipped = read_val(shard)
    assert read["key"] == ["ok"] and skipped == 1
    assert f"sample bomb from {shard}: png is not a decodable image (Image size (400000000 pixels) exceeds" in (
        warnings_text(caplog)
    )


# --- captions --------------------------------------------------------------------------------------------------------
def caption_shard(path: Path) -> Path:
    return write_tar(
        path,
        [
            *captioned("named", (255, 0, 0), b"red square"),
            ("nocaption.png", solid((0, 255, 0))),
            *captioned("blank", (0, 0, 255), b"  \n"),
            *captioned("latin1", (9, 9, 9), "café".encode("latin-1")),
            *captioned("utf8", (9, 9, 9), "café ☕".encode()),
        ],
    )


def test_captions_missing_or_blank_are_skipped_when_the_model_trains_on_them(tmp_path, caplog):
    shard = caption_shard(tmp_path / "captions.tar")
    read, skipped = read_val(shard, require_captions=True)
    assert read["key"] == ["named", "utf8"] and read["caption"] == ["red square", "café ☕"]
    assert skipped == 3
    text = warnings_text(caplog)
    assert "sample nocaption from" in text and "no caption (txt member)" in text
    assert "sample blank from" in text and "empty caption" in text
    assert "sample latin1 from" in text and "txt caption is not UTF-8" in text


def test_unconditional_models_keep_uncaptioned_images_but_never_a_non_utf8_caption(tmp_path):
    read, skipped = read_val(caption_shard(tmp_path / "captions.tar"))  # no trainer: nothing needs captions
    assert read["key"] == ["named", "nocaption", "blank", "utf8"]
    assert read["caption"] == ["red square", "", "", "café ☕"]
    assert skipped == 1  # latin1: a caption in an unknown encoding would be a wrong caption


def test_text_models_require_captions_and_others_do_not():
    assert model_trains_on_captions(CLIPModel) and model_trains_on_captions(LatentDiffusionModel)
    assert not model_trains_on_captions(DiffusionModel) and not model_trains_on_captions(VAEModel)


def tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(
        vision=VisionConfig(patch_size=4, width=16, layers=1, heads=2),
        text=TextConfig(context_length=16, width=16, layers=1, heads=2),
        embed_dim=8,
        image_size=SIZE,
    )


class BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.keys: list[str] = []
        self.skipped = 0

    def record(self, batch: dict[str, Any]) -> None:
        self.keys += batch["__key__"]
        self.skipped += batch["skipped"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record(batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.record(batch)


def quiet_trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_clip_in_a_trainer_gets_only_captioned_samples(tmp_path):
    """The DataModule asks the Trainer's model (auto mode): CLIP's validation never sees an uncaptioned sample."""
    shard = caption_shard(tmp_path / "captions.tar")
    recorder = BatchRecorder()
    drain_skipped()
    data = ShardDataModule(val=str(shard), image_size=SIZE, batch_size=8, num_workers=0)
    quiet_trainer(tmp_path, callbacks=[recorder]).validate(tiny_clip(), datamodule=data, verbose=False)
    assert recorder.keys == ["named", "utf8"] and recorder.skipped == 3


@pytest.mark.timeout(120)
def test_training_data_with_nothing_usable_is_an_error_not_a_hang(tmp_path):
    """The training stream resamples forever: without a limit, no usable sample means no batch, ever."""
    shard = write_tar(tmp_path / "uncaptioned.tar", [(f"k{i}.png", solid((i, i, i))) for i in range(4)])
    data = ShardDataModule(
        train=str(shard), image_size=SIZE, batch_size=2, samples_per_epoch=4, num_workers=0, max_skips_in_a_row=50
    )
    with pytest.raises(UnusableDataError, match=r"data\.train='.*uncaptioned\.tar'.*50 samples in a row.*no caption"):
        quiet_trainer(tmp_path, max_steps=1).fit(tiny_clip(), datamodule=data)


def test_skipped_samples_reach_the_logged_counter(tmp_path):
    """`data/skipped_samples` (DataThroughput) is the total of what the batches carried."""
    members = []
    for i in range(4):
        members += [(f"good{i}.png", solid((200, 0, 0))), (f"bad{i}.png", b"not an image")]
    shard = write_tar(tmp_path / "half.tar", members)
    data = ShardDataModule(
        train=str(shard), image_size=SIZE, batch_size=2, samples_per_epoch=4, num_workers=0, shuffle_buffer=0
    )
    recorder = BatchRecorder()
    model = DiffusionModel(unet={"channels": [8, 8], "attention_levels": [], "num_heads": 1}, image_size=SIZE)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[DataThroughput(), recorder])
    drain_skipped()
    trainer.fit(model, datamodule=data)
    assert recorder.keys == ["good0", "good1", "good2", "good3"]
    assert recorder.skipped == 3  # bad0, bad1, bad2 came before the last batch was complete
    assert trainer.callback_metrics["data/skipped_samples"].item() == 3


# --- duplicate keys --------------------------------------------------------------------------------------------------
def test_a_repeated_member_keeps_the_first_copy_and_is_counted(tmp_path, caplog):
    shard = write_tar(
        tmp_path / "repeat.tar",
        [("a.png", solid((255, 0, 0))), ("a.png", solid((0, 0, 255))), ("a.txt", b"red"), ("b.png", solid((0, 0, 0)))],
    )
    read, skipped = read_val(shard)
    assert read["key"] == ["a", "b"] and read["caption"][0] == "red" and skipped == 1
    assert rgb(read["image"][0]) == pytest.approx([255, 0, 0], abs=1)
    assert f"data in shard {shard}: tar member a.png repeats the one before it (the first copy is used)" in (
        warnings_text(caplog)
    )


def test_the_same_key_in_two_places_is_two_samples_never_mixed(tmp_path):
    write_tar(
        tmp_path / "d-0.tar",
        [
            *captioned("k", (255, 0, 0), b"red"),
            *captioned("m", (0, 0, 0), b"black"),
            *captioned("k", (0, 255, 0), b"green"),
        ],
    )
    write_tar(tmp_path / "d-1.tar", captioned("k", (0, 0, 255), b"blue"))
    read, skipped = read_val(tmp_path / "d-{0..1}.tar")
    assert skipped == 0 and read["key"] == ["k", "m", "k", "k"]
    assert read["caption"] == ["red", "black", "green", "blue"]  # each with its own image and caption
    assert rgb(read["image"][3]) == pytest.approx([0, 0, 255], abs=1)


def test_a_shard_listed_twice_is_an_error(tmp_path):
    write_tar(tmp_path / "d-0.tar", captioned("k", (255, 0, 0), b"red"))
    for other_spelling in (f"{tmp_path}/d-0.tar", f"{tmp_path}/./d-0.tar", f"file:{tmp_path}/d-0.tar"):
        with pytest.raises(ShardPatternError, match=r"lists '.*d-0\.tar' more than once"):
            read_val(f"{tmp_path}/d-{{0..0}}.tar::{other_spelling}")


# --- patterns and files ----------------------------------------------------------------------------------------------
def test_a_pattern_matching_nothing_stops_fit_before_training(tmp_path):
    pattern = str(tmp_path / "none-{000..009}.tar")
    args = ["fit", *toy_data_args(tmp_path, tmp_path / "run", "configs/ddpm_emoji.yaml"), "--trainer.logger=false"]
    with pytest.raises(ShardPatternError, match=r"none-\{000\.\.009\}\.tar' matches no file"):
        main([*args, f"--data.train={pattern}", "--data.val=null", "--data.samples_per_epoch=8"])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_directory_named_like_a_shard_is_named(tmp_path):
    write_tar(tmp_path / "s-0.tar", captioned("k", (255, 0, 0), b"red"))
    (tmp_path / "s-1.tar").mkdir()
    with pytest.raises(ShardPatternError, match=r"'.*s-1\.tar' is a directory, not a tar shard"):
        read_val(tmp_path / "s-{0..1}.tar")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod-000 file anyway")
def test_an_unreadable_shard_is_named(tmp_path):
    shard = write_tar(tmp_path / "locked.tar", captioned("k", (255, 0, 0), b"red"))
    shard.chmod(0)
    try:
        with pytest.raises(ShardPatternError, match=r"cannot read '.*locked\.tar' \(permissions\)"):
            read_val(shard)
    finally:
        shard.chmod(0o644)


# --- configuration ---------------------------------------------------------------------------------------------------
def cli_error(tmp_path: Path, capsys, *extra: str) -> str:
    """stderr of a `gen-lightning fit` that must stop while parsing (exit status 2, nothing trained)."""
    args = ["fit", *toy_data_args(tmp_path, tmp_path / "run", "configs/ddpm_emoji.yaml"), "--trainer.logger=false"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *extra])
    assert exit_info.value.code == 2
    assert not (tmp_path / "run" / "checkpoints").exists()
    return capsys.readouterr().err


def test_unknown_config_keys_are_named(tmp_path, capsys):
    assert "unrecognized arguments: --data.batch_sise=4" in cli_error(tmp_path, capsys, "--data.batch_sise=4")
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  init_args:\n    sample_step: 3\n")
    err = cli_error(tmp_path, capsys, "--config", str(config))
    assert "Option 'sample_step' is not accepted" in err


def test_wrong_config_types_are_named(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "--data.batch_size=four")
    assert 'Parser key "data.batch_size"' in err and "Expected a <class 'int'>. Got value: four" in err
    config = tmp_path / "types.yaml"
    config.write_text("data:\n  image_size: big\n")
    err = cli_error(tmp_path, capsys, "--config", str(config))
    assert 'Parser key "data.image_size"' in err and "Got value: big" in err


# --- checkpoints -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tiny_clip(), tmp_path_factory.mktemp("clip") / "clip.ckpt")


def sample_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", f"--ckpt={ckpt}", "--n=2", "--steps=2", f"--out={out}", "--device=cpu", *extra]


def test_a_checkpoint_of_another_model_class_is_refused_by_name(tiny_vae_checkpoint, clip_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match=r"vae\.ckpt' holds a VAEModel, expected a DiffusionModel"):
        load_model(tiny_vae_checkpoint, expected=DiffusionModel)
    with pytest.raises(CheckpointError, match=r"clip\.ckpt' holds a CLIPModel, expected a VAEModel"):
        LatentDiffusionModel(vae_checkpoint=str(clip_checkpoint), image_size=16)
    with pytest.raises(CheckpointError, match=r"vae\.ckpt' holds a VAEModel, expected a CLIPModel"):
        LatentDiffusionModel(vae_checkpoint=str(tiny_vae_checkpoint), clip_checkpoint=str(tiny_vae_checkpoint))
    # relabelled: the file says DiffusionModel, its contents are a VAE's
    raw = torch.load(tiny_vae_checkpoint, weights_only=True)
    raw["gen_lightning"]["class_path"] = "gen_lightning.models.diffusion.DiffusionModel"
    torch.save(raw, tmp_path / "relabelled.ckpt")
    with pytest.raises(CheckpointError, match=r"relabelled\.ckpt' does not fit DiffusionModel: .*'autoencoder'"):
        load_model(tmp_path / "relabelled.ckpt")


def test_sample_with_a_checkpoint_that_cannot_do_it(tiny_vae_checkpoint, clip_checkpoint, tmp_path, capsys):
    out = tmp_path / "grid.png"
    with pytest.raises(TypeError, match=r"CLIPModel does not generate images"):
        main(sample_args(clip_checkpoint, out))
    with pytest.raises(SystemExit) as exit_info:
        main(sample_args(tiny_vae_checkpoint, out, "--prompt=red"))
    assert exit_info.value.code == 2
    assert f"{tiny_vae_checkpoint} holds a VAEModel, which is not text-conditioned" in capsys.readouterr().err
    assert not out.exists()
    main(sample_args(tiny_vae_checkpoint, out))  # a VAE is a generative model: prior samples, as documented
    assert out.is_file()


def test_a_truncated_checkpoint_is_named(tiny_vae_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(tiny_vae_checkpoint.read_bytes()[:5000])
    message = r"truncated\.ckpt' is truncated or corrupt, or not a torch checkpoint \(OSError: .*use a complete copy"
    with pytest.raises(CheckpointError, match=message):
        load_model(truncated)
    with pytest.raises(CheckpointError, match=message):
        main(sample_args(truncated, tmp_path / "grid.png"))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.ckpt' is truncated or corrupt"):
        load_model(tmp_path / "empty.ckpt")


class Marker:
    """A custom class: weights-only loading must not build it."""


class Trap:
    """Unpickling this would create a file: proof that no code from the checkpoint runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_checkpoint_needing_pickled_objects_is_refused_for_safety(tiny_vae_checkpoint, tmp_path):
    raw = torch.load(tiny_vae_checkpoint, weights_only=True)
    with_marker = tmp_path / "marker.ckpt"
    torch.save({**raw, "hyper_parameters": {**raw["hyper_parameters"], "extra": Marker()}}, with_marker)
    with pytest.raises(CheckpointError, match=r"marker\.ckpt' was refused for safety: .*\(\S*Marker\).*arbitrary code"):
        load_model(with_marker)
    proof = tmp_path / "code-ran"
    trapped = tmp_path / "trap.ckpt"
    torch.save({**raw, "callbacks": {"x": Trap(proof)}}, trapped)
    with pytest.raises(CheckpointError, match=r"trap\.ckpt' was refused for safety: .*\(io\.open\)") as err:
        main(sample_args(trapped, tmp_path / "grid.png"))
    assert "re-save it once" in str(err.value)
    assert not proof.exists() and not (tmp_path / "grid.png").exists()
    torch.load(trapped, weights_only=False)  # what the refusal prevents: the file's own code runs
    assert proof.exists()
