"""The UI app's widget states read off frames, and the world model's state accuracy beside copying the screen.

Each widget's state shows as the colour of a known area (gen_lightning.ui_layout: the layout is ours):
    toggle    OFF / ON          bands of the button above and below its label (grey or yellow / dark or light blue)
    checkbox  unchecked/checked the box's inside above and below the tick (white / dark green)
    menu      closed / open     where the dropdown's Red and Green items open, over the toggle
    panel     white/red/green/blue
    focus     unfocused/focused the entry's ring where the dropdown never reaches (grey / orange)
A pixel votes for the state whose colour is nearest, if it is within TOLERANCE of it; a widget reads as the state
with at least MIN_SHARE of the area's votes, else as UNREADABLE (-1). Hover colours count as their state: hovering
is not a state change. The open dropdown covers the toggle, which then reads UNREADABLE, as the app shows no toggle.
Pixels under the cursor sprite are ignored (metrics.ui_frames.cursor_mask).

tests/test_ui_state_metrics.py checks on frames recorded from the real app that every widget of every frame reads
as the app's own state log says; the readers have no free parameter fitted to the data beyond these areas.

StateAccuracy scores predicted next frames: after each action whose real effect changes a widget (the real next
frame reads differently from the last context frame), does the prediction show that widget's new state? Copying the
last context frame scores 0 there by construction, so it also reports whole-frame accuracy (every visible widget
right, on every frame), where copying the screen is the strong baseline a world model has to beat.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics import Metric

from gen_lightning import ui_layout
from gen_lightning.metrics.ui_frames import Box, box_mask, cursor_mask, frames_rgb, hex_rgb

UNREADABLE = -1
TOLERANCE = 80.0  # RGB distance (0..255): far below the distance between any two colours that mean different states
MIN_SHARE = 0.5  # of the area's readable pixels; labels and borders inside an area vote for nothing


@dataclass(frozen=True)
class Widget:
    """Where a widget's state shows (screen pixels) and the colours of each of its states."""

    name: str
    boxes: tuple[Box, ...]
    states: tuple[tuple[str, tuple[str, ...]], ...]  # (state name, its colours '#rrggbb')

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.states)


_RED, _GREEN, _BLUE = (ui_layout.MENU_ITEMS[name] for name in ("red", "green", "blue"))
_TOGGLE_COLOURS = (ui_layout.TOGGLE_OFF, ui_layout.HOVER, ui_layout.TOGGLE_ON, ui_layout.TOGGLE_ON_HOVER)
# What the closed menu leaves there: the toggle's colours and the checkbox widget's background (plain, hover, checked).
_UNDER_MENU = (*_TOGGLE_COLOURS, ui_layout.BACKGROUND, ui_layout.CHECKED_BACKGROUND)
_X, _Y, _W, _H = ui_layout.LAYOUT["checkbox"]
# The checkbox's box image is centred in its widget.
_BOX_X, _BOX_Y = _X + (_W - ui_layout.BOX_SIDE) // 2, _Y + (_H - ui_layout.BOX_SIDE) // 2

WIDGETS: tuple[Widget, ...] = (
    # The toggle's label sits in the middle rows: read the button above and below it, inside its 2-px relief.
    Widget(
        "toggle",
        ((4, 36, 60, 46), (4, 66, 60, 76)),
        (("off", (ui_layout.TOGGLE_OFF, ui_layout.HOVER)), ("on", (ui_layout.TOGGLE_ON, ui_layout.TOGGLE_ON_HOVER))),
    ),
    # Inside the 3-px border, above and below the tick's rows (9..24 of the box); right of where the open dropdown
    # ends (x 85), so an open menu leaves the checkbox readable.
    Widget(
        "checkbox",
        ((_BOX_X + 8, _BOX_Y + 3, _BOX_X + 28, _BOX_Y + 9), (_BOX_X + 8, _BOX_Y + 26, _BOX_X + 28, _BOX_Y + 29)),
        (("unchecked", (ui_layout.BOX_UNCHECKED,)), ("checked", (ui_layout.BOX_CHECKED,))),
    ),
    # The dropdown (x < 85, 32 <= y < 107) opens over the toggle and the checkbox's left margin: read it right of
    # the "Red" and "Green" labels, where it is a plain item colour (or its hover colour), and inside the checkbox
    # widget's 2-px relief, whose shades of the checked light green come near the Green item.
    Widget(
        "menu",
        ((44, 35, 60, 47), (68, 60, 80, 80)),
        (("closed", _UNDER_MENU), ("open", (*_RED, *_GREEN))),
    ),
    Widget(
        "panel",
        ((66, 2, 126, 30),),
        (("white", (ui_layout.PANEL_START,)), ("red", _RED[:1]), ("green", _GREEN[:1]), ("blue", _BLUE[:1])),
    ),
    # The ring is 5 px (highlightthickness): its right side, its bottom and the right of its top, all beyond the
    # open dropdown (x < 85, y < 107).
    Widget(
        "focus",
        ((123, 84, 128, 124), (0, 119, 128, 124), (88, 84, 128, 89)),
        (("unfocused", (ui_layout.ENTRY_RING,)), ("focused", (ui_layout.ENTRY_FOCUS_RING,))),
    ),
)
WIDGET_NAMES: tuple[str, ...] = tuple(widget.name for widget in WIDGETS)


def logged_states(app_state: Mapping[str, Any]) -> list[int]:
    """What read_states must give (WIDGETS order) for a screen of the app in `app_state` (data.ui_app's
    UiApp.state(): toggled, checked, menu_open, panel, entry_focused): the open menu hides the toggle."""
    panels = [colours[0] for _, colours in WIDGETS[WIDGET_NAMES.index("panel")].states]
    states = {
        "toggle": UNREADABLE if app_state["menu_open"] else int(app_state["toggled"]),
        "checkbox": int(app_state["checked"]),
        "menu": int(app_state["menu_open"]),
        "panel": panels.index(app_state["panel"]),
        "focus": int(app_state["entry_focused"]),
    }
    return [states[name] for name in WIDGET_NAMES]


def state_shares(frames: torch.Tensor, cursor: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per widget, [N, S] float: the share of its area's pixels (outside the cursor) that vote for each of its S
    states. NaN rows where the cursor covers the whole area."""
    rgb = frames_rgb(frames)
    ignored = cursor_mask(rgb, cursor).flatten(1)
    size = rgb.shape[1]
    rgb = rgb.flatten(1, 2)  # [N, H·W, 3]
    shares = []
    for widget in WIDGETS:
        area = box_mask(widget.boxes, size).flatten().nonzero()[:, 0]
        if len(area) == 0:
            raise ValueError(f"{size}×{size} frames are too small to read the {widget.name} (no whole pixel inside)")
        pixels, valid = rgb[:, area], ~ignored[:, area]  # [N, P, 3], [N, P]
        colours = torch.tensor([hex_rgb(c) for _, cs in widget.states for c in cs], dtype=torch.float32)
        owner = torch.tensor([s for s, (_, cs) in enumerate(widget.states) for _ in cs])
        nearest, index = (pixels[..., None, :] - colours).pow(2).sum(-1).min(-1)  # [N, P], squared distances
        voting = valid & (nearest <= TOLERANCE**2)
        votes = torch.stack([(voting & (owner[index] == s)).sum(1) for s in range(len(widget.states))], 1)
        shares.append(votes.float() / valid.sum(1, keepdim=True).float())  # 0/0 = NaN: nothing to read
    return shares


def read_states(frames: torch.Tensor, cursor: torch.Tensor | None = None) -> torch.Tensor:
    """[N, len(WIDGETS)] long: each widget's state index (WIDGETS[k].states order) on frames in [-1, 1] NCHW, or
    UNREADABLE. `cursor`: the action's position, [N, 2] fractions, where the frame's cursor sprite is (or may be)."""
    columns = []
    for share in state_shares(frames, cursor):
        best, index = share.nan_to_num(0.0).max(1)
        columns.append(torch.where(best >= MIN_SHARE, index, UNREADABLE))
    return torch.stack(columns, 1)


class StateAccuracy(Metric):
    """Widget-state accuracy of predicted next frames, beside copying the last context frame (summed over ranks).

    compute() gives
        state_accuracy              share of real widget changes the prediction shows (each changed widget of each
                                    frame counts once: the real next frame's state differs from the last context's)
        state_accuracy_copy_last    the same for the last context frame: 0 by construction, here so that a reader
                                    sees the scale
        state_accuracy_<widget>     state_accuracy of one widget's changes
        state_frame_accuracy        share of frames whose every readable widget the prediction shows right
        state_frame_accuracy_copy_last  the same for the last context frame: the baseline to beat
        state_changes, state_frames the counts behind them
    A widget the real frames do not show (the toggle under the open menu) is not scored; a prediction that shows
    nothing readable where the real frame shows a state is wrong.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        n = len(WIDGETS)
        self.add_state("changes", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("changes_right", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("frames", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("frames_right", torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")  # model, copy

    def update(
        self,
        predicted: torch.Tensor,
        real: torch.Tensor,
        last_context: torch.Tensor,
        cursor: torch.Tensor | None = None,
    ) -> None:
        """Frames in [-1, 1] NCHW; `cursor`: the action's (x, y) fractions [N, 2] (action[:, :2]), where the
        predicted and the real next frame draw the cursor (the last context frame has it elsewhere: its magenta
        pixels are ignored wherever they are)."""
        before = read_states(last_context)
        after = read_states(real, cursor)
        shown = read_states(predicted, cursor)
        visible = after != UNREADABLE
        changed = visible & (before != UNREADABLE) & (before != after)
        device = self.changes.device
        self.changes += changed.sum(0).to(device, torch.float64)
        self.changes_right += (changed & (shown == after)).sum(0).to(device, torch.float64)
        self.frames += len(after)
        right = torch.stack([((shown == after) | ~visible).all(1), ((before == after) | ~visible).all(1)], 1)
        self.frames_right += right.sum(0).to(device, torch.float64)

    def compute(self) -> dict[str, float]:
        changes = self.changes.sum()
        results = {
            "state_accuracy": float(self.changes_right.sum() / changes),  # NaN when no widget changed
            "state_accuracy_copy_last": float(torch.zeros(()) / changes.cpu()),
            "state_frame_accuracy": float(self.frames_right[0] / self.frames),
            "state_frame_accuracy_copy_last": float(self.frames_right[1] / self.frames),
            "state_changes": float(changes),
            "state_frames": float(self.frames),
        }
        for k, widget in enumerate(WIDGETS):
            results[f"state_accuracy_{widget.name}"] = float(self.changes_right[k] / self.changes[k])
        return results
