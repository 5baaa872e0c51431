"""End to end through `gen-lightning`: fast_dev_run of every config, a real W&B offline run read back from its own
files, sampling from the checkpoint, and a real 2-process DDP (gloo) fit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gen_lightning.cli import main
from gen_lightning.models.loading import CheckpointError, load_model
from tests.conftest import REPO, WORLD_CONTEXT, WORLD_SIZE, tiny_fit_args
from tests.wandb_reader import history

CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_fast_dev_run_of_every_config(
    config, toy_shards, toy_world, tmp_path, tiny_vae_checkpoint, tiny_teacher_checkpoint
):
    """Every experiment config runs one train + val batch on real shards (data pointed at the toy set), and leaves its
    (empty) run folder empty: no checkpoint, W&B run, run file, config or sample grid."""
    # A config whose model needs a trained first stage gets the tiny one (the real one comes from another config);
    # the world model gets world-model shards (the toy desktop).
    train, val = (toy_shards, toy_shards)
    needs = (
        {config: [f"--model.init_args.vae_checkpoint={tiny_vae_checkpoint}"]}
        if config.startswith("configs/ldm")
        else {}
    )
    if config.startswith("configs/distill"):  # a student of the tiny 16 px teacher
        needs[config] = [f"--model.init_args.teacher_checkpoint={tiny_teacher_checkpoint}", "--data.image_size=16"]
    if config.startswith("configs/world_model"):
        train, val = toy_world
        needs[config] = [f"--data.image_size={WORLD_SIZE}", f"--model.init_args.context_frames={WORLD_CONTEXT}"]
    main(
        [
            "fit",
            "--config",
            str(REPO / config),
            f"--trainer.default_root_dir={tmp_path}",
            f"--data.train={train}",
            f"--data.val={val}",
            "--data.batch_size=2",
            "--data.num_workers=0",
            "--trainer.fast_dev_run=1",
            *needs.get(config, []),
        ]
    )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_run(toy_shards, tmp_path_factory) -> Path:
    """A 6-step fit that logs every step, draws a grid every 3 steps and checkpoints: shared by the tests below. The
    callbacks sample with fast samplers chosen by their config option."""
    root = tmp_path_factory.mktemp("tiny_run")
    main(
        [
            "fit",
            *tiny_fit_args(toy_shards, root),
            "--trainer.max_steps=6",
            "--trainer.log_every_n_steps=1",
            "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=2",
            "--trainer.callbacks+=gen_lightning.callbacks.SampleGrid",
            "--trainer.callbacks.every_n_steps=3",
            "--trainer.callbacks.num_samples=4",
            "--trainer.callbacks.steps=2",
            "--trainer.callbacks.sampler=dpm++",
            "--trainer.callbacks+=gen_lightning.callbacks.GenerativeEvaluation",
            "--trainer.callbacks.every_n_steps=3",
            "--trainer.callbacks.num_samples=4",
            "--trainer.callbacks.steps=2",
            "--trainer.callbacks.sampler=heun",
            "--trainer.callbacks.max_real=8",
            f"--trainer.callbacks.cache_dir={root / 'fid_cache'}",
        ]
    )
    return root


def test_wandb_offline_run_has_loss_and_sample_grid(tiny_run):
    (run_dir,) = (tiny_run / "wandb").glob("offline-run-*")
    rows = history(run_dir)
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    logged = sorted({key for row in rows for key in row})
    assert len(losses) >= 5 and all(0 < loss < 10 for loss in losses), (losses, len(rows))
    for key in ("train/samples_per_sec", "lr-AdamW", "val/loss"):
        assert key in logged, logged
    grids = [
        row["samples/grid/filenames"][0]
        for row in rows
        if row.get("trainer/global_step") == 6
        and row.get("samples/grid/count") == 1
        and row.get("samples/grid/width") == 38
    ]
    assert grids, [
        (r.get("trainer/global_step"), r.get("samples/grid/width")) for r in rows if "samples/grid/count" in r
    ]
    image_path = run_dir / "files" / grids[-1]
    with Image.open(image_path) as grid:
        # 4 samples of 16×16 in a 2×2 grid with 2-pixel padding
        assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    assert (tiny_run / "samples" / "step_0000006.png").is_file()


@pytest.mark.slow
def test_fid_and_kid_during_training_land_in_wandb(tiny_run):
    (run_dir,) = (tiny_run / "wandb").glob("offline-run-*")
    rows = [row for row in history(run_dir) if "val/fid" in row]
    assert [row["trainer/global_step"] for row in rows] == [3, 6]
    assert all(row["val/fid"] > 0 and "val/kid" in row for row in rows)
    (cached,) = (tiny_run / "fid_cache").glob("*.pt")  # the reference statistics were computed once and cached
    assert torch.load(cached, weights_only=True)["real_features_num_samples"] == 8


@pytest.mark.slow
def test_evaluate_cli_writes_report_and_reuses_reference(tiny_run, toy_shards, tmp_path, capsys):
    import json

    args = [
        "evaluate",
        "--ckpt",
        str(tiny_run / "checkpoints" / "last.ckpt"),
        "--data",
        str(toy_shards),
        "--num-samples",
        "6",
        "--steps",
        "2",
        "--max-real",
        "8",
        "--num-workers",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "report.json"),
    ]
    main(args)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fid"] > 0 and report["num_samples"] == 6 and report["num_real"] == 8
    assert report["reference_cached"] is False and len(report["extractor_sha256"]) == 64
    main(args)
    again = json.loads((tmp_path / "report.json").read_text())
    assert again["reference_cached"] is True
    assert again["fid"] == pytest.approx(report["fid"], rel=1e-6)  # same seed, same reference: same number
    assert again["fid_floor"] == report["fid_floor"] and len(list((tmp_path / "cache").glob("*.floor.json"))) == 1
    main([*args, "--no-kid"])  # the floor measured with KID serves a --no-kid call: no second floor file
    without_kid = json.loads((tmp_path / "report.json").read_text())
    assert without_kid["fid_floor"] == report["fid_floor"] and "kid_floor" not in without_kid
    assert len(list((tmp_path / "cache").glob("*.floor.json"))) == 1


@pytest.mark.slow
def test_evaluate_reports_the_fid_floor_of_as_many_training_images(tiny_run, toy_shards, tmp_path):
    """fid_floor is the FID of --num-samples training images spread over the split (every k-th in shard order,
    centre-cropped) against the same reference, here recomputed from the tar files with the metric alone; --floor-data
    none leaves it out."""
    import json
    import random
    import tarfile

    from PIL import Image

    from gen_lightning.data.decode import ImageTransform
    from gen_lightning.metrics.generative import GenerativeMetrics
    from gen_lightning.metrics.inception import FIDInceptionV3

    ckpt, report_path = tiny_run / "checkpoints" / "last.ckpt", tmp_path / "report.json"
    size = int(load_model(ckpt).hparams.image_size)
    common = ["--ckpt", str(ckpt), "--data", str(toy_shards), "--num-samples", "6", "--steps", "2", "--max-real", "8",
              "--num-workers", "0", "--cache-dir", str(tmp_path / "cache"), "--out", str(report_path)]  # fmt: skip
    main(["evaluate", *common])
    report = json.loads(report_path.read_text())

    def every_kth_image(split: str, count: int, k: int = 1) -> torch.Tensor:
        images = []
        for shard in sorted(toy_shards.glob(f"{split}-*.tar")):
            with tarfile.open(shard) as tar:
                for member in (m for m in tar.getmembers() if m.name.endswith(".png")):  # in tar order, as read
                    with Image.open(tar.extractfile(member)) as image:
                        images.append(ImageTransform(size)(image, random.Random(0)))
            if len(images[::k]) >= count:
                return torch.stack(images[::k][:count])
        raise AssertionError(f"fewer than {count} {split} images")

    metrics = GenerativeMetrics(FIDInceptionV3(), kid=True)
    train_count = json.loads((toy_shards / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    metrics.update(every_kth_image("val", 8), real=True)
    metrics.update(every_kth_image("train", 6, k=train_count // 6), real=False)  # 360 // 6: images 0, 60, ..., 300
    expected = metrics.compute()
    assert report["fid_floor"] == pytest.approx(expected["fid"], rel=1e-4)
    assert report["kid_floor"] == pytest.approx(expected["kid"], rel=1e-4, abs=1e-6)
    assert report["fid_floor"] != pytest.approx(report["fid"], rel=1e-3)  # the model's FID is not the floor's

    main(["evaluate", *common, "--floor-data", "none"])
    assert "fid_floor" not in json.loads(report_path.read_text())


def test_checkpoint_holds_ema_and_loads_weights_only(tiny_run):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["global_step"] == 6
    assert any(key.startswith("ema.shadow.") for key in raw["state_dict"])
    model = load_model(ckpt)
    ema_weight = model.ema.shadow.out_conv.weight
    assert not torch.equal(ema_weight, model.net.out_conv.weight)  # EMA differs from the raw weights
    assert torch.count_nonzero(ema_weight) > 0  # and was trained (the output conv starts at zero)


def test_sample_cli_writes_grid(tiny_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    main(
        ["sample", "--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), "--n", "6", "--steps", "3", "--out", str(out)]
    )
    with Image.open(out) as grid:
        assert grid.size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)  # 6 images: 3 per row, 2 rows
        pixels = torch.from_numpy(np.asarray(grid.convert("L"), dtype=np.float32))
    assert pixels.std() > 1.0  # not a blank image
    assert "wrote" in capsys.readouterr().out


def test_sample_cli_clip_sample_overrides_the_checkpoints(tiny_run, tmp_path, capsys):
    def grid(*extra: str) -> np.ndarray:
        out = tmp_path / f"grid{len(extra)}{extra[-1] if extra else ''}.png"
        main(["sample", "--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), "--n=4", "--steps=3", "--seed=1",
              f"--out={out}", *extra])  # fmt: skip
        with Image.open(out) as image:
            return np.asarray(image, dtype=np.int16)

    clipped = grid()  # the checkpoint's 1.0
    assert np.array_equal(grid("--clip-sample", "1"), clipped)
    # Predicted images bounded to ±0.001: the last step returns them, so the grid is mid-grey, whatever the model.
    tight = grid("--clip-sample", "0.001")
    assert abs(np.median(tight) - 127.5) <= 1 and np.abs(tight - clipped).max() > 0
    for bad in ("0", "nan"):
        with pytest.raises(SystemExit):
            grid("--clip-sample", bad)
        assert f"argument --clip-sample: '{bad}': expected a positive number or 'none'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # eta is DDIM's: with DDPM it would be ignored
        grid("--sampler", "ddpm", "--eta", "0.5")
    assert "--eta is DDIM's noise scale" in capsys.readouterr().err


def test_sample_cli_with_a_fast_sampler(tiny_run, tmp_path, capsys):
    ckpt = str(tiny_run / "checkpoints" / "last.ckpt")
    for name in ("dpm++", "ddim"):
        main(["sample", "--ckpt", ckpt, "--sampler", name, "--steps", "10", "--n=4", "--seed=1",
              f"--out={tmp_path / name}.png"])  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    with Image.open(tmp_path / "dpm++.png") as fast, Image.open(tmp_path / "ddim.png") as ddim:
        fast_pixels, ddim_pixels = np.asarray(fast, dtype=np.int16), np.asarray(ddim, dtype=np.int16)
    assert fast_pixels.shape == ddim_pixels.shape == (38, 38, 3) and np.abs(fast_pixels - ddim_pixels).max() > 0
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", ckpt, "--sampler", "lms", f"--out={tmp_path / 'x.png'}"])
    assert "invalid choice: 'lms'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"sampler 'flow_euler' integrates model.objective='flow'"):
        main(["sample", "--ckpt", ckpt, "--sampler", "flow_euler", f"--out={tmp_path / 'x.png'}"])


def test_validate_subcommand_on_the_checkpoint(tiny_run, toy_shards, tmp_path, capsys):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    main(
        [
            "validate",
            *tiny_fit_args(toy_shards, tmp_path),
            f"--ckpt_path={ckpt}",
            "--trainer.limit_val_batches=2",
            "--trainer.logger=false",
        ]
    )
    printed = capsys.readouterr().out
    match = re.search(r"val/loss\W+([0-9][0-9.eE+-]*)", printed)  # Lightning's results table
    assert match, printed
    value = float(match.group(1))
    assert 0.0 < value < 10.0


def test_load_model_rejects_foreign_and_truncated_checkpoints(tiny_run, tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not written by a gen_lightning model"):
        load_model(foreign)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((tiny_run / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt"):
        load_model(truncated)


def test_fit_with_missing_shards_fails_before_training(tmp_path, capsys):
    pattern = str(tmp_path / "none-{000..009}.tar")
    with pytest.raises(ValueError, match=r"none-\{000\.\.009\}\.tar.*matches no file"):
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs/ddpm_emoji.yaml"),
                f"--data.train={pattern}",
                "--data.samples_per_epoch=8",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.fast_dev_run=1",
            ]
        )
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_two_process_ddp_fit_on_cpu(toy_shards, tmp_path):
    """A real 2-process DDP (gloo) fit, in its own interpreter (two DDP fits in one process clash on the port)."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    args = tiny_fit_args(
        toy_shards,
        tmp_path,
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2",
    )
    subprocess.run(
        [sys.executable, "-m", "gen_lightning.cli", "fit", *args], check=True, timeout=300, env=env, cwd=REPO
    )
    raw = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert raw["global_step"] == 4
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")  # one W&B run, from rank 0 only
    assert any("val/loss" in row for row in history(run_dir))


def test_every_model_documents_its_options_for_the_cli_help():
    """LightningCLI's `--model.help` reads each option's text from the class docstring's Args: a statement placed
    above the docstring turns it into a plain expression and the help loses every description."""
    from gen_lightning import models

    classes = [getattr(models, name) for name in models.__all__ if name != "GenerativeModule"]
    assert len(classes) >= 6
    for cls in classes:
        assert cls.__doc__ is not None and "Args" in cls.__doc__, cls.__name__
