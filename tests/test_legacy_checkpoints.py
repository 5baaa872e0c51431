"""Checkpoints written before issue #19 (tests/fixtures/legacy, checkpoint format 1, by commit 12b3ea7) still load
and give the outputs that code gave for the same inputs (expected.pt): the key map applied at load time is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gen_lightning.cli import main
from gen_lightning.models.clip import load_clip
from gen_lightning.models.loading import load_model
from gen_lightning.models.world_model import NextFrame

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"
REPO = LEGACY.parents[2]
FAMILIES = ("ddpm", "vae", "clip", "world", "ldm_text", "ldm_clip")
PROMPTS = ["red circle", "blue square"]


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return torch.load(LEGACY / "expected.pt", weights_only=True)


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def close(actual: torch.Tensor, wanted: torch.Tensor) -> None:
    torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)


def test_the_fixtures_are_what_their_readme_says():
    readme = json.loads((LEGACY / "README.json").read_text())
    assert readme["written_by_commit"].startswith("12b3ea7") and readme["checkpoint_format"] == 1
    assert sorted(readme["fits"]) == sorted(FAMILIES)
    for name in FAMILIES:
        checkpoint = torch.load(LEGACY / f"{name}.ckpt", weights_only=True)
        assert checkpoint["gen_lightning"]["format"] == 1 and checkpoint["global_step"] == 2
        assert checkpoint["optimizer_states"], f"{name}: no optimizer state to resume from"


@torch.no_grad()
def test_legacy_diffusion_samples_as_before(expected):
    model = load_model(LEGACY / "ddpm.ckpt")
    close(model.sample(2, steps=2, generator=seeded()), expected["ddpm/sample"])
    model.ema.copy_from(model.net)  # `sample --no-ema`: the raw weights
    close(model.sample(2, steps=2, generator=seeded()), expected["ddpm/sample_raw"])


@torch.no_grad()
def test_legacy_vae_encodes_decodes_and_samples_as_before(expected):
    model = load_model(LEGACY / "vae.ckpt")
    images = expected["inputs/images"]
    close(model.encode(images), expected["vae/encode"])
    close(model.decode(model.encode(images)), expected["vae/decode"])
    close(model.sample(2, generator=seeded()), expected["vae/sample"])
    # The identity stamped on the latents it encoded: an LDM on this VAE must still accept them.
    assert model.fingerprint() == expected["vae/fingerprint"]
    stored = json.loads((LEGACY / "latents" / "manifest.json").read_text())["source"]["vae_sha256"]
    assert stored == expected["vae/fingerprint"]


@torch.no_grad()
def test_legacy_clip_embeds_as_before(expected):
    # As a model (sample/evaluate's loader) and as the network the CLIP score and latent diffusion load.
    for net in (load_model(LEGACY / "clip.ckpt").net, load_clip(LEGACY / "clip.ckpt")):
        close(net.encode_image(expected["inputs/images"]), expected["clip/image"])
        close(net.encode_text(expected["inputs/tokens"]), expected["clip/text"])
        assert net.logit_scale.shape == (1,)  # written 0-dim by 12b3ea7; reshaped on load


@torch.no_grad()
def test_legacy_world_model_predicts_and_rolls_out_as_before(expected):
    model = load_model(LEGACY / "world.ckpt")
    frames, actions = expected["inputs/frames"], expected["inputs/actions"]
    close(model.start_context(2), frames)
    close(model.sample(2, NextFrame(frames, actions[:, 0]), steps=2, generator=seeded()), expected["world/next"])
    close(model.rollout(frames, actions, steps=2, generator=seeded()), expected["world/rollout"])


@torch.no_grad()
@pytest.mark.parametrize("name", ["ldm_text", "ldm_clip"])
@pytest.mark.parametrize("guidance", [0.0, 1.0, 3.0])
def test_legacy_latent_diffusion_samples_as_before(name, guidance, expected):
    model = load_model(LEGACY / f"{name}.ckpt")
    images = model.sample(2, PROMPTS, steps=2, guidance=guidance, generator=seeded())
    close(images, expected[f"{name}/sample_w{guidance:g}"])


# Configs whose recipe changed after the fixtures were written, and the file that now holds the recipe they were
# trained with (a checkpoint resumes only under its own objective).
RECIPE_MOVED_TO = {"configs/world_model_ui.yaml": "configs/world_model_ui_vp.yaml"}


def fit_args(name: str, root: Path, shards: dict[str, Path]) -> list[str]:
    """The fixture's own fit (README.json) on data of the same kind, without its step limit."""
    fit = json.loads((LEGACY / "README.json").read_text())["fits"][name]
    config = RECIPE_MOVED_TO.get(fit["config"], fit["config"])
    common = [
        arg for arg in json.loads((LEGACY / "README.json").read_text())["common_fit_args"] if "max_steps" not in arg
    ]
    overrides = [arg.replace("tests/fixtures/legacy/", f"{LEGACY}/") for arg in fit["overrides"]]
    train, val = shards[fit["data"]]
    data = [f"--data.train={train}", f"--data.val={val}", "--data.image_size=16", "--data.batch_size=4",
            "--data.num_workers=0", "--data.shuffle_buffer=8"]  # fmt: skip
    return [
        "fit",
        "--config",
        str(REPO / config),
        f"--trainer.default_root_dir={root}",
        *data,
        *common,
        *overrides,
    ]


@pytest.fixture(scope="module")
def legacy_data(toy_shards, toy_world) -> dict[str, tuple[Path, Path]]:
    return {"toy": (toy_shards, toy_shards), "world": toy_world, "latents": (LEGACY / "latents", LEGACY / "latents")}


@pytest.mark.parametrize("name", FAMILIES)
def test_a_legacy_checkpoint_resumes_training(name, legacy_data, tmp_path):
    """fit --ckpt_path on a format-1 checkpoint: weights, EMA, optimizer (AdamW's moments, in parameter order),
    scheduler and loop state are restored, and training continues at step 3."""
    # A VAE of the old padding resumes only when asked to keep it (new VAEs pad as AutoencoderKL does, "ldm").
    keep = ["--model.init_args.autoencoder.downsample=same"] if name == "vae" else []
    resume = [f"--ckpt_path={LEGACY / f'{name}.ckpt'}", "--trainer.max_steps=3"]
    main([*fit_args(name, tmp_path, legacy_data), *keep, *resume])
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3
    adam = resumed["optimizer_states"][0]["state"]
    assert adam and {int(state["step"]) for state in adam.values()} == {3}  # restored at 2, not started again at 0
    assert resumed["lr_schedulers"][0]["last_epoch"] == 3
    if name != "clip":  # the EMA continued from its two updates
        assert int(resumed["state_dict"]["ema.num_updates"]) == 3


@pytest.mark.parametrize("name", ["ddpm", "ldm_clip", "world"])
def test_a_legacy_checkpoint_evaluates(name, legacy_data, tmp_path):
    """gen-lightning evaluate on a format-1 checkpoint (and, for latent diffusion, the legacy CLIP as the scorer)."""
    data = {"ddpm": legacy_data["toy"][1], "ldm_clip": LEGACY / "latents", "world": legacy_data["world"][1]}[name]
    report_path = tmp_path / "report.json"
    args = [f"--ckpt={LEGACY / f'{name}.ckpt'}", f"--data={data}", "--num-samples=4", "--max-real=8", "--steps=2",
            "--num-workers=0", f"--cache-dir={tmp_path / 'cache'}", f"--out={report_path}"]  # fmt: skip
    if name == "ldm_clip":
        args.append(f"--clip={LEGACY / 'clip.ckpt'}")
    if name == "world":
        args += ["--rollouts=1", "--rollout-steps=2"]
    main(["evaluate", *args])
    report = json.loads(report_path.read_text())
    assert report["fid"] > 0 and report["num_samples"] == 4
    if name == "ldm_clip":
        assert 0 <= report["clip_score"] <= 100 and report["guidance"] == 3.0
    if name == "world":
        assert 0 < report["psnr"] < 100


def test_a_legacy_checkpoint_samples_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "grid.png"
    main(["sample", f"--ckpt={LEGACY / 'ldm_text.ckpt'}", "--prompt=red circle", "--n=2", "--steps=2", "--no-ema",
          f"--out={out}", "--device=cpu"])  # fmt: skip
    assert out.is_file() and "2 samples" in capsys.readouterr().out


def test_a_format_2_vae_keeps_its_padding(tmp_path):
    """A VAE written before format 3 (no `downsample` in its hyper-parameters) loads with the all-sides padding it was
    trained with, encodes as that network does, and a resume with the new default padding is refused by name."""
    from gen_lightning.models.loading import load_model
    from gen_lightning.models.vae import VAEModel
    from gen_lightning.nn.autoencoder import Autoencoder
    from tests.conftest import save_checkpoint

    torch.manual_seed(0)
    old = VAEModel(autoencoder={"channels": [8, 8], "latent_channels": 2, "downsample": "same"}, image_size=16)
    path = save_checkpoint(old, tmp_path / "format2.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["hyper_parameters"]["autoencoder"]["downsample"]
    checkpoint["gen_lightning"]["format"] = 2
    torch.save(checkpoint, path)
    loaded = load_model(path, VAEModel)
    assert loaded.net.config.downsample == "same"
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x), old.encode(x))
    other = Autoencoder({"channels": [8, 8], "latent_channels": 2})
    other.load_state_dict(loaded.ema.shadow.state_dict())
    assert not torch.allclose(other.encode(x).mode(), loaded.encode(x)), "the padding must matter to the test"
    with pytest.raises(Exception, match="downsample=same"):
        VAEModel(autoencoder={"channels": [8, 8], "latent_channels": 2}, image_size=16).on_load_checkpoint(
            torch.load(path, weights_only=True)
        )
