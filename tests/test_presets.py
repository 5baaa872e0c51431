"""configs/trainer/ presets: each resolves through the CLI into the intended strategy and precision. The GPU ones
are built here without a GPU (strategy objects only) and run for real by the GPU-only tests at the bottom."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy

from gen_lightning.cli import main
from tests.conftest import REPO, save_checkpoint, tiny_fit_args, toy_data_args
from tests.test_datamodule import free_port

PRESETS = sorted(p.stem for p in (REPO / "configs" / "trainer").glob("*.yaml"))


def resolved_trainer(preset: str, capsys) -> dict:
    experiment, trainer_preset = REPO / "configs" / "ddpm_emoji.yaml", REPO / "configs" / "trainer" / f"{preset}.yaml"
    config = ["--config", str(experiment), "--config", str(trainer_preset)]
    with pytest.raises(SystemExit):  # --print_config prints the merged config and exits
        main(["fit", *config, "--print_config"])
    # DeepSpeed's import prints "[date] [WARNING] ..." lines to stdout before the YAML
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("[")]
    return yaml.safe_load("\n".join(printed))["trainer"]


def build_strategy(value: str | dict) -> Strategy | str:
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=str | Strategy)
    return parser.instantiate_classes(parser.parse_object({"strategy": value})).strategy


def test_the_presets_are_there():
    assert PRESETS == ["cpu", "ddp-bf16", "deepspeed-zero2", "deepspeed-zero3", "fsdp"]


def test_cpu_preset_runs_a_fit(toy_shards, tmp_path):
    main(["fit", *tiny_fit_args(toy_shards, tmp_path), "--config", str(REPO / "configs/trainer/cpu.yaml"),
          "--trainer.fast_dev_run=2"])  # fmt: skip


def test_ddp_bf16_preset(capsys):
    trainer = resolved_trainer("ddp-bf16", capsys)
    assert (trainer["accelerator"], trainer["precision"]) == ("gpu", "bf16-mixed")
    strategy = build_strategy(trainer["strategy"])
    assert isinstance(strategy, DDPStrategy) and not isinstance(strategy, FSDPStrategy)
    kwargs = strategy._ddp_kwargs  # the rest are torch DDP's own defaults, filled in by the CLI
    assert kwargs["gradient_as_bucket_view"] is True and kwargs["find_unused_parameters"] is False


def test_fsdp_preset_wraps_the_blocks_our_models_are_made_of(capsys):
    from torch.distributed.fsdp import ShardingStrategy

    from gen_lightning.models import DiffusionModel
    from gen_lightning.nn.autoencoder import Autoencoder
    from gen_lightning.nn.text import TextConfig, TextEncoder

    trainer = resolved_trainer("fsdp", capsys)
    assert (trainer["accelerator"], trainer["precision"]) == ("gpu", "bf16-mixed")
    strategy = build_strategy(trainer["strategy"])
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "full"
    assert strategy.kwargs["use_orig_params"] is True
    wrapped = set(strategy.kwargs["auto_wrap_policy"]._module_classes)
    model = DiffusionModel(unet={"channels": [8, 16], "attention_levels": [1], "num_heads": 2}, image_size=16)
    text = TextEncoder(TextConfig(context_length=8, width=16, layers=1, heads=2))
    vae = Autoencoder({"channels": [8], "latent_channels": 2})
    dit = DiffusionModel(backbone="dit", dit={"width": 16, "depth": 1, "num_heads": 2}, image_size=16)
    present = {type(m) for m in [*model.modules(), *text.modules(), *vae.modules(), *dit.modules()]}
    assert wrapped <= present, f"wrap policy names classes the models no longer use: {wrapped - present}"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_presets(stage, capsys):
    trainer = resolved_trainer(f"deepspeed-zero{stage}", capsys)
    assert (trainer["accelerator"], trainer["precision"]) == ("gpu", "bf16-mixed")
    strategy = build_strategy(trainer["strategy"])
    assert isinstance(strategy, DeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage and zero["overlap_comm"] and zero["contiguous_gradients"]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


TINY_CLIP = [
    "--model.init_args.vision.width=32",
    "--model.init_args.vision.layers=1",
    "--model.init_args.text.width=32",
    "--model.init_args.text.layers=1",
    "--model.init_args.embed_dim=16",
]


@needs_gpu
@pytest.mark.parametrize("preset", ["ddp-bf16", "fsdp", "deepspeed-zero2", "deepspeed-zero3"])
def test_gpu_fit_with_preset(preset, toy_shards, tmp_path, tiny_vae_checkpoint):
    """A real bf16 fit on one GPU; a subprocess, so DeepSpeed/NCCL state does not leak. The diffusion and latent
    diffusion configs under DDP and FSDP; under DeepSpeed, CLIP (no EMA), and the diffusion config must be refused
    with the reason."""
    from tests.test_latent_diffusion import tiny_ldm_args

    preset_file = str(REPO / "configs" / "trainer" / f"{preset}.yaml")
    common = ["--config", preset_file, "--trainer.devices=1", "--trainer.max_steps=20", "--trainer.logger=false",
              "--trainer.callbacks=[]"]  # fmt: skip

    def fit(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gen_lightning.cli", "fit", *args, *common], cwd=REPO,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    diffusion = fit(tiny_fit_args(toy_shards, tmp_path / "diffusion"))
    if preset.startswith("deepspeed"):
        assert diffusion.returncode != 0 and "keeps an EMA copy" in diffusion.stderr, diffusion.stderr[-3000:]
        clip = fit([*toy_data_args(toy_shards, tmp_path / "clip", "configs/clip_emoji.yaml"), *TINY_CLIP])
        assert clip.returncode == 0, clip.stdout[-3000:] + clip.stderr[-3000:]
        assert (tmp_path / "clip" / "checkpoints" / "last.ckpt").exists()
    else:
        assert diffusion.returncode == 0, diffusion.stdout[-3000:] + diffusion.stderr[-3000:]
        assert (tmp_path / "diffusion" / "checkpoints" / "last.ckpt").exists()
        latent = fit(
            [*tiny_ldm_args(toy_shards, tiny_vae_checkpoint, tmp_path / "ldm"), "--trainer.limit_val_batches=2"]
        )
        assert latent.returncode == 0, latent.stdout[-3000:] + latent.stderr[-3000:]
        assert (tmp_path / "ldm" / "checkpoints" / "last.ckpt").exists()


def test_bf16_mixed_fit_with_gradient_clipping_on_cpu(toy_shards, tmp_path):
    """The GPU presets' precision with the configs' gradient clipping: Lightning refuses to clip for a fused AdamW
    under mixed precision, so the model must fall back to the foreach AdamW (this crashed at the first step)."""
    main(["fit", *tiny_fit_args(toy_shards, tmp_path), "--trainer.precision=bf16-mixed", "--trainer.max_steps=2",
          "--trainer.gradient_clip_val=1.0", "--trainer.logger=false", "--trainer.callbacks=[]"])  # fmt: skip
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2
    assert state["optimizer_states"][0]["param_groups"][0]["fused"] is False


@pytest.fixture(scope="module")
def fsdp_reports(tmp_path_factory, tiny_vae_checkpoint) -> dict[str, dict]:
    """tests/fsdp_probe.py on 2 CPU ranks (gloo), once for the tests below: its report per model."""
    from tests.test_clip import tiny_clip

    root = tmp_path_factory.mktemp("fsdp")
    clip = save_checkpoint(tiny_clip(), root / "clip.ckpt")
    out = root / "fsdp.json"
    probe = [sys.executable, str(REPO / "tests" / "fsdp_probe.py"), str(out), str(free_port())]
    subprocess.run([*probe, str(tiny_vae_checkpoint), str(clip)], check=True, timeout=280, cwd=REPO)
    return json.loads(out.read_text())


def trained_like_one_process(report: dict) -> None:
    assert report["missing"] == []
    assert report["ema_moved"] > 1e-4  # two (clipped) updates really changed the EMA copy
    assert report["max_weight_diff"] < 1e-5 and report["max_ema_diff"] < 1e-5
    assert report["max_output_diff"] < 1e-4


@pytest.mark.timeout(300)
def test_fsdp_preset_trains_the_unet_and_its_ema_like_one_process(fsdp_reports):
    """configs/trainer/fsdp.yaml's wrapping, on 2 CPU ranks (gloo): UNet layers wrapped in FSDP units still get their
    embedding and context, each rank's EMA update pairs its own slices of the network and of the EMA copy, and the
    weights, the EMA and the EMA copy's denoising output equal the same steps in one process."""
    trained_like_one_process(fsdp_reports["unet"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("text", ["ldm_text", "ldm_clip", "ldm_dit"])
def test_fsdp_preset_trains_latent_diffusion_like_one_process(text, fsdp_reports):
    """A whole LatentDiffusionModel under the preset's wrapping: its one network (UNet + text encoder, trainable or
    CLIP's frozen tower) and EMA copy trained with clipped steps, the frozen VAE encoder called inside the root
    forward and its decoder when sampling, guided samples drawn on every rank: weights, EMA and samples equal one
    process's, and nothing frozen moved."""
    report = fsdp_reports[text]
    trained_like_one_process(report)
    frozen = [key for key in report if key.startswith("frozen_diff")]
    assert len(frozen) == (3 if text == "ldm_clip" else 1)
    assert all(report[key] == 0.0 for key in frozen), report


@pytest.mark.parametrize("preset", PRESETS)
def test_models_refuse_strategies_they_cannot_train_under_and_say_why(preset, capsys, tiny_vae_checkpoint):
    from gen_lightning.models import DiffusionModel
    from gen_lightning.models.base import strategy_problem
    from tests.test_clip import tiny_clip
    from tests.test_latent_diffusion import tiny_ldm

    strategy = build_strategy(resolved_trainer(preset, capsys).get("strategy", "auto"))
    diffusion = DiffusionModel(unet={"channels": [8, 16], "attention_levels": [1], "num_heads": 2}, image_size=16)
    problem = strategy_problem(diffusion, strategy)
    if preset.startswith("deepspeed"):
        assert "keeps an EMA copy" in problem and "configs/trainer/fsdp.yaml" in problem
    else:
        assert problem is None
    assert strategy_problem(tiny_clip(), strategy) is None  # CLIP has no EMA: DeepSpeed is fine
    latent = strategy_problem(tiny_ldm(tiny_vae_checkpoint, latent_scale=1.0), strategy)
    assert (latent is None) == (preset in ("cpu", "ddp-bf16", "fsdp")), latent
