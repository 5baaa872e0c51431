"""`gen-lightning export`: diffusers' DDIMPipeline on an exported pixel model samples what our sample() does from the
same noise; an exported VAE is diffusers' AutoencoderKL; every model's safetensors export reloads to identical
weights and samples, through sample/evaluate as well; models diffusers cannot represent are refused in words; a
latent-diffusion export with Stable Diffusion parts carries them and survives the originals being deleted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from gen_lightning.cli import main  # noqa: E402
from gen_lightning.export import ExportError, export  # noqa: E402
from gen_lightning.models.checkpoint_format import upgrade  # noqa: E402
from gen_lightning.models.diffusion import DiffusionModel  # noqa: E402
from gen_lightning.models.latent_diffusion import LatentDiffusionModel  # noqa: E402
from gen_lightning.models.loading import CheckpointError, load_model, model_class, read_checkpoint  # noqa: E402
from gen_lightning.models.vae import VAEModel  # noqa: E402
from tests.conftest import REPO, save_checkpoint  # noqa: E402
from tests.hf_folders import offline, sd_pipeline_root  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("offline")
LEGACY = REPO / "tests" / "fixtures" / "legacy"


def randomised_ema(model, network: str = ""):
    """A zero-initialised output conv would make the comparison 0 = 0: fill the EMA's (UNet) weights at random."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.ema.shadow.get_submodule(network).parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def ddim_pipeline_images(folder: Path, n: int, steps: int, seed: int) -> torch.Tensor:
    """n images in [0, 1], NCHW, from diffusers' DDIMPipeline on an exported folder (x0 clipping as our sampler's)."""
    pipeline = diffusers.DDIMPipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                      use_clipped_model_output=True, output_type="pt").images  # fmt: skip
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images  # NHWC for some output types


@pytest.mark.parametrize(
    "settings",
    [
        {"schedule": "cosine", "prediction_type": "v", "clip_sample": 1.0},
        {"schedule": "linear", "prediction_type": "epsilon", "clip_sample": None},
    ],
    ids=["cosine-v-clip", "linear-eps"],
)
def test_ddim_pipeline_on_exported_folder_matches_sample(settings, tmp_path, capsys):
    model = randomised_ema(
        DiffusionModel(
            unet={"channels": [32, 32], "attention_levels": [1], "num_heads": 2}, image_size=8, **settings
        ).eval()
    )
    ckpt = save_checkpoint(model, tmp_path / "ddpm.ckpt")
    out = tmp_path / "export"
    main(["export", f"--ckpt={ckpt}", f"--out={out}", "--format=diffusers"])
    assert "use_clipped_model_output=True" in capsys.readouterr().out
    theirs = ddim_pipeline_images(out, 4, steps=4, seed=3)
    ours = (model.sample(4, steps=4, generator=torch.Generator().manual_seed(3)) + 1) / 2
    assert ours.std() > 0.05  # not a constant image
    assert (theirs - ours).abs().max() <= 1e-4
    assert (out / "gen_lightning.json").is_file() and (out / "model.safetensors").is_file()
    assert oct((out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777) == "0o644"


def test_a_progressive_student_exports_as_a_ddim_pipeline_of_its_own_steps(tmp_path, capsys):
    from gen_lightning.models.distillation import DistilledDiffusionModel

    teacher = DiffusionModel(unet={"channels": [32, 32], "attention_levels": [1], "num_heads": 2}, image_size=8,
                             schedule="cosine", prediction_type="v")  # fmt: skip
    teacher = save_checkpoint(randomised_ema(teacher), tmp_path / "teacher.ckpt")
    student = DistilledDiffusionModel(str(teacher), teacher_steps=8, rounds=2)  # its weights: the teacher's EMA
    out = tmp_path / "export"
    main(
        [
            "export",
            f"--ckpt={save_checkpoint(student, tmp_path / 'student.ckpt')}",
            f"--out={out}",
            "--format=diffusers",
        ]
    )
    assert "num_inference_steps=2" in capsys.readouterr().out
    theirs = ddim_pipeline_images(out, 3, steps=2, seed=3)
    ours = (student.sample(3, generator=torch.Generator().manual_seed(3)) + 1) / 2  # its default: 2 steps
    assert ours.std() > 0.05 and (theirs - ours).abs().max() <= 1e-4


def test_vae_export_loads_as_autoencoder_kl(tmp_path):
    torch.manual_seed(0)
    vae = VAEModel(autoencoder={"channels": [32, 32], "latent_channels": 4}, image_size=16)
    with torch.no_grad():
        for p in vae.ema.shadow.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / "vae_export"
    export(save_checkpoint(vae, tmp_path / "vae.ckpt"), out, fmt="diffusers", scaling_factor=0.7)
    kl = diffusers.AutoencoderKL.from_pretrained(str(out)).eval()
    assert kl.config.scaling_factor == 0.7
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mode = vae.encode(x)
        assert (kl.encode(x).latent_dist.mode() - mode).abs().max() <= 1e-5
        assert (kl.decode(mode).sample.clamp(-1, 1) - vae.decode(mode)).abs().max() <= 1e-5
    # the same folder is also ours: an LDM first stage and a sample/evaluate checkpoint
    assert torch.equal(load_model(out, VAEModel).encode(x), mode)


@pytest.mark.parametrize("name", ["ddpm", "vae", "clip", "world", "ldm_text", "ldm_clip"])
def test_exported_safetensors_reload_identical(name, tmp_path):
    ckpt = LEGACY / f"{name}.ckpt"
    checkpoint = read_checkpoint(ckpt)
    cls = model_class(checkpoint, ckpt)
    upgrade(checkpoint, cls)
    out = tmp_path / name
    summary = export(ckpt, out)
    stored = load_file(out / "model.safetensors")
    source = "ema.shadow." if cls.keeps_ema else "net."
    nets = {k: v for k, v in stored.items() if k.startswith("net.")}
    assert nets and all(torch.equal(v, checkpoint["state_dict"][source + k[4:]]) for k, v in nets.items())
    assert not [k for k in stored if k.startswith("ema.")]
    assert "model.safetensors" in summary.files and json.loads((out / "gen_lightning.json").read_text())["weights"]
    original, reloaded = load_model(ckpt), load_model(out)
    if cls.kind == "encoder":
        assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in original.state_dict().items())
        return
    prompts = ["red circle"] if cls.kind == "text-to-image" else None
    first = original.sample(2, prompts, steps=2, generator=torch.Generator().manual_seed(0))
    again = reloaded.sample(2, prompts, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)


def test_models_diffusers_cannot_represent_are_refused(tmp_path):
    for name, reason in [
        ("ldm_text", r"LatentDiffusionModel has no diffusers equivalent: its UNet's cross-attention"),
        ("world", "WorldModel has no diffusers equivalent"),
        ("clip", "CLIPModel has no diffusers equivalent"),
        ("ddpm", "its GroupNorm layers use 8 and 16 groups"),
        ("vae", "autoencoder.downsample='same'"),
    ]:
        with pytest.raises(ExportError, match=reason) as err:
            export(LEGACY / f"{name}.ckpt", tmp_path / name, fmt="diffusers")
        assert "--format safetensors" in str(err.value)
        assert not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}.tmp-*"))  # nothing half-written
    with pytest.raises(ExportError, match="CLIPModel keeps no EMA copy"):
        export(LEGACY / "clip.ckpt", tmp_path / "clip", weights="ema")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(LEGACY / "ddpm.ckpt", tmp_path / "full")
    with pytest.raises(CheckpointError, match=r"a folder without gen_lightning\.json"):
        load_model(tmp_path / "full")


def test_sample_and_evaluate_accept_an_export_folder(toy_shards, tmp_path, capsys):
    out = tmp_path / "ddpm_export"
    main(["export", f"--ckpt={LEGACY / 'ddpm.ckpt'}", f"--out={out}"])
    grid = tmp_path / "grid.png"
    main(["sample", f"--ckpt={out}", "--n=2", "--steps=2", f"--out={grid}", "--device=cpu"])
    assert grid.is_file() and "2 samples" in capsys.readouterr().out
    report = tmp_path / "report.json"
    main(["evaluate", f"--ckpt={out}", f"--data={toy_shards}", "--num-samples=4", "--max-real=8", "--steps=2",
          "--num-workers=0", f"--cache-dir={tmp_path / 'cache'}", f"--out={report}", "--device=cpu"])  # fmt: skip
    assert json.loads(report.read_text())["fid"] > 0


def test_ldm_export_with_pretrained_parts_is_self_contained(tmp_path):
    root = sd_pipeline_root(tmp_path / "sd")
    torch.manual_seed(0)
    model = LatentDiffusionModel(
        vae_checkpoint=str(root), clip_checkpoint=str(root), image_size=16, sample_steps=2,
        unet={"channels": [32], "attention_levels": [0], "num_heads": 1},
    )  # fmt: skip
    randomised_ema(model, "unet")  # the frozen tower stays the folder's
    assert float(model.latent_scale) == 0.5
    ckpt = save_checkpoint(model, tmp_path / "ldm.ckpt")
    export(ckpt, tmp_path / "export")
    for part in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json"):  # fmt: skip
        assert (tmp_path / "export" / part).is_file(), part
    stored = load_file(tmp_path / "export" / "model.safetensors")
    assert not [k for k in stored if k.startswith(("vae.", "net.text."))]  # the parts travel as their own files
    expected = model.sample(2, ["red circle"], generator=torch.Generator().manual_seed(0))
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "export", moved)
    shutil.rmtree(root)
    with pytest.raises(ValueError, match=r"folder .* which does not exist"):
        load_model(ckpt)  # the checkpoint refers to the deleted folder
    again = load_model(moved).sample(2, ["red circle"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(expected, again)
    assert Path(load_model(moved).hparams.vae_checkpoint).parent == moved
