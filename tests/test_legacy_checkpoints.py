"""Checkpoints written before issue #19 (tests/fixtures/legacy, checkpoint format 1, by commit 12b3ea7) still load
and give the outputs that code gave for the same inputs (expected.pt): the key map applied at load time is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gen_lightning.models.loading import load_model

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"
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
    close(model.sample(2, steps=2, generator=seeded(), use_ema=False), expected["ddpm/sample_raw"])


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
    model = load_model(LEGACY / "clip.ckpt")
    close(model.encode_image(expected["inputs/images"]), expected["clip/image"])
    close(model.encode_text(expected["inputs/tokens"]), expected["clip/text"])
    assert model.logit_scale.shape == (1,)  # written 0-dim before #18; reshaped on load


@torch.no_grad()
def test_legacy_world_model_predicts_and_rolls_out_as_before(expected):
    model = load_model(LEGACY / "world.ckpt")
    frames, actions = expected["inputs/frames"], expected["inputs/actions"]
    close(model.start_context(2), frames)
    close(model.predict_next(frames, actions[:, 0], steps=2, generator=seeded()), expected["world/next"])
    close(model.rollout(frames, actions, steps=2, generator=seeded()), expected["world/rollout"])


@torch.no_grad()
@pytest.mark.parametrize("name", ["ldm_text", "ldm_clip"])
@pytest.mark.parametrize("guidance", [0.0, 1.0, 3.0])
def test_legacy_latent_diffusion_samples_as_before(name, guidance, expected):
    model = load_model(LEGACY / f"{name}.ckpt")
    images = model.sample(2, PROMPTS, steps=2, guidance=guidance, generator=seeded())
    close(images, expected[f"{name}/sample_w{guidance:g}"])
