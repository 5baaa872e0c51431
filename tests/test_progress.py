"""Progress of long jobs: without a terminal, plain lines with counts and an ETA (never a `\\r` redraw), about one per
tenth of the job or per interval, whichever is rarer; a bar on a terminal; rank 0 only. Checked on the helper and on
real `gen-lightning sample`, `shards` and `fit` processes whose output is a pipe, as under sbatch."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from gen_lightning.progress import INTERVAL_ENV, progress
from tests.conftest import REPO, save_checkpoint, shape_png, tiny_fit_args

# "<desc>: 3/6 images (50%), 00:01 elapsed, ETA 00:01, 2.50 images/s"
LINE = re.compile(
    r"^(?P<desc>[\w +()-]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \(\d+%\), [\d:]+ elapsed, ETA [\d:?]+, "
)


def progress_lines(text: str, desc: str) -> list[tuple[int, int]]:
    """(count, total) of each progress line of `desc`."""
    found = [LINE.match(line) for line in text.splitlines()]
    return [(int(m["n"]), int(m["total"])) for m in found if m and m["desc"] == desc]


def run_cli(*args: str, interval: float = 0) -> subprocess.CompletedProcess:
    """`gen-lightning ARGS` with stdout and stderr as pipes (not a terminal); progress lines every `interval` s."""
    env = {**os.environ, "WANDB_MODE": "offline", INTERVAL_ENV: str(interval)}
    done = subprocess.run(
        [sys.executable, "-m", "gen_lightning.cli", *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_every_tenth_of_the_job_when_the_interval_allows(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    out = io.StringIO()
    for _ in progress(range(100), desc="work", unit="items", rank=0, file=out):
        pass
    assert "\r" not in out.getvalue()
    assert progress_lines(out.getvalue(), "work") == [(n, 100) for n in range(0, 101, 10)]
    assert out.getvalue().splitlines()[-1].startswith("work: 100/100 items (100%), ")
    assert ", ETA 00:00, " in out.getvalue().splitlines()[-1]


def test_lines_every_interval_when_that_is_rarer(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "3600")
    out = io.StringIO()
    with progress(total=1000, desc="work", unit="images", rank=0, file=out) as bar:
        for _ in range(1000):
            bar.update(1)
    assert progress_lines(out.getvalue(), "work") == [(0, 1000), (1000, 1000)]  # the start and the end only


def test_unknown_total_counts_without_an_eta(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    out = io.StringIO()
    for _ in progress(iter(range(5)), desc="reading", unit="images", rank=0, file=out):
        pass
    last = out.getvalue().splitlines()[-1]
    assert re.match(r"^reading: 5 images, [\d:]+ elapsed, [\d. ]+ images/s$", last), last


def test_a_terminal_gets_a_bar():
    out = FakeTerminal()
    for _ in progress(range(3), desc="work", unit="items", rank=0, file=out):
        pass
    assert "\r" in out.getvalue() and "| 3/3 items [" in out.getvalue()


def test_lines_above_lightnings_rich_bar_on_a_terminal(monkeypatch):
    """During fit on a terminal, Rich's live display proxies stderr: a redrawn bar would come out as blank lines."""
    from rich.console import Console
    from rich.file_proxy import FileProxy

    monkeypatch.setenv(INTERVAL_ENV, "0")
    shown = io.StringIO()
    proxy = FileProxy(Console(file=shown, width=200), FakeTerminal())  # isatty: the terminal under the display
    for _ in progress(range(3), desc="work", unit="items", rank=0, file=proxy):
        pass
    assert progress_lines(shown.getvalue(), "work") == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_only_rank_zero_prints(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    out = io.StringIO()
    assert list(progress(range(3), desc="work", rank=None, file=out)) == [0, 1, 2]  # items pass through
    assert out.getvalue() == ""
    for _ in progress(range(3), desc="work", rank=0, file=out):
        pass
    assert out.getvalue()


def test_sample_command_prints_progress_lines_without_a_terminal(tmp_path):
    from gen_lightning.models.diffusion import DiffusionModel

    model = DiffusionModel(unet={"channels": [8, 16], "attention_levels": [], "num_heads": 2}, image_size=16)
    checkpoint = save_checkpoint(model, tmp_path / "tiny.ckpt")
    done = run_cli("sample", "--ckpt", str(checkpoint), "--n", "6", "--batch-size", "2", "--steps", "2",
                   "--out", str(tmp_path / "grid.png"), "--device", "cpu")  # fmt: skip
    assert "\r" not in done.stdout + done.stderr
    assert progress_lines(done.stderr, "sampling") == [(0, 6), (2, 6), (4, 6), (6, 6)]
    assert "wrote" in done.stdout  # the result on stdout, progress on stderr


def test_shards_command_prints_progress_lines_without_a_terminal(tmp_path):
    src = tmp_path / "pictures"
    src.mkdir()
    for i in range(20):
        (src / f"img{i:02d}.png").write_bytes(shape_png("red", "circle"))
    done = run_cli("shards", "folder", str(src), "--out", str(tmp_path / "out"), "--size", "16")
    assert "\r" not in done.stdout + done.stderr
    assert progress_lines(done.stderr, "images") == [(n, 20) for n in range(0, 21, 2)]


def test_shards_emoji_prints_progress_lines_without_a_terminal(tmp_path):
    from gen_lightning.data.emoji_source import DEFAULT_FONT_PATHS

    if not any(os.path.exists(p) for p in DEFAULT_FONT_PATHS):
        pytest.skip("fonts-noto-color-emoji is not installed (make setup installs it)")
    done = run_cli("shards", "emoji", "--out", str(tmp_path), "--size", "16", "--limit", "10")
    assert "\r" not in done.stdout + done.stderr
    assert progress_lines(done.stderr, "rendering") == [(n, 10) for n in range(11)]


def test_fit_prints_step_lines_without_a_terminal(toy_shards, tmp_path):
    done = run_cli(
        "fit",
        *tiny_fit_args(toy_shards, tmp_path),
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.callbacks.num_samples=2",  # the config's SampleGrid (the last callback so far): a quick final grid
        "--trainer.callbacks.steps=2",
        "--trainer.callbacks+=gen_lightning.callbacks.FitProgress",  # replaces the default one (every 50 steps)
        "--trainer.callbacks.every_n_steps=2",
    )
    output = done.stdout + done.stderr
    assert "\r" not in output  # Lightning's bar is off: nothing redraws
    steps = re.findall(
        r"^train: step (\d+)/4 \(\d+%\), loss [\d.e+-]+, [\d.]+ samples/s, [\d:]+ elapsed, ETA [\d:]+$",
        done.stderr,
        re.MULTILINE,
    )
    assert steps == ["2", "4"], done.stderr
    assert len(re.findall(r"^validation at step [24]: val/loss [\d.]+", done.stderr, re.MULTILINE)) == 2
