"""Shared fixtures: small real webdataset shard sets written with the project's own writer."""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from gen_lightning.data.shard_writer import write_shards

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session", autouse=True)
def private_fid_cache(tmp_path_factory) -> Path:
    """FID reference statistics that tests compute go to a temporary folder, not the user's ~/.cache: every run's
    toy shards are new files, so each run would leave another ~33 MB entry there."""
    folder = tmp_path_factory.mktemp("gen_lightning_cache")
    os.environ["GEN_LIGHTNING_CACHE"] = str(folder)
    return folder


COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30)}
SHAPES = ("circle", "square")


def shape_png(color: str, shape: str, size: int = 32, jitter: int = 0) -> bytes:
    """A coloured shape on white: an emoji-like toy image whose caption says what it shows."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 4 + jitter, size // 4, 3 * size // 4 + jitter, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def toy_samples(n: int, size: int = 32, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        yield {
            "__key__": f"toy_{i:05d}",
            "png": shape_png(color, shape, size, jitter=rng.randint(-3, 3)),
            "txt": f"{color} {shape}",
            "json": {"color": color, "shape": shape},
        }


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory) -> Path:
    """~400 toy samples; 8 per shard so the val split (~40) has >= 4 shards for 2 ranks × 2 workers."""
    out = tmp_path_factory.mktemp("toy_shards")
    write_shards(toy_samples(400), out, samples_per_shard=8, val_fraction=0.1, source={"name": "toy"})
    return out


REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE, WORLD_CONTEXT = 16, 2


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> tuple[Path, Path]:
    """World-model shards of the Pillow toy desktop (tests/world_toy.py) as (train folder, val folder): 12 training
    episodes, 4 held-out ones, 20 steps each, 16 px frames, 2 context frames."""
    from tests.world_toy import toy_world_samples

    root = tmp_path_factory.mktemp("toy_world")
    train, val = root / "train", root / "val"
    samples = toy_world_samples(12, 20, WORLD_CONTEXT, WORLD_SIZE)
    write_shards(samples, train, samples_per_shard=40, val_fraction=0.0)
    held_out = toy_world_samples(4, 20, WORLD_CONTEXT, WORLD_SIZE, seed=1)
    write_shards(held_out, val, samples_per_shard=20, val_fraction=1.0)
    return train, val


def save_checkpoint(model, path: Path) -> Path:
    """The parts of a Lightning checkpoint that models.loading reads, without a Trainer (for a fast fixture)."""
    import torch

    cls = type(model)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "gen_lightning": {"class_path": f"{cls.__module__}.{cls.__qualname__}", "format": cls.checkpoint_format},
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def tiny_vae_checkpoint(tmp_path_factory) -> Path:
    """An untrained VAE (f=2, 4 latent channels) as a first stage for latent-diffusion tests."""
    import torch

    from gen_lightning.models.vae import VAEModel

    torch.manual_seed(0)
    vae = VAEModel(autoencoder={"channels": [8, 8], "latent_channels": 4, "num_heads": 1}, image_size=16)
    return save_checkpoint(vae, tmp_path_factory.mktemp("vae") / "vae.ckpt")


@pytest.fixture(scope="session")
def tiny_teacher_checkpoint(tmp_path_factory) -> Path:
    """An untrained 16 px DiffusionModel (v prediction, cosine schedule, as the demo's) as a distillation teacher,
    its EMA weights made different from the raw ones so a test can tell which the student starts from."""
    import torch

    from gen_lightning.models.diffusion import DiffusionModel

    torch.manual_seed(0)
    teacher = DiffusionModel(
        unet={"channels": [8, 16], "attention_levels": [], "num_heads": 2}, image_size=16, schedule="cosine",
        prediction_type="v",
    )  # fmt: skip
    with torch.no_grad():
        for p in teacher.ema.shadow.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return save_checkpoint(teacher, tmp_path_factory.mktemp("teacher") / "teacher.ckpt")


def toy_data_args(shards: Path, root: Path, config: str) -> list[str]:
    """`config` pointed at toy shards and `root`, 16 px batches of 4 in the main process."""
    return [
        "--config",
        str(REPO / config),
        f"--trainer.default_root_dir={root}",
        f"--data.train={shards}",
        f"--data.val={shards}",
        "--data.image_size=16",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--data.shuffle_buffer=8",
    ]


def tiny_fit_args(shards: Path, root: Path, *extra: str, config: str = "configs/ddpm_emoji.yaml") -> list[str]:
    """CLI arguments for a seconds-long fit of a tiny UNet on toy shards."""
    return [
        *toy_data_args(shards, root, config),
        "--model.init_args.unet.channels=[8, 16]",
        "--model.init_args.unet.attention_levels=[1]",
        "--model.init_args.unet.num_heads=2",
        "--model.init_args.sample_steps=3",
        *extra,
    ]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of exactly these (name, bytes) members, in this order (for malformed shards the writer refuses)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
