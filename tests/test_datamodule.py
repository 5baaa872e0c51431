"""ShardDataModule on real tar shards: exact-once validation across ranks × workers, equal train epochs per rank,
corrupt samples skipped and counted, clear errors for patterns that match nothing."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from gen_lightning.data.datamodule import ShardDataModule
from gen_lightning.data.decode import ImageTransform, drain_skipped
from gen_lightning.data.shard_writer import read_manifest
from gen_lightning.data.urls import ShardPatternError, expand_pattern
from tests.conftest import REPO, shape_png, write_tar
from tests.dist_data_probe import SAMPLES_PER_EPOCH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def val_keys_of(shards: Path) -> list[str]:
    manifest = read_manifest(shards)
    keys = []
    for shard in manifest["splits"]["val"]["shards"]:
        with tarfile.open(shards / shard["url"]) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return keys


@pytest.mark.slow
def test_two_ranks_two_workers_see_each_val_sample_once_and_equal_train_batches(toy_shards, tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "dist_data_probe.py"), str(toy_shards), str(tmp_path), str(free_port())],
        check=True,
        timeout=180,
        cwd=REPO,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    seen = ranks[0]["val_keys"] + ranks[1]["val_keys"]
    expected = val_keys_of(toy_shards)
    assert len(expected) >= 4
    assert sorted(seen) == sorted(expected)  # every val sample, exactly once over both ranks
    assert ranks[0]["val_keys"] and ranks[1]["val_keys"]  # and both ranks took part
    counts = [len(r["train_batches"]) for r in ranks]
    assert counts[0] == counts[1] == ranks[0]["second_epoch"] == ranks[1]["second_epoch"]
    # an epoch is samples_per_epoch rounded down to whole batches on each rank, however many workers split them
    assert counts[0] == SAMPLES_PER_EPOCH // (2 * 4) == 45
    assert all(size == 4 for r in ranks for size in r["train_batches"])


def test_batches_are_dicts_in_range(toy_shards):
    data = ShardDataModule(train=str(toy_shards), val=str(toy_shards), image_size=16, batch_size=5, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() < 0.0 < batch["image"].max() <= 1.0
    assert all(isinstance(c, str) and c.split()[-1] in ("circle", "square") for c in batch["caption"])
    assert len(batch["__key__"]) == 5


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    good = shape_png("red", "circle")
    write_tar(
        tmp_path / "bad-000000.tar",
        [
            ("a.png", good),
            ("a.txt", b"red circle"),
            ("b.png", b"this is not an image"),
            ("b.txt", b"garbage"),
            ("c.png", good[: len(good) // 2]),  # truncated PNG
            ("d.png", good),
            ("d.txt", b"\xff\xfe not utf-8"),
            ("e.png", good),
        ],
    )
    # a tar cut off in the middle of a member: the reader must count it, not crash
    write_tar(tmp_path / "bad-000001.tar", [("f.png", good), ("g.png", good)])
    data = (tmp_path / "bad-000001.tar").read_bytes()
    (tmp_path / "bad-000001.tar").write_bytes(data[: 3 * 512 + 100])  # headers and data blocks are 512 bytes
    drain_skipped()
    loader = ShardDataModule(val=str(tmp_path / "bad-{000000..000001}.tar"), image_size=16, batch_size=2, num_workers=0)
    loader.setup("validate")
    batches = list(loader.val_dataloader())
    keys = [k for b in batches for k in b["__key__"]]
    assert sorted(keys) == ["a", "e", "f"]
    assert sum(b["skipped"] for b in batches) == 4  # b (not an image), c (truncated), d (caption), g (cut tar)


def test_pattern_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing-{000000..000003}.tar")
    with pytest.raises(ShardPatternError, match=r"nothing-\{000000\.\.000003\}\.tar.*matches no file"):
        expand_pattern(pattern)
    data = ShardDataModule(train=pattern, samples_per_epoch=10)
    with pytest.raises(ShardPatternError, match="matches no file"):
        data.setup("fit")


def test_partly_missing_shards_are_named(toy_shards):
    pattern = str(toy_shards / "train-{000000..000999}.tar")
    with pytest.raises(ShardPatternError, match=r"shards missing: .*train-0000"):
        expand_pattern(pattern)


def test_image_modes_are_converted_to_rgb_on_white():
    import random

    from PIL import Image

    transform = ImageTransform(8)
    rng = random.Random(0)
    transparent = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    assert torch.allclose(transform(transparent, rng), torch.ones(3, 8, 8))  # transparent -> white
    gray16 = Image.new("I;16", (8, 8), 65535)
    assert torch.allclose(transform(gray16, rng), torch.ones(3, 8, 8))  # 16-bit white stays white (not clipped)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    out = transform(palette, rng)
    assert out[2].min() > 0.99 and out[0].max() < -0.99
    # PNG's tRNS on a grey or RGB image: one colour marked transparent (how optimisers store on/off alpha).
    for mode, black in (("L", 0), ("RGB", (0, 0, 0))):
        buffer = io.BytesIO()
        Image.new(mode, (8, 8), black).save(buffer, "PNG", transparency=black)
        with Image.open(io.BytesIO(buffer.getvalue())) as marked:
            assert torch.allclose(transform(marked, rng), torch.ones(3, 8, 8)), mode


def test_exif_orientation_is_applied():
    """A phone photo stores its pixels as the sensor saw them and the turn to apply in EXIF (here orientation 6: turn
    90° clockwise). Stored: red above blue, 64×32; seen: a 32×64 portrait with blue on the left, red on the right."""
    import random

    from PIL import Image

    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 16, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    with Image.open(io.BytesIO(buffer.getvalue())) as photo:
        image = ImageTransform(16)(photo, random.Random(0))  # the center square of the portrait
    left, right = image[:, :, :6].mean((1, 2)), image[:, :, -6:].mean((1, 2))
    assert left[2] > 0.8 and left[0] < -0.8 and right[0] > 0.8 and right[2] < -0.8, (left, right)


def test_pipe_urls_stream_through_a_command(toy_shards):
    """`pipe:` URLs (how users stream from S3/GCS CLIs) are brace-expanded and read like local shards."""
    count = len(read_manifest(toy_shards)["splits"]["val"]["shards"])
    pattern = f"pipe:cat {toy_shards}/val-{{000000..{count - 1:06d}}}.tar"
    data = ShardDataModule(val=pattern, image_size=16, batch_size=8, num_workers=0)
    data.setup("validate")
    keys = [key for batch in data.val_dataloader() for key in batch["__key__"]]
    assert sorted(keys) == sorted(val_keys_of(toy_shards))


def test_img2dataset_layout_is_read_as_is(tmp_path):
    """img2dataset writes `{key}.jpg` / `.txt` / `.json` members (and sometimes webp); read them without conversion."""
    import json as json_module

    from PIL import Image as PILImage

    def encoded(fmt: str) -> bytes:
        buffer = io.BytesIO()
        PILImage.new("RGB", (40, 30), (10, 200, 30)).save(buffer, format=fmt)
        return buffer.getvalue()

    members = []
    for i, fmt in enumerate(["JPEG", "WEBP", "PNG"]):
        key = f"{i:09d}"
        ext = {"JPEG": "jpg", "WEBP": "webp", "PNG": "png"}[fmt]
        meta = {"url": f"https://example.com/{i}", "width": 40, "height": 30}
        members += [
            (f"{key}.{ext}", encoded(fmt)),
            (f"{key}.txt", f"a green image {i}".encode()),
            (f"{key}.json", json_module.dumps(meta).encode()),
        ]
    write_tar(tmp_path / "00000.tar", members)
    data = ShardDataModule(val=str(tmp_path / "00000.tar"), image_size=16, batch_size=8, num_workers=0)
    data.setup("validate")
    (batch,) = list(data.val_dataloader())
    assert batch["caption"] == ["a green image 0", "a green image 1", "a green image 2"]
    assert batch["image"].shape == (3, 3, 16, 16)
    green = batch["image"][:, 1].mean()
    assert green > 0.4 and batch["image"][:, 0].mean() < -0.8  # the pixels are the green we wrote, not white/black
