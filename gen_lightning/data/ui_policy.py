"""The UI recorder's users: ScriptedPolicy, a seeded random-but-plausible user, and ReplayPolicy, a fixed script (for
demonstrations). Both plan from what the app reports (UiApp.state(): menu open, entry focused, widget boxes) and return
Steps in screen pixels; `action_of` turns a Step into the stored action (gen_lightning.actions).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gen_lightning.actions import KEYS
from gen_lightning.data import ui_app


@dataclass(frozen=True)
class Step:
    """One action: where the pointer ends up (screen pixels) and what happens there."""

    kind: str  # "move" | "click" | "key" | "drag_press" | "drag_move" | "drag_release"
    x: int
    y: int
    target: str | None = None  # the widget (or "menu:<item>") the step is about; None for none
    key: str = ""


# What the user sets out to do when no menu is open and it is not typing, with how often (weights).
GOALS = {"toggle": 24, "checkbox": 22, "entry": 16, "menu": 14, "panel": 4, "wander": 10, "drag": 5, "stray_key": 5}
# What it types into the focused entry: a burst that is a short word (its letters in order, sometimes a space after),
# or one to three other keys (any letter, digits, spaces, corrections, Return (clears), Tab). People type words: a
# small vocabulary gives each glyph enough examples for a small model to learn to draw it, and the stray letters
# keep the whole alphabet in the data.
WORD_SHARE = 0.6
WORDS = ("hi", "hello", "ok", "yes", "no", "cat", "dog", "sun", "go", "red", "blue", "on", "off", "box", "abc", "test")
TYPING = {"letter": 45, "digit": 10, "space": 10, "BackSpace": 20, "Return": 10, "Tab": 5}
_MARGIN = 4  # clicks land at least this far inside a widget, as a person's would


class ScriptedPolicy:
    """A random but plausible user: heads for a widget in a few jittered moves and clicks it, types a few keys when
    the entry has the focus, picks a colour once the menu is open, sometimes wanders, drags or hits a stray key.

    It plans a few steps at a time from what the app shows (menu open, entry focused, widget boxes), so the same
    seed gives the same steps as long as the app renders the same: the recorder checks that it does."""

    def __init__(self, seed: int | str) -> None:
        self.rng = random.Random(seed)
        self.plan: deque[Step] = deque()

    def start_position(self) -> tuple[int, int]:
        return self._point((0, 0, ui_app.SCREEN, ui_app.SCREEN), margin=0)

    def next_step(self, state: dict[str, Any], pointer: tuple[int, int]) -> Step:
        """The next step, given the app's state (UiApp.state()) and the pointer's position."""
        if not self.plan:
            self.plan.extend(self._new_plan(state, pointer))
        return self.plan.popleft()

    def _new_plan(self, state: dict[str, Any], pointer: tuple[int, int]) -> list[Step]:
        rng = self.rng
        boxes = {name: tuple(box) for name, box in state["boxes"].items()}
        if state["menu_open"]:
            items = sorted(name for name in boxes if name.startswith("menu:"))
            choice, item = rng.random(), rng.choice(items)
            if choice < 0.7:
                return self._approach(pointer, item, boxes[item], max_moves=1)
            if choice < 0.85:
                return [Step("move", *self._point(boxes[item]), target=item)]
            return [self._click_outside(boxes)]  # closes the menu; the click reaches nothing else
        if state["entry_focused"] and rng.random() < 0.6:
            return [Step("key", *pointer, target="entry", key=key) for key in self._typing_burst()]
        goal = rng.choices(list(GOALS), weights=list(GOALS.values()))[0]
        if goal in boxes:
            return self._approach(pointer, goal, boxes[goal], max_moves=3)
        if goal == "stray_key":  # nothing has the focus: the key must change nothing
            return [Step("key", *pointer, target=None, key=rng.choice(KEYS[1:]))]
        if goal == "drag":
            return self._drag(boxes)
        points = [self._point((0, 0, ui_app.SCREEN, ui_app.SCREEN), margin=0) for _ in range(rng.randint(1, 2))]
        return [Step("move", x, y, target=_under((x, y), boxes)) for x, y in points]

    def _approach(self, pointer: tuple[int, int], name: str, box: tuple[int, ...], max_moves: int) -> list[Step]:
        """0..max_moves moves, each covering part of the way with a wobble, then a click inside the box."""
        goal_x, goal_y = self._point(box)
        x, y = pointer
        steps = []
        for _ in range(self.rng.randint(0, max_moves)):
            share = self.rng.uniform(0.35, 0.8)
            x = _clamp(round(x + share * (goal_x - x) + self.rng.gauss(0, 5)))
            y = _clamp(round(y + share * (goal_y - y) + self.rng.gauss(0, 5)))
            steps.append(Step("move", x, y, target=name))
        return [*steps, Step("click", goal_x, goal_y, target=name)]

    def _drag(self, boxes: dict[str, tuple[int, ...]]) -> list[Step]:
        """Press in a widget (most often the entry: it selects text), move once or twice, release."""
        name = "entry" if self.rng.random() < 0.5 else self.rng.choice(sorted(ui_app.LAYOUT))
        x, y = self._point(boxes[name])
        steps = [Step("drag_press", x, y, target=name)]
        for kind in ["drag_move"] * self.rng.randint(1, 2) + ["drag_release"]:
            x = _clamp(x + self.rng.randint(-40, 40))
            y = _clamp(y + self.rng.randint(-12, 12))
            steps.append(Step(kind, x, y, target=name))
        return steps

    def _click_outside(self, boxes: dict[str, tuple[int, ...]]) -> Step:
        menu = [box for name, box in boxes.items() if name.startswith("menu:")]
        while True:  # the open menu covers well under half of the screen: this ends after a few draws
            x, y = self._point((0, 0, ui_app.SCREEN, ui_app.SCREEN), margin=0)
            if not any(_inside((x, y), box) for box in menu):
                return Step("click", x, y, target=_under((x, y), boxes))

    def _typing_burst(self) -> list[str]:
        if self.rng.random() < WORD_SHARE:
            return [*self.rng.choice(WORDS), *(["space"] if self.rng.random() < 0.5 else [])]
        return [self._typed_key() for _ in range(self.rng.randint(1, 3))]

    def _typed_key(self) -> str:
        kind = self.rng.choices(list(TYPING), weights=list(TYPING.values()))[0]
        if kind == "letter":
            return self.rng.choice("abcdefghijklmnopqrstuvwxyz")
        if kind == "digit":
            return self.rng.choice("0123456789")
        return kind

    def _point(self, box: tuple[int, ...], margin: int = _MARGIN) -> tuple[int, int]:
        x0, y0, x1, y1 = box
        margin = min(margin, (x1 - x0 - 1) // 2, (y1 - y0 - 1) // 2)
        return self.rng.randint(x0 + margin, x1 - 1 - margin), self.rng.randint(y0 + margin, y1 - 1 - margin)


class ReplayPolicy:
    """A fixed script for demonstrations and tests: (kind, target, key) steps, each aimed at the centre of its target
    widget's box as the app reports it at that moment (a menu item only exists while the menu is open); a step
    without a target stays where the pointer is."""

    def __init__(self, script: Sequence[tuple[str, str | None, str]], start: tuple[int, int] = (96, 16)) -> None:
        self.script = list(script)
        self.start = start
        self.index = 0

    def start_position(self) -> tuple[int, int]:
        return self.start

    def next_step(self, state: dict[str, Any], pointer: tuple[int, int]) -> Step:
        if self.index >= len(self.script):
            raise ValueError(f"ReplayPolicy: the script has only {len(self.script)} steps")
        kind, target, key = self.script[self.index]
        self.index += 1
        x, y = pointer
        if target is not None:
            if target not in state["boxes"]:
                raise ValueError(
                    f"ReplayPolicy step {self.index}: no {target!r} on screen (has {sorted(state['boxes'])})"
                )
            left, top, right, bottom = state["boxes"][target]
            x, y = (left + right) // 2, (top + bottom) // 2
        return Step(kind, x, y, target, key)


class LoggingPolicy:
    """Another policy, keeping in `log` the app state it is shown before each step (= the state after the step
    before): what the frame readers (metrics.ui_state, metrics.ui_text) are checked against (ui_source's
    iter_logged_ui_samples)."""

    def __init__(self, inner: ScriptedPolicy | ReplayPolicy) -> None:
        self.inner = inner
        self.log: list[dict[str, Any]] = []

    def start_position(self) -> tuple[int, int]:
        return self.inner.start_position()

    def next_step(self, state: dict[str, Any], pointer: tuple[int, int]) -> Step:
        self.log.append(state)
        return self.inner.next_step(state, pointer)


def _clamp(value: int) -> int:
    return min(ui_app.SCREEN - 1, max(0, value))


def _inside(point: tuple[int, int], box: tuple[int, ...]) -> bool:
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]


def _under(point: tuple[int, int], boxes: dict[str, tuple[int, ...]]) -> str | None:
    """The widget at a point; an open menu's items lie on top of the rest."""
    hits = [name for name, box in boxes.items() if _inside(point, box)]
    return next((name for name in hits if name.startswith("menu:")), hits[0] if hits else None)


def action_of(step: Step, held: bool, side: int = ui_app.SCREEN) -> dict[str, Any]:
    """The action dict of a step: the cursor at the centre of its screen pixel, as a fraction of the screen."""
    return {
        "x": (step.x + 0.5) / side,
        "y": (step.y + 0.5) / side,
        "button": int(held),
        "click": int(step.kind in ("click", "drag_press")),
        "key": step.key,
    }
