"""The world model: decoding of world-model samples, the action-conditioned model, its metrics and its evaluation
callback in a real fit (on the Pillow toy desktop of tests/world_toy.py; the X recorder is tested in test_ui_source)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from gen_lightning.actions import ACTION_DIM, KEYS, cursor_pixel, draw_cursor, encode_action
from gen_lightning.cli import main
from gen_lightning.data.datamodule import ShardDataModule
from gen_lightning.data.decode import ImageTransform, SkipCounter, decode_and_batch, read_tar_samples
from gen_lightning.data.shard_writer import write_shards
from gen_lightning.errors import UserInputError
from gen_lightning.metrics.world import MeanVector, WorldMetrics, cursor_hits, cursor_positions, episodes_from, psnr
from gen_lightning.models.loading import load_model
from gen_lightning.models.world_model import CHANGE_THRESHOLD, NextFrame, WorldModel
from gen_lightning.nn.world_unet import cursor_map
from tests.conftest import REPO, WORLD_CONTEXT, WORLD_SIZE
from tests.test_datamodule import free_port
from tests.wandb_reader import history
from tests.world_toy import toy_frame, toy_world_samples

SIZE, CONTEXT = WORLD_SIZE, WORLD_CONTEXT


def tiny_world_model(**kwargs) -> WorldModel:
    torch.manual_seed(0)
    unet = {"channels": [8, 16], "attention_levels": [], "num_heads": 2}
    return WorldModel(unet=unet, image_size=SIZE, context_frames=CONTEXT, sample_steps=2, **kwargs)


def val_batches(folder: Path, batch_size: int = 8) -> list[dict]:
    data = ShardDataModule(val=str(folder), image_size=SIZE, val_batch_size=batch_size, num_workers=0)
    data.setup("validate")
    return list(data.val_dataloader())


# --- data -------------------------------------------------------------------------------------------------------------
def test_batches_carry_context_frames_and_encoded_actions(toy_world):
    batch = val_batches(toy_world[1])[0]
    assert batch["frames"].shape == (8, CONTEXT, 3, SIZE, SIZE)
    assert batch["image"].shape == (8, 3, SIZE, SIZE)
    assert batch["action"].shape == (8, ACTION_DIM)
    # The newest context frame of step t is the next frame of step t-1 (same episode, consecutive t).
    metas = batch["meta"]
    for i in range(1, 8):
        if metas[i]["episode"] == metas[i - 1]["episode"] and metas[i]["t"] == metas[i - 1]["t"] + 1:
            assert torch.equal(batch["frames"][i, -1], batch["image"][i - 1])
            break
    else:
        pytest.fail("no consecutive steps in the first val batch")
    # The action's cursor is where the sprite is drawn in the next frame.
    found, at = cursor_positions(batch["image"])
    tips = [cursor_pixel(float(a[0]), float(a[1]), SIZE, SIZE) for a in batch["action"]]
    assert found.all()
    for (tip_x, tip_y), (cx, cy) in zip(tips, at.tolist(), strict=True):
        assert tip_x <= cx <= tip_x + 3 and tip_y <= cy <= tip_y + 5


def test_bad_action_json_is_skipped_and_counted(tmp_path):
    samples = list(toy_world_samples(1, 4, CONTEXT, SIZE))
    samples[1]["action.json"] = {"x": 3.0, "y": 0.5}  # outside the frame
    samples[2]["action.json"] = "not json at all"
    del samples[3]["context.png"]
    write_shards(samples, tmp_path, samples_per_shard=10, val_fraction=0.0)
    skips = SkipCounter("test")
    raw = read_tar_samples([{"url": str(tmp_path / "train-000000.tar")}], skips)
    batches = list(decode_and_batch(raw, ImageTransform(SIZE), 8, random.Random(0), True, skips))
    assert len(batches) == 1 and len(batches[0]["__key__"]) == 1
    assert batches[0]["skipped"] == 3


def test_action_encoding_names_the_problem():
    vector = encode_action({"x": 0.25, "y": 1.0, "button": 1, "click": 0, "key": "Return"})
    assert vector[:4].tolist() == [0.25, 1.0, 1.0, 0.0]
    assert vector[4 + KEYS.index("Return")] == 1 and vector[4:].sum() == 1
    with pytest.raises(UserInputError, match="key 'F13'"):
        encode_action({"x": 0.1, "y": 0.1, "key": "F13"}, "sample e1")
    with pytest.raises(UserInputError, match="sample e1: cursor"):
        encode_action({"x": -0.1, "y": 0.1}, "sample e1")


# --- model ------------------------------------------------------------------------------------------------------------
def test_cursor_map_peaks_at_the_cursor_tip():
    action = torch.zeros(2, ACTION_DIM)
    action[0, :2] = torch.tensor([0.0, 0.0])
    action[1, :2] = torch.tensor([0.5, 0.75])
    bumps = cursor_map(action, 16, 16, sigma=1.5)
    assert bumps.shape == (2, 1, 16, 16)
    assert bumps[0, 0].argmax().item() == 0
    assert divmod(bumps[1, 0].argmax().item(), 16) == (12, 8)  # (row, col) = (0.75·16, 0.5·16)
    assert bumps.max() == 1.0


def test_unet_input_is_noisy_next_plus_context_plus_cursor_channel():
    assert tiny_world_model().net.unet.config.in_channels == 3 * (CONTEXT + 1) + 1
    model = tiny_world_model(click_maps=True)
    assert model.net.unet.config.in_channels == 3 * (CONTEXT + 1) + 3
    frames = torch.zeros(2, CONTEXT, 3, SIZE, SIZE)
    action = torch.stack(
        [encode_action({"x": 0.5, "y": 0.5, "click": 1}), encode_action({"x": 0.5, "y": 0.5, "button": 1})]
    )
    spatial, cond = model.net.conditioning(frames, action, torch.zeros(2))
    bump, held, clicked = spatial[:, -3], spatial[:, -2], spatial[:, -1]
    assert torch.equal(clicked[0], bump[0]) and not clicked[1].any()  # a click is drawn where the cursor is
    assert torch.equal(held[1], bump[1]) and not held[0].any()
    assert cond.shape == (2, ACTION_DIM + 1)
    assert model.net.unet.config.cond_dim == ACTION_DIM + 1


def test_key_kernels_stamp_the_pressed_keys_kernel_where_the_network_draws_its_map():
    model = tiny_world_model(key_kernels=2, key_kernel_size=3)
    net = model.net
    assert net.unet.config.out_channels == 3 + 2  # the frame, then the two maps
    maps = torch.zeros(2, 2, SIZE, SIZE)
    maps[:, 1, 4, 5] = 1.0  # map 1 marks one pixel in both samples
    action = torch.stack([encode_action({"x": 0.5, "y": 0.5, "key": "b"}), encode_action({"x": 0.5, "y": 0.5})])
    stamped = net.stamp(maps, action)
    kernels = net.key_kernel[KEYS.index("b") - 1].view(3, 2, 3, 3)  # row 0 is the first real key
    # conv2d correlates, so a single marked pixel comes out as the kernel turned by 180°, centred on it
    torch.testing.assert_close(stamped[0, :, 3:6, 4:7], kernels[:, 1].flip(-1, -2))
    outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
    outside[3:6, 4:7] = False
    assert not stamped[0][:, outside].any()
    assert not stamped[1].any()  # no key pressed: nothing stamped

    # In the network: the maps come from the UNet, and only the pressed key's kernels learn.
    torch.nn.init.normal_(net.unet.out_conv.weight, std=0.1)
    frames, x = torch.rand(2, CONTEXT, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    out = net(x, torch.tensor([10, 10]), frames=frames, action=action, noise_level=torch.zeros(2))
    assert out.shape == (2, 3, SIZE, SIZE)
    out.square().sum().backward()
    pressed = KEYS.index("b") - 1
    assert net.key_kernel.grad[pressed].abs().sum() > 0
    assert not torch.cat([net.key_kernel.grad[:pressed], net.key_kernel.grad[pressed + 1 :]]).any()
    with pytest.raises(ValueError, match=r"model\.key_kernel_size=4"):
        tiny_world_model(key_kernels=1, key_kernel_size=4)
    assert not hasattr(tiny_world_model().net, "key_kernel")  # off by default: older checkpoints load as they were


def test_context_noise_augmentation_only_in_training():
    model = tiny_world_model(context_noise=0.5, sample_context_noise=0.1)
    frames = torch.zeros(256, CONTEXT, 3, SIZE, SIZE)
    noisy, levels = model.noisy_context(frames, training=True)
    assert levels.min() >= 0 and levels.max() <= 0.5 and levels.std() > 0.1
    per_sample_std = noisy.flatten(1).std(1)
    assert torch.allclose(per_sample_std, levels, atol=0.03)
    noisy, levels = model.noisy_context(frames, training=False)
    assert torch.all(levels == 0.1)
    with pytest.raises(ValueError, match="sample_context_noise"):
        tiny_world_model(context_noise=0.2, sample_context_noise=0.3)


def test_action_changes_the_prediction_and_rollout_feeds_predictions_back():
    model = tiny_world_model()
    torch.nn.init.normal_(model.net.unet.out_conv.weight, std=0.1)  # zero-initialised: every action predicts alike
    model.ema.copy_from(model.net)
    frames = torch.rand(1, CONTEXT, 3, SIZE, SIZE) * 2 - 1
    left = {"x": 0.1, "y": 0.1, "button": 0, "click": 1, "key": ""}
    right = {"x": 0.9, "y": 0.9, "button": 0, "click": 0, "key": "a"}

    def predict(context, action):
        return model.sample(1, NextFrame(context, [action]), generator=torch.Generator().manual_seed(0))

    assert not torch.allclose(predict(frames, left), predict(frames, right))
    actions = torch.stack([encode_action(left), encode_action(right)])[None]
    rolled = model.rollout(frames, actions, generator=torch.Generator().manual_seed(0))
    first = predict(frames, left)
    # The generator is shared across the two steps of the rollout: replay the same draws by hand.
    generator = torch.Generator().manual_seed(0)
    step1 = model.sample(1, NextFrame(frames, [left]), generator=generator)
    step2 = model.sample(1, NextFrame(torch.cat([frames[:, 1:], step1[:, None]], 1), [right]), generator=generator)
    assert torch.allclose(rolled[:, 0], first) and torch.allclose(rolled[:, 1], step2)

    # The sampler reaches every rollout step (WorldModelEvaluation and `evaluate --sampler` rely on it).
    def one_step_rollout(**sampling) -> torch.Tensor:
        return model.rollout(frames, actions[:, :1], steps=3, generator=torch.Generator().manual_seed(0), **sampling)

    ddpm = one_step_rollout(sampler="ddpm")
    by_hand = model.sample(
        1, NextFrame(frames, [left]), steps=3, sampler="ddpm", generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(ddpm[:, 0], by_hand) and not torch.allclose(ddpm, one_step_rollout(sampler="ddim"))


def test_delta_target_diffuses_the_change_and_reconstructs_the_frame(toy_world):
    batch = val_batches(toy_world[1])[0]
    delta_model, frame_model = tiny_world_model(target="delta"), tiny_world_model()
    change = delta_model.diffusion_input(batch)
    assert torch.equal(change, (batch["image"] - batch["frames"][:, -1]) / 2) and change.abs().max() <= 1
    assert torch.allclose(delta_model.to_frame(change, batch["frames"]), batch["image"], atol=1e-6)
    assert torch.equal(frame_model.diffusion_input(batch), batch["image"])
    # A zero change leaves every pixel of the newest context frame exactly as it was.
    assert torch.equal(delta_model.to_frame(torch.zeros_like(change), batch["frames"]), batch["frames"][:, -1])
    with pytest.raises(ValueError, match=r"model\.target"):
        tiny_world_model(target="residual")


def test_change_weight_favours_pixels_that_differ_from_the_newest_context_frame():
    frames = torch.full((2, CONTEXT, 3, SIZE, SIZE), -1.0)
    image = frames[:, -1].clone()
    image[0, :, 5, 7] = 1.0  # sample 0: one pixel changes; sample 1: nothing changes
    image[1, :, 2, 2] = -1.0 + CHANGE_THRESHOLD / 2  # below the threshold: "not changed"
    batch = {"image": image, "frames": frames, "action": torch.zeros(2, ACTION_DIM)}
    assert tiny_world_model().pixel_weight(batch) is None  # change_weight 0: the plain loss
    weight = tiny_world_model(change_weight=4.0).pixel_weight(batch)
    assert weight.shape == (2, 1, SIZE, SIZE)
    torch.testing.assert_close(weight.mean(dim=(1, 2, 3)), torch.ones(2))
    changed = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    changed[4:7, 6:9] = True  # the changed pixel grown by one pixel on each side
    assert torch.allclose(weight[0, 0][changed], 5 * weight[0, 0][~changed].max())
    assert torch.equal(weight[0, 0][~changed], torch.full(((~changed).sum(),), float(weight[0, 0, 0, 0])))
    assert torch.equal(weight[1], torch.ones(1, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"model\.change_weight"):
        tiny_world_model(change_weight=-1.0)


@pytest.mark.parametrize("target", ["delta", "frame"])
def test_snap_unchanged_keeps_pixels_whose_predicted_change_is_small(target):
    frames = torch.rand(1, CONTEXT, 3, SIZE, SIZE) * 2 - 1
    last = frames[:, -1]
    predicted = last.clone()
    predicted[0, 1, 3, 4] += 0.05  # drift below the threshold in one channel: snapped back
    predicted[0, :, 6, 6] += 0.02  # in every channel, each below it: snapped back
    predicted[0, 2, 9, 1] += 0.3  # a real change in one channel: the whole pixel is kept as predicted
    predicted = predicted.clamp(-1, 1)
    sampled = predicted if target == "frame" else (predicted - last) / 2
    kept = tiny_world_model(target=target).to_frame(sampled, frames)
    torch.testing.assert_close(kept, predicted)  # off by default
    snapped = tiny_world_model(target=target, snap_unchanged=0.1).to_frame(sampled, frames)
    expected = last.clone()
    expected[0, :, 9, 1] = predicted[0, :, 9, 1]
    torch.testing.assert_close(snapped, expected)
    with pytest.raises(ValueError, match=r"model\.snap_unchanged"):
        tiny_world_model(snap_unchanged=-0.1)


def test_missing_world_members_name_the_recorder():
    model = tiny_world_model()
    with pytest.raises(UserInputError, match="shards ui"):
        model.condition({"image": torch.zeros(1, 3, SIZE, SIZE)}, training=True)
    with pytest.raises(UserInputError, match="context_frames"):
        model.check_batch({"frames": torch.zeros(1, 3, 3, SIZE, SIZE), "action": torch.zeros(1, ACTION_DIM)})


# --- metrics ----------------------------------------------------------------------------------------------------------
def to_tensor(image) -> torch.Tensor:
    from gen_lightning.images import pil_to_tensor

    return pil_to_tensor(image)[None]


def test_cursor_hits_within_tolerance_only():
    real = to_tensor(toy_frame(32, False, 0.5, 0.5))
    near = to_tensor(toy_frame(32, False, 0.5 + 1.5 / 32, 0.5))
    far = to_tensor(toy_frame(32, False, 0.1, 0.9))
    from PIL import Image

    no_cursor = to_tensor(Image.new("RGB", (32, 32), "white"))
    assert cursor_hits(near, real, tolerance=2).item() == 1
    assert cursor_hits(far, real, tolerance=2).item() == 0
    assert cursor_hits(no_cursor, real, tolerance=2).item() == 0
    assert torch.isnan(cursor_hits(real, no_cursor, tolerance=2)).all()  # no cursor to find: not scored
    drawn = to_tensor(draw_cursor(Image.new("RGB", (32, 32), (200, 40, 40)), 0.25, 0.25))  # red app pixels ignored
    found, at = cursor_positions(drawn)
    assert found.item() and 8 <= at[0, 0] <= 11 and 8 <= at[0, 1] <= 13


def test_world_metrics_psnr_baseline_and_nan_handling():
    real = to_tensor(toy_frame(16, True, 0.5, 0.5))
    off = to_tensor(toy_frame(16, False, 0.5, 0.5))
    metrics = WorldMetrics(rollout_steps=2)
    metrics.update_one_step(real, real, off)
    results = metrics.compute()
    assert results["psnr"] == 100.0  # exact prediction, capped
    assert results["psnr_copy_last"] == pytest.approx(psnr(off, real).item())
    assert results["ssim"] == pytest.approx(1.0) and results["cursor_accuracy"] == 1.0
    metrics.update_rollout(torch.stack([real, off], 1), torch.stack([real, real], 1), off)
    results = metrics.compute()
    assert results["rollout_psnr_t01"] == 100.0 and results["rollout_psnr_t02"] == pytest.approx(psnr(off, real).item())
    assert results["rollout_psnr_copy_first"] == pytest.approx(psnr(off, real).item())
    assert results["rollout_psnr_copy_first_t02"] == pytest.approx(psnr(off, real).item())
    assert results["rollout_steps_above_copy_first"] == 1  # step 1 exact, step 2 the same frame as keeping the start
    metrics.update_rollout(torch.stack([off, off], 1), torch.stack([real, off], 1), real)
    results = metrics.compute()  # per step over both rollouts: step 1 a tie (not above), step 2 the model's
    half_exact = (psnr(off, real).item() + 100) / 2
    assert results["rollout_psnr_copy_first_t01"] == pytest.approx(half_exact) == results["rollout_psnr_t01"]
    assert results["rollout_psnr_copy_first_t02"] == pytest.approx(psnr(off, real).item())
    assert results["rollout_steps_above_copy_first"] == 1 and results["rollout_psnr_t02"] == pytest.approx(half_exact)
    mean = MeanVector(2)
    mean.update(torch.tensor([[1.0, float("nan")], [3.0, 2.0]]))
    assert mean.compute().tolist() == [2.0, 2.0]


def test_two_process_world_metrics_equal_single_process(tmp_path):
    # The callback's metrics on several ranks: each rank scores its share (here 5 and 3 samples), torchmetrics sums
    # the sums and counts; the result must equal one process scoring all of them.
    generator = torch.Generator().manual_seed(0)
    real = torch.stack([to_tensor(toy_frame(16, i % 2 == 0, 0.2 + 0.08 * i, 0.5)) for i in range(8)])[:, 0]

    def noisy(frames: torch.Tensor, level: float) -> torch.Tensor:
        return (frames + level * torch.randn(frames.shape, generator=generator)).clamp(-1, 1)

    data = {
        "split": 5,
        "predicted": noisy(real, 0.2),
        "real": real,
        "last": noisy(real, 0.1),
        "rollout_predicted": noisy(real[:, None].expand(8, 3, *real.shape[1:]), 0.3),
        "rollout_real": noisy(real[:, None].expand(8, 3, *real.shape[1:]), 0.05),
        "start": noisy(real, 0.4),
    }
    torch.save(data, tmp_path / "frames.pt")
    probe = [sys.executable, str(REPO / "tests" / "metrics_dist_probe.py"), "world", str(tmp_path / "frames.pt")]
    subprocess.run([*probe, str(tmp_path), str(free_port())], check=True, timeout=180, cwd=REPO)
    single = WorldMetrics(rollout_steps=3)
    single.update_one_step(data["predicted"], data["real"], data["last"])
    single.update_rollout(data["rollout_predicted"], data["rollout_real"], data["start"])
    expected = single.compute()
    first_rank_only = WorldMetrics(rollout_steps=3)
    first_rank_only.update_one_step(data["predicted"][:5], data["real"][:5], data["last"][:5])
    assert first_rank_only.compute()["psnr"] != pytest.approx(expected["psnr"], rel=1e-6)  # the shares differ
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-9, nan_ok=True), name


def test_episodes_are_rebuilt_in_step_order_from_shuffled_batches(toy_world):
    batches = val_batches(toy_world[1], batch_size=5)
    random.Random(0).shuffle(batches)
    episodes = episodes_from(batches, count=2, length=6)
    assert episodes["real"].shape == (2, 6, 3, SIZE, SIZE) and episodes["actions"].shape == (2, 6, ACTION_DIM)
    # Step 0's context is the episode's first screen repeated; its real next frame is step 1's newest context frame.
    by_step = {
        (meta["episode"], meta["t"]): (batch["frames"][i], batch["image"][i])
        for batch in batches
        for i, meta in enumerate(batch["meta"])
    }
    assert torch.equal(episodes["frames"][0], by_step[(0, 0)][0])
    assert torch.equal(episodes["real"][0, 0], by_step[(0, 1)][0][-1])
    assert torch.equal(episodes["real"][0, 5], by_step[(0, 5)][1])


# --- training ---------------------------------------------------------------------------------------------------------
def world_fit_args(train: Path, val: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(REPO / "configs/world_model_ui.yaml"),
        f"--trainer.default_root_dir={root}",
        f"--data.train={train}",
        f"--data.val={val}",
        f"--data.image_size={SIZE}",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--data.shuffle_buffer=8",
        f"--model.init_args.context_frames={CONTEXT}",
        "--model.init_args.unet.channels=[8, 16]",
        "--model.init_args.unet.attention_levels=[]",
        "--model.init_args.sample_steps=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def world_run(toy_world, tmp_path_factory) -> Path:
    """A 4-step fit with the world-model evaluation at the end (no FID: the Inception is tested below)."""
    train, val = toy_world
    root = tmp_path_factory.mktemp("world_run")
    main(
        world_fit_args(
            train,
            val,
            root,
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.callbacks.every_n_steps=0",
            "--trainer.callbacks.num_samples=8",
            "--trainer.callbacks.rollouts=2",
            "--trainer.callbacks.rollout_steps=3",
            "--trainer.callbacks.fid=false",
        )
    )
    return root


def test_fit_logs_world_metrics_and_strips_to_wandb(world_run):
    """A real fit: metrics, one-step and rollout strips in the offline W&B run and on disk; a loadable checkpoint."""
    (run_dir,) = (world_run / "wandb").glob("offline-run-*")
    rows = history(run_dir)
    final = {key: value for row in rows for key, value in row.items()}
    metrics = ("val/psnr", "val/psnr_copy_last", "val/ssim", "val/cursor_accuracy", "val/rollout_psnr_t03")
    for key in (*metrics, "val/rollout_psnr_copy_first"):
        assert key in final, key
    assert 0 < final["val/psnr"] < 100 and 0 <= final["val/cursor_accuracy"] <= 1
    strips = sorted((world_run / "world").glob("*.png"))
    assert [p.name.split("_", 2)[-1] for p in strips] == ["one_step.png", "rollout.png"]
    rollout = Image.open(strips[1])
    assert rollout.size == (3 * (SIZE + 2) + 2, 4 * (SIZE + 2) + 2)  # 2 episodes × (real row, predicted row) × 3 steps
    assert any("world/rollout" in key for row in rows for key in row)
    model = load_model(world_run / "checkpoints" / "last.ckpt")
    assert isinstance(model, WorldModel) and torch.isfinite(model.start_frames).all()


def test_evaluate_cli_reports_world_metrics_and_fid(world_run, toy_world, tmp_path, capsys):
    out = tmp_path / "report.json"
    main(
        [
            "evaluate",
            f"--ckpt={world_run / 'checkpoints' / 'last.ckpt'}",
            f"--data={toy_world[1]}",
            f"--floor-data={toy_world[0]}",
            "--num-samples=6",
            "--rollouts=2",
            "--rollout-steps=4",
            "--steps=2",
            "--max-real=16",
            "--num-workers=0",
            f"--cache-dir={tmp_path / 'cache'}",
            f"--out={out}",
        ]
    )
    report = json.loads(out.read_text())
    assert report["fid"] > 0 and 0 < report["psnr"] < 100 and "rollout_psnr_t04" in report
    # Beside it, the FID of 6 real training frames against the same held-out ones: the least the FID can be here.
    assert report["fid_floor"] > 0 and report["fid_floor"] != pytest.approx(report["fid"], rel=1e-3)
    assert report["psnr_copy_last"] > 0 and Path(report["strips"]["rollout"]).is_file()
    # The toy desktop is not the UI app: no state or text readings (tests/test_world_ui_metrics.py has them).
    assert report["ui_metrics"].startswith("off:") and not any(k.startswith(("state_", "text_")) for k in report)
    assert json.loads(capsys.readouterr().out) == report
    # Options for image models are refused, not silently ignored.
    with pytest.raises(SystemExit):
        main(["evaluate", f"--ckpt={world_run / 'checkpoints' / 'last.ckpt'}", f"--data={toy_world[1]}",
              "--guidance=3", "--no-kid"])  # fmt: skip
    assert "--guidance, --no-kid: not used for a world model" in capsys.readouterr().err


def test_random_flip_is_refused(toy_world, tmp_path):
    train, val = toy_world
    with pytest.raises(UserInputError, match="random_flip"):
        main(world_fit_args(train, val, tmp_path, "--trainer.fast_dev_run=1", "--data.random_flip=true"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_world_metrics_on_the_gpu_take_gpu_frames():
    """WorldModelEvaluation moves the metric states to the model's device; the values are computed on the CPU."""
    metrics = WorldMetrics(rollout_steps=2).to("cuda")
    frames = torch.rand(3, 3, 16, 16, device="cuda") * 2 - 1
    metrics.update_one_step(frames, frames, frames.flip(0))
    metrics.update_rollout(frames[:, None].expand(3, 2, 3, 16, 16), frames[:, None].expand(3, 2, 3, 16, 16), frames)
    assert metrics.compute()["psnr"] == 100.0  # an exact prediction, capped
