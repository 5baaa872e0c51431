"""The UI recorder end to end: a real Xvfb, the real Tk app in its own process, real XTest input, real captures."""

from __future__ import annotations

import ctypes.util
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_lightning.actions import CURSOR_PIXELS, CURSOR_RGB, KEYS, check_action, cursor_pixel
from gen_lightning.data import ui_app, ui_source
from gen_lightning.data.shard_writer import read_manifest, shard_pattern, split_of
from gen_lightning.data.ui_policy import ReplayPolicy, Step
from gen_lightning.data.ui_source import UiRecorder, iter_ui_samples, virtual_display, write_ui_shards
from gen_lightning.errors import UserInputError

pytestmark = pytest.mark.skipif(
    shutil.which("Xvfb") is None or ctypes.util.find_library("Xtst") is None,
    reason="needs Xvfb and libXtst (Debian: xvfb, libxtst6; `make setup` installs them)",
)

EPISODES, STEPS, CONTEXT, VAL_FRACTION = 4, 8, 3, 0.5
# Which of e00000..e00003 are held out follows from split_of; the test needs both splits non-empty.
VAL_EPISODES = {e for e in range(EPISODES) if split_of(f"e{e:05d}", VAL_FRACTION) == "val"}


def _record(out: Path, seed: int = 0) -> dict:
    return write_ui_shards(
        out, episodes=EPISODES, steps=STEPS, context=CONTEXT, seed=seed, samples_per_shard=5, val_fraction=VAL_FRACTION
    )


def _read(out: Path, split: str) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(shard_pattern(out, split), shardshuffle=False))


def _image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ui")
    _record(out)
    return out


@pytest.fixture(scope="module")
def recorder():
    with virtual_display() as display:
        recorder = UiRecorder(display, size=ui_app.SCREEN)  # full resolution: the widget areas are exact
        yield recorder
        recorder.close()


def test_layout_keys_and_manifest(recording):
    assert 0 < len(VAL_EPISODES) < EPISODES
    manifest = read_manifest(recording)
    source = manifest["source"]
    assert source["name"] == "ui" and source["app"]["name"] == ui_app.APP_NAME
    assert (source["episodes"], source["steps_per_episode"], source["context_frames"]) == (EPISODES, STEPS, CONTEXT)
    assert (source["frame_size"], source["screen_size"], source["seed"]) == (64, [128, 128], 0)
    assert source["keys"] == list(KEYS)
    assert manifest["fields"] == ["action.json", "context.png", "json", "png"]
    seen = {}
    for split in ("train", "val"):
        samples = _read(recording, split)
        assert len(samples) == manifest["splits"][split]["num_samples"] > 0
        episodes = [json.loads(s["json"])["episode"] for s in samples]
        assert set(episodes) == (VAL_EPISODES if split == "val" else set(range(EPISODES)) - VAL_EPISODES)
        # Whole episodes, each in step order, so the val split can be replayed as rollouts.
        assert [s["__key__"] for s in samples] == [
            f"e{e:05d}-t{t:04d}" for e in sorted(set(episodes)) for t in range(STEPS)
        ]
        seen.update({s["__key__"]: s for s in samples})
    for key, sample in seen.items():
        meta = json.loads(sample["json"])
        episode, t = meta["episode"], meta["t"]
        assert key == f"e{episode:05d}-t{t:04d}" and meta["context_frames"] == CONTEXT
        assert meta["kind"] in ("move", "click", "key", "drag_press", "drag_move", "drag_release")
        action = json.loads(sample["action.json"])
        assert check_action(action) == action
        assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)
        tiles = _image(sample["context.png"])
        assert tiles.shape == (64, 64 * CONTEXT, 3)
        # Tile i holds frame t-CONTEXT+1+i, i.e. the png of sample t-CONTEXT+i; frames before 0 repeat frame 0.
        for i in range(CONTEXT):
            frame = t - CONTEXT + 1 + i
            tile = tiles[:, 64 * i : 64 * (i + 1)]
            if frame >= 1:
                assert np.array_equal(tile, _image(seen[f"e{episode:05d}-t{frame - 1:04d}"]["png"]))
            elif t == 0:
                assert np.array_equal(tile, tiles[:, -64:])
            else:
                assert np.array_equal(tile, _image(seen[f"e{episode:05d}-t0000"]["context.png"])[:, -64:])


def test_cursor_sprite_is_at_the_action_and_is_the_only_magenta(recording):
    samples = _read(recording, "train") + _read(recording, "val")
    for sample in samples:
        frame = _image(sample["png"])
        action = json.loads(sample["action.json"])
        tip_x, tip_y = cursor_pixel(action["x"], action["y"], 64, 64)
        sprite = {(tip_x + dx, tip_y + dy) for dx, dy in CURSOR_PIXELS if tip_x + dx < 64 and tip_y + dy < 64}
        magenta = np.argwhere((frame == CURSOR_RGB).all(axis=-1))
        assert {(int(x), int(y)) for y, x in magenta} == sprite, sample["__key__"]


def test_clicks_land_on_their_targets(recording):
    widgets = read_manifest(recording)["source"]["app"]["widgets"]
    clicks = [s for s in _read(recording, "train") + _read(recording, "val") if b'"click"' in s["json"]]
    assert clicks
    for sample in clicks:
        target = json.loads(sample["json"])["target"]
        action = json.loads(sample["action.json"])
        assert action["click"] == 1 and action["button"] == 0
        if target in widgets:
            x0, y0, x1, y1 = widgets[target]
            assert x0 <= action["x"] < x1 and y0 <= action["y"] < y1, sample["__key__"]


def test_same_seed_same_bytes_other_seed_differs(recording, tmp_path):
    from gen_lightning.cli import main

    again = tmp_path / "again"
    options = {"--episodes": EPISODES, "--steps": STEPS, "--context": CONTEXT, "--samples-per-shard": 5}
    main(["shards", "ui", "--out", str(again), "--val-fraction", str(VAL_FRACTION)]
         + [str(part) for option in options.items() for part in option])  # fmt: skip
    names = sorted(p.name for p in recording.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (recording / name).read_bytes() == (again / name).read_bytes(), name
    other = _record(tmp_path / "other", seed=1)
    assert other["source"]["seed"] == 1
    assert (recording / "train-000000.tar").read_bytes() != (tmp_path / "other" / "train-000000.tar").read_bytes()


def test_an_episode_does_not_depend_on_the_ones_before(recording):
    with virtual_display() as display:
        alone = list(ui_source.iter_ui_samples(display, [EPISODES - 1], STEPS, CONTEXT, 64, seed=0))
    split = "val" if EPISODES - 1 in VAL_EPISODES else "train"
    recorded = [s for s in _read(recording, split) if s["__key__"].startswith(f"e{EPISODES - 1:05d}-")]
    assert [s["__key__"] for s in alone] == [s["__key__"] for s in recorded]
    for mine, theirs in zip(alone, recorded, strict=True):
        assert mine["png"] == theirs["png"] and mine["context.png"] == theirs["context.png"]
        assert mine["action.json"] == json.loads(theirs["action.json"])


def _changed(before: Image.Image, after: Image.Image) -> np.ndarray:
    return (np.asarray(before).astype(int) - np.asarray(after).astype(int)).any(axis=-1)


def _share(changed: np.ndarray, box: tuple[int, int, int, int]) -> float:
    x0, y0, x1, y1 = box
    return float(changed[y0:y1, x0:x1].mean())


def _box(name: str) -> tuple[int, int, int, int]:
    x, y, w, h = ui_app.LAYOUT[name]
    return x, y, x + w, y + h


def test_clicks_visibly_change_their_widget_and_moves_only_the_cursor(recorder):
    panel = _box("panel")
    start = recorder.reset(70, 5)
    moved = recorder.do(Step("move", 110, 20))  # within the panel, which has no hover look
    assert not _changed(start, moved).any()  # the capture holds no cursor: a plain move changes nothing in it
    from gen_lightning.actions import draw_cursor

    drawn = _changed(draw_cursor(start, 70.5 / 128, 5.5 / 128), draw_cursor(moved, 110.5 / 128, 20.5 / 128))
    assert {(int(x), int(y)) for y, x in np.argwhere(drawn)} == {
        (tip_x + dx, tip_y + dy) for tip_x, tip_y in ((70, 5), (110, 20)) for dx, dy in CURSOR_PIXELS
    }
    stray = recorder.do(Step("key", 110, 20, key="q"))  # nothing has the focus: a key changes nothing
    assert not _changed(moved, stray).any()

    for widget, flag in (("toggle", "toggled"), ("checkbox", "checked")):
        before = recorder.do(Step("move", 100, 100))
        assert not recorder.state[flag]
        x0, y0, x1, y1 = _box(widget)
        after = recorder.do(Step("click", (x0 + x1) // 2, (y0 + y1) // 2))
        changed = _changed(before, after)
        assert recorder.state[flag]
        assert _share(changed, _box(widget)) > 0.5, widget  # most of the widget changes colour
        outside = changed.copy()
        outside[y0:y1, x0:x1] = False
        outside[_box("entry")[1] :, :] = False  # the pointer left the entry: its hover look is not the widget's
        assert not outside.any(), widget
        back = recorder.do(Step("click", (x0 + x1) // 2, (y0 + y1) // 2))  # clicking again switches it back
        assert not recorder.state[flag] and _share(_changed(after, back), _box(widget)) > 0.5
    assert _share(_changed(start, recorder.reset(70, 5)), panel) == 0  # reset: a fresh app


def test_typing_shows_in_the_entry_and_the_menu_paints_the_panel(recorder):
    entry = _box("entry")
    recorder.reset(64, 100)
    before = recorder.do(Step("click", 20, 104))
    assert recorder.state["entry_focused"]
    typed = before
    for key in ("w", "m", "space", "BackSpace", "8"):
        typed = recorder.do(Step("key", 20, 104, key=key))
    assert recorder.state["text"] == "wm8"
    changed = _changed(before, typed)
    assert changed[entry[1] : entry[3], entry[0] : entry[2]].sum() > 150  # three big dark glyphs
    changed[entry[1] : entry[3], entry[0] : entry[2]] = False
    assert not changed.any()
    recorder.do(Step("key", 20, 104, key="Return"))
    assert recorder.state["text"] == ""

    closed = recorder.do(Step("move", 30, 16))
    opened = recorder.do(Step("click", 30, 16))
    assert recorder.state["menu_open"] and not recorder.state["entry_focused"]  # the open menu has the focus
    assert _changed(closed, opened)[32:100, 0:64].mean() > 0.5  # the dropdown covers the widgets below
    x0, y0, x1, y1 = recorder.state["boxes"]["menu:green"]
    chosen = recorder.do(Step("click", (x0 + x1) // 2, (y0 + y1) // 2))
    assert not recorder.state["menu_open"] and recorder.state["panel"] == ui_app.MENU_ITEMS["green"][0]
    assert recorder.state["entry_focused"]  # given back when the menu closed
    assert _share(_changed(closed, chosen), _box("panel")) == 1.0
    panel = np.asarray(chosen)[4:28, 68:124].reshape(-1, 3)
    assert (panel == Image.new("RGB", (1, 1), ui_app.MENU_ITEMS["green"][0]).getpixel((0, 0))).all()


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="--size"):
        write_ui_shards(tmp_path, episodes=1, steps=1, size=256)
    with pytest.raises(UserInputError, match="--episodes"):
        write_ui_shards(tmp_path, episodes=0)
    monkeypatch.setenv("PATH", str(tmp_path))  # no Xvfb on the PATH
    with pytest.raises(UserInputError, match="apt-get install xvfb"):
        write_ui_shards(tmp_path, episodes=1, steps=1)
    assert not (tmp_path / "manifest.json").exists()


DEMO_SCRIPT = [
    ("move", "toggle", ""),
    ("click", "toggle", ""),
    ("click", "menu", ""),
    ("click", "menu:blue", ""),  # exists only once the menu is open: aimed at where the app reports it
    ("click", "entry", ""),
    ("key", None, "h"),
]


def test_replay_policy_drives_the_app_through_a_fixed_script():
    with virtual_display() as display:
        policy = ReplayPolicy(DEMO_SCRIPT)
        samples = list(iter_ui_samples(display, [0], steps=len(DEMO_SCRIPT), size=64, policy_for=lambda _: policy))
    metas = [json.loads(s["json"]) if isinstance(s["json"], bytes) else s["json"] for s in samples]
    assert [(m["kind"], m["target"]) for m in metas] == [(kind, target) for kind, target, _ in DEMO_SCRIPT]
    frames = [np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")).astype(int) for s in samples]
    toggle = [int(v * 64) for v in (0.0, 0.25, 0.5, 0.625)]
    region = (slice(toggle[1], toggle[3]), slice(toggle[0], toggle[2]))
    assert np.abs(frames[1][region] - frames[0][region]).sum(-1).astype(bool).mean() > 0.3  # the toggle switched
    panel = frames[3][2:14, 36:62].reshape(-1, 3)
    assert (np.abs(panel - [0x10, 0x50, 0xC0]).max(1) < 8).mean() > 0.9  # the menu painted the panel blue
    assert samples[-1]["action.json"]["key"] == "h"
    with pytest.raises(ValueError, match="only 6 steps"):
        policy.next_step({"boxes": {}}, (0, 0))


def test_sigterm_stops_the_recorder_without_leaving_temporary_shards(tmp_path):
    # `kill` and schedulers send SIGTERM; Python's default would die at once and skip the clean-up of the shard
    # being written and of the private Xvfb and app.
    out = tmp_path / "ui"
    command = [sys.executable, "-m", "gen_lightning.cli", "shards", "ui", "--out", str(out), "--episodes", "400",
               "--samples-per-shard", "8"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".tmp-*")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert list(out.glob(".tmp-*")), "the recorder never started a shard"
        children = _children(process.pid)
        assert any("Xvfb" in name for name in children.values()), children
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    finally:
        process.kill()
    assert process.returncode == 130 and output.rstrip().endswith("gen-lightning: interrupted"), output[-2000:]
    assert not list(out.glob(".tmp-*")) and not (out / "manifest.json").exists()
    assert not any(Path(f"/proc/{pid}").exists() for pid in children), children  # Xvfb and the app are gone


def _children(pid: int) -> dict[int, str]:
    """Child processes of pid (pid -> command name), from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            name, ppid = fields[0].split("(", 1)[1], int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found[int(stat.parent.name)] = name
    return found


def test_entry_scrolled_marks_the_steps_that_move_the_entrys_view():
    # Nine characters fill the entry; past them Tk scrolls its view, and deleting brings the start back into view.
    script = [("click", "entry", ""), *[("key", None, k) for k in "abcdefghijkl"], *[("key", None, "BackSpace")] * 6]
    with virtual_display() as display:
        policy = ReplayPolicy(script)
        samples = list(iter_ui_samples(display, [0], steps=len(script), size=64, policy_for=lambda _: policy))
    scrolled = [s["json"]["entry_scrolled"] for s in samples]
    assert not any(scrolled[:10])  # the click and the first nine characters fit
    assert any(scrolled[10:13]) and any(scrolled[13:])  # overflowing text scrolls; deleting it scrolls back
    line = slice(44, 59)  # the text line's rows at 64 px
    for sample, previous in zip(samples[1:], samples, strict=False):
        frame, before = (_image(s["png"])[line].astype(int) for s in (sample, previous))
        shifted = np.abs(frame[:, 4:56] - before[:, 4:56]).sum(-1).astype(bool).mean()
        # A scroll moves the whole line of glyphs (~half its pixels change); a typed or deleted cell, ~1/8 of them.
        assert (shifted > 0.2) == sample["json"]["entry_scrolled"], sample["__key__"]
