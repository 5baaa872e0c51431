"""The UI app's state and typed-text readers (metrics.ui_state, metrics.ui_text) and the metrics built on them.

Calibration (needs Xvfb, as tests/test_ui_source.py): episodes recorded from the real app through the recorder's own
path, with the app's state log kept beside them, must read exactly as the log says, frame by frame. The metrics'
arithmetic runs on synthetic screens painted with the app's colours and font (no X server).
"""

from __future__ import annotations

import ctypes.util
import io
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from gen_lightning.actions import CURSOR_PIXELS
from gen_lightning.data import ui_app
from gen_lightning.metrics import ui_text
from gen_lightning.metrics.ui_frames import cursor_mask, frames_rgb
from gen_lightning.metrics.ui_state import (
    UNREADABLE,
    WIDGET_NAMES,
    WIDGETS,
    StateAccuracy,
    logged_states,
    read_states,
)
from gen_lightning.metrics.ui_text import TextAccuracy, matching_characters, read_text, visible_texts

needs_x = pytest.mark.skipif(
    shutil.which("Xvfb") is None or ctypes.util.find_library("Xtst") is None,
    reason="needs Xvfb and libXtst (Debian: xvfb, libxtst6; `make setup` installs them)",
)
SIZE = 64


def _tensor(image: Image.Image) -> torch.Tensor:
    """A recorded frame as the data module gives it: float [-1, 1] CHW."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1


# --- synthetic screens: the app's colours in its layout, its font in the entry --------------------------------------
def fake_screen(
    toggled: bool = False,
    checked: bool = False,
    menu_open: bool = False,
    panel: str = ui_app.PANEL_START,
    focused: bool = False,
    text: str = "",
    caret: int | None = None,
) -> torch.Tensor:
    screen = Image.new("RGB", (ui_app.SCREEN, ui_app.SCREEN), ui_app.BACKGROUND)
    draw = ImageDraw.Draw(screen)

    def fill(name: str, colour: str) -> None:
        x, y, w, h = ui_app.LAYOUT[name]
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=colour)

    fill("toggle", ui_app.TOGGLE_ON if toggled else ui_app.TOGGLE_OFF)
    fill("panel", panel)
    draw.rectangle((80, 40, 111, 71), fill="#000000")  # the checkbox's 32-px box, centred in its widget
    draw.rectangle((83, 43, 108, 68), fill="#1b5e20" if checked else "#ffffff")
    fill("entry", ui_app.ENTRY_FOCUS_RING if focused else ui_app.ENTRY_RING)
    draw.rectangle((5, 89, 122, 118), fill="#ffffff")
    top, baseline = ui_text.LINE_TOP, ui_text.LINE_TOP + ui_text.ASCENT
    for cell, char in enumerate(text[: ui_text.CELLS]):
        draw.text(
            (ui_text.TEXT_X + ui_text.ADVANCE * cell, baseline), char, font=ui_text._font(), fill="#000000", anchor="ls"
        )
    draw.rectangle((123, 84, 127, 123), fill=ui_app.ENTRY_FOCUS_RING if focused else ui_app.ENTRY_RING)  # the clip
    if caret is not None:
        x = ui_text.TEXT_X + ui_text.ADVANCE * caret
        draw.rectangle((x - 2, top, x + 1, top + ui_text.ASCENT + ui_text.DESCENT - 1), fill="#000000")
    if menu_open:
        for index, (colour, _) in enumerate(ui_app.MENU_ITEMS.values()):
            draw.rectangle((0, 32 + 25 * index, 84, 56 + 25 * index), fill=colour)
    return _tensor(screen.resize((SIZE, SIZE), Image.Resampling.BOX))


def _states(
    toggled: bool = False,
    checked: bool = False,
    menu_open: bool = False,
    panel: str = ui_app.PANEL_START,
    focused: bool = False,
    **_: Any,
) -> list[int]:
    """What read_states must give for a synthetic screen with these settings."""
    app_state = {"toggled": toggled, "checked": checked, "menu_open": menu_open, "panel": panel}
    return logged_states({**app_state, "entry_focused": focused})


def test_widget_order_is_the_documented_one():
    assert WIDGET_NAMES == ("toggle", "checkbox", "menu", "panel", "focus")
    assert [w.state_names for w in WIDGETS][2:] == [
        ("closed", "open"),
        ("white", "red", "green", "blue"),
        ("unfocused", "focused"),
    ]


SCREENS = [
    {},
    {"toggled": True, "checked": True, "panel": ui_app.MENU_ITEMS["red"][0], "focused": True, "text": "hi", "caret": 2},
    {"menu_open": True, "panel": ui_app.MENU_ITEMS["green"][0], "text": "dog"},
    {"toggled": True, "panel": ui_app.MENU_ITEMS["blue"][0], "text": "abc 1 xyz", "caret": 4},  # a 9th, clipped cell
    {"checked": True, "focused": True, "text": "q0w9e8r7", "caret": 0},
]


def test_synthetic_screens_read_back():
    frames = torch.stack([fake_screen(**settings) for settings in SCREENS])
    assert read_states(frames).tolist() == [_states(**settings) for settings in SCREENS]
    expected = [None if s.get("menu_open") else s.get("text", "") for s in SCREENS]
    assert read_text(frames) == expected
    # A black frame is no screen of the app: no state's colours cover half of any area.
    assert (read_states(-torch.ones(1, 3, SIZE, SIZE)) == UNREADABLE).all()


def test_the_cursor_is_ignored_where_the_action_put_it():
    frame = fake_screen(text="oooo")
    cursor = torch.tensor([[12.5 / SIZE, 48.5 / SIZE]])  # the sprite's tip inside the second "o"
    sprite = cursor_mask(frames_rgb(frame[None]), cursor)[0]
    assert sprite.sum() == len(CURSOR_PIXELS)  # the sprite's own pixels: no magenta on this frame
    blotted = frame.clone()
    blotted[:, sprite] = -1.0  # a generated frame's cursor drawn black: found only by where the action put it
    assert read_text(blotted[None]) == ["oaoo"]  # read blindly, the blot turns the "o" into an "a"
    assert read_text(blotted[None], cursor) == ["oooo"]
    magenta = frame.clone()
    magenta[:, sprite] = torch.tensor([1.0, -1.0, 1.0])[:, None]  # a real frame's cursor: found by its colour too
    assert read_text(magenta[None]) == ["oooo"]


def test_matching_characters():
    assert matching_characters("hello", "hello") == (5, 5)
    assert matching_characters("hxllo", "hello") == (4, 5)
    assert matching_characters("hell", "hello") == (4, 5)  # a missing character costs
    assert matching_characters("hello!", "hello") == (5, 6)  # so does an extra one
    assert matching_characters(None, "ab") == (0, 2)  # no readable text shows no characters
    assert matching_characters("", "") == (0, 0)
    assert matching_characters("a?", "a?") == (1, 2)  # an unreadable cell matches nothing


def test_state_accuracy_scores_changes_and_whole_frames_beside_copying():
    red = ui_app.MENU_ITEMS["red"][0]
    last = torch.stack([fake_screen(), fake_screen(checked=True), fake_screen(panel=red)])
    real = torch.stack([fake_screen(toggled=True), fake_screen(checked=True), fake_screen(panel=red, menu_open=True)])
    # Frame 0: the toggle turned ON (one change); frame 1: nothing changed; frame 2: the menu opened (one change;
    # the toggle is hidden in the real frame, so not scored).
    predicted = torch.stack(
        [fake_screen(toggled=True, focused=True), fake_screen(checked=True), fake_screen(panel=red)]
    )  # frame 0: the toggle right but a focus ring that should not be there; frame 2: the menu did not open
    metric = StateAccuracy()
    metric.update(predicted, real, last)
    results = metric.compute()
    assert results["state_changes"] == 2 and results["state_frames"] == 3
    assert results["state_accuracy"] == 0.5  # the toggle's change shown, the menu's missed
    assert results["state_accuracy_toggle"] == 1.0 and results["state_accuracy_menu"] == 0.0
    assert np.isnan(results["state_accuracy_panel"])  # no panel change to score
    assert results["state_accuracy_copy_last"] == 0.0
    assert results["state_frame_accuracy"] == pytest.approx(1 / 3)  # only frame 1 is all right
    assert results["state_frame_accuracy_copy_last"] == pytest.approx(1 / 3)  # copying gets frame 1 right too
    metric.reset()
    metric.update(real, real, last)
    assert metric.compute()["state_accuracy"] == 1.0 and metric.compute()["state_frame_accuracy"] == 1.0


def test_text_accuracy_scores_characters_beside_copying():
    last = torch.stack([fake_screen(text="ca"), fake_screen(text="dog"), fake_screen(text="x")])
    real = torch.stack([fake_screen(text="cat"), fake_screen(text="dog"), fake_screen(text="x", menu_open=True)])
    predicted = torch.stack([fake_screen(text="cot"), fake_screen(text="dog"), fake_screen(text="zz")])
    metric = TextAccuracy()
    metric.update(predicted, real, last)
    results = metric.compute()
    # Frame 2's real entry is under the open menu: not scored.
    assert results["text_frames"] == 2 and results["text_typed_frames"] == 1
    assert results["text_accuracy"] == pytest.approx((2 + 3) / (3 + 3))
    assert results["text_accuracy_copy_last"] == pytest.approx((2 + 3) / (3 + 3))  # "ca" against "cat": 2 of 3
    assert results["text_accuracy_typed"] == pytest.approx(2 / 3)
    assert results["text_accuracy_typed_copy_last"] == pytest.approx(2 / 3)
    assert results["text_exact_typed"] == 0.0
    metric.update(real, real, last)  # a perfect prediction of the same frames: the running sums add up
    results = metric.compute()
    assert results["text_accuracy_typed"] == pytest.approx((2 + 3) / (3 + 3))
    assert results["text_exact_typed"] == 0.5


# --- calibration on the real app -------------------------------------------------------------------------------------
EPISODES, STEPS, CONTEXT = 12, 32, 4  # covers every state of every widget, the menu, scrolled and selected text


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    """Episodes 0..EPISODES-1 of seed 0 as `gen-lightning shards ui` records them, with the app's state before and
    after each step."""
    from gen_lightning.data.ui_source import iter_logged_ui_samples, virtual_display

    with virtual_display() as display:
        logged = list(iter_logged_ui_samples(display, range(EPISODES), STEPS, CONTEXT, SIZE, 0))
    samples = [sample for sample, _, _ in logged]
    tiles = [Image.open(io.BytesIO(s["context.png"])) for s in samples]
    return {
        "real": torch.stack([_tensor(Image.open(io.BytesIO(s["png"]))) for s in samples]),
        "last": torch.stack([_tensor(tile.crop(((CONTEXT - 1) * SIZE, 0, CONTEXT * SIZE, SIZE))) for tile in tiles]),
        "cursor": torch.tensor([[s["action.json"]["x"], s["action.json"]["y"]] for s in samples]),
        "before": [before for _, before, _ in logged],
        "after": [after for _, _, after in logged],
        "keys": [s["__key__"] for s in samples],
    }


@needs_x
def test_every_real_frame_reads_as_the_app_logged(recorded):
    for frames, cursor, log in (
        (recorded["real"], recorded["cursor"], recorded["after"]),
        (recorded["last"], None, recorded["before"]),  # its cursor is the previous action's: found by its colour
    ):
        got = read_states(frames, cursor).tolist()
        expected = [logged_states(state) for state in log]
        wrong = [(key, g, e) for key, g, e in zip(recorded["keys"], got, expected, strict=True) if g != e]
        assert not wrong, f"{len(wrong)} of {len(got)} frames misread (key, read, logged): {wrong[:5]}"
    # The recording shows every state of every widget (else this test would prove little).
    after = read_states(recorded["real"], recorded["cursor"])
    for k, widget in enumerate(WIDGETS):
        assert set(after[:, k].tolist()) >= set(range(len(widget.states))), widget.name


@needs_x
def test_every_real_frame_shows_the_text_the_app_logged(recorded):
    for frames, cursor, log in (
        (recorded["real"], recorded["cursor"], recorded["after"]),
        (recorded["last"], None, recorded["before"]),
    ):
        got = read_text(frames, cursor)
        wrong = [
            (key, read, state["text"])
            for key, read, state in zip(recorded["keys"], got, log, strict=True)
            if (read is None) != state["menu_open"] or (read is not None and read not in visible_texts(state["text"]))
        ]
        assert not wrong, f"{len(wrong)} of {len(got)} frames misread (key, read, logged): {wrong[:5]}"
    texts = [state["text"] for state in recorded["after"]]
    assert max(map(len, texts)) > ui_text.CELLS and len(set("".join(texts))) > 15  # scrolled text, many glyphs


@needs_x
def test_real_next_frames_score_full_marks_and_copying_does_not(recorded):
    real, last, cursor = recorded["real"], recorded["last"], recorded["cursor"]
    states, text = StateAccuracy(), TextAccuracy()
    states.update(real, real, last, cursor)
    text.update(real, real, last, cursor)
    state_results, text_results = states.compute(), text.compute()
    assert state_results["state_changes"] > 50 and text_results["text_typed_frames"] > 30
    assert state_results["state_accuracy"] == 1.0 and state_results["state_frame_accuracy"] == 1.0
    assert text_results["text_accuracy"] == 1.0 and text_results["text_accuracy_typed"] == 1.0
    assert state_results["state_accuracy_copy_last"] == 0.0
    assert state_results["state_frame_accuracy_copy_last"] < 0.9
    assert text_results["text_accuracy_typed_copy_last"] < 0.9
    states.reset()
    states.update(last, real, last, cursor)  # "predicting" the last frame is the copy baseline
    assert states.compute()["state_frame_accuracy"] == state_results["state_frame_accuracy_copy_last"]
