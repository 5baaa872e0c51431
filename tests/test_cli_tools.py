"""The light CLI paths: help without heavy imports, shard writing commands, the W&B offline default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gen_lightning.cli import main
from gen_lightning.wandb_run import default_wandb_mode
from tests.conftest import REPO, shape_png


def test_help_does_not_import_torch_or_lightning():
    code = (
        "import sys; from gen_lightning.cli import main; main(['--help']); "
        "print(sorted(m for m in sys.modules if m in ('torch', 'lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "gen-lightning <command>" in out
    assert out.strip().endswith("[]")


def test_shards_folder_command(tmp_path, capsys):
    src = tmp_path / "pictures"
    (src / "sub").mkdir(parents=True)
    for i in range(12):
        (src / "sub" / f"img{i}.png").write_bytes(shape_png("red", "circle"))
        (src / "sub" / f"img{i}.txt").write_text(f"red circle {i}")
    (src / "broken.png").write_bytes(b"not a png")
    main(["shards", "folder", str(src), "--out", str(tmp_path / "out"), "--size", "16", "--samples-per-shard", "4"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    total = sum(split["num_samples"] for split in manifest["splits"].values())
    assert total == 12
    assert sum(manifest["skipped"].values()) == 1
    assert "skipped: 1" in capsys.readouterr().out


def test_shards_emoji_command(tmp_path):
    from gen_lightning.data.emoji_source import DEFAULT_FONT_PATHS

    if not any(os.path.exists(p) for p in DEFAULT_FONT_PATHS):
        pytest.skip("fonts-noto-color-emoji is not installed (make setup installs it)")
    main(["shards", "emoji", "--out", str(tmp_path), "--size", "32", "--limit", "20"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sum(split["num_samples"] for split in manifest["splits"].values()) == 20


def test_unknown_command_exits_with_message():
    with pytest.raises(SystemExit, match="unknown command 'frobnicate'"):
        main(["frobnicate"])


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "offline"), ({"WANDB_API_KEY": "x" * 40}, None), ({"WANDB_MODE": "online"}, "online")],
)
def test_wandb_is_offline_without_credentials(monkeypatch, tmp_path, env, expected):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    default_wandb_mode()
    assert os.environ.get("WANDB_MODE") == expected


def test_netrc_login_counts_as_credentials(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc_file = tmp_path / ".netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(netrc_file))
    default_wandb_mode()
    assert "WANDB_MODE" not in os.environ


def test_print_config_shows_the_resolved_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/ddpm_emoji.yaml"), "--trainer.max_steps=7", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "max_steps: 7" in printed
    assert "class_path: gen_lightning.models.DiffusionModel" in printed
    assert "prediction_type: v" in printed


def test_console_script_reports_bad_input_in_one_line(tmp_path, monkeypatch):
    from gen_lightning.cli import console_main

    missing = tmp_path / "missing.ckpt"
    monkeypatch.setattr("sys.argv", ["gen-lightning", "sample", f"--ckpt={missing}", f"--out={tmp_path / 'g.png'}"])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == f"gen-lightning: error: checkpoint {str(missing)!r} does not exist"
