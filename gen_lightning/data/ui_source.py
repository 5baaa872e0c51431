"""Built-in dataset for the world model: a real Tk app (data.ui_app) on a virtual X display, driven by a scripted
random-but-plausible user through real X input, its screen captured after every action.

One sample per step t = 0..T-1 of an episode (frame 0 is the screen before any action, frame t+1 the one after
action t; every frame carries the cursor sprite at its own step's pointer position, see data.ui_actions):
    __key__      "e{episode:05d}-t{t:04d}"
    png          frame t+1, size × size RGB
    context.png  frames t-K+1..t tiled left to right, (K·size) × size (frames before 0 repeat frame 0)
    action.json  action t: {"x", "y", "button", "click", "key"} (data.ui_actions.check_action)
    json         {"episode", "t", "kind", "target", "context_frames"}; kind is move, click, key, drag_press,
                 drag_move or drag_release, target the widget aimed at ("toggle", "menu:red", ...) or null
Train/val are split by episode, and an episode's samples are written in step order (val rollouts replay them).

Input goes through the X server's XTest extension, the path xdotool takes, but called in-process with ctypes:
0.4 ms per step against 3 ms per xdotool call (measured here). Before every capture the app has handled every event
and flushed its redraws, and it keeps no clock (no blinking, no timers, single clicks only), so the same seed gives
byte-identical shards. Each episode starts a fresh app with its own random.Random: episode e is the same whatever
the number of episodes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageGrab, features

from gen_lightning.data import ui_app
from gen_lightning.data.shard_writer import write_shards
from gen_lightning.data.ui_actions import KEYS, check_action, draw_cursor
from gen_lightning.errors import UserInputError

SETUP_HINT = "`make setup` installs it"


# --- the X display ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def virtual_display(side: int = ui_app.SCREEN) -> Iterator[str]:
    """A private Xvfb screen of side × side pixels on a free display number (e.g. ":3"), stopped on exit."""
    if shutil.which("Xvfb") is None:
        raise UserInputError(f"the UI recorder needs Xvfb: `apt-get install xvfb` ({SETUP_HINT}), or pass --display")
    read_fd, write_fd = os.pipe()
    # -displayfd: Xvfb picks a free display number itself and writes it once it accepts connections (no races).
    # -s 0 / -dpms: no screen saver blanking a long recording; -ardelay: no key auto-repeat, whatever the load.
    command = ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{side}x{side}x24", "-nolisten", "tcp"]
    command += ["-s", "0", "-dpms", "-nocursor", "-noreset", "-ardelay", "600000"]
    # Its own session: Ctrl-C reaches the recorder only, which then stops the app before the server.
    process = subprocess.Popen(
        command, pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    os.close(write_fd)
    try:
        number = b""
        while not number.endswith(b"\n"):
            chunk = os.read(read_fd, 16)
            if not chunk:
                error = process.stderr.read().decode(errors="replace").strip()[-500:] if process.stderr else ""
                raise RuntimeError(f"Xvfb exited before opening a display (exit code {process.wait()}): {error}")
            number += chunk
        yield f":{number.decode().strip()}"
    finally:
        os.close(read_fd)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


def _die_with_parent() -> None:
    # Linux: Xvfb gets SIGTERM when the recorder dies, even by SIGKILL, so no server outlives a killed recording.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


# --- real X input ---------------------------------------------------------------------------------------------------
def _load(name: str, package: str) -> ctypes.CDLL:
    path = ctypes.util.find_library(name)
    if path is None:
        raise UserInputError(f"the UI recorder needs lib{name}: `apt-get install {package}` ({SETUP_HINT})")
    return ctypes.CDLL(path)


class XInput:
    """Fake mouse and keyboard input through the XTest extension, on its own connection to `display`."""

    def __init__(self, display: str) -> None:
        self.x11, self.xtst = _load("X11", "libx11-6"), _load("Xtst", "libxtst6")
        self.x11.XOpenDisplay.restype = ctypes.c_void_p
        self.x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
        self.x11.XSync.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
        self.x11.XStringToKeysym.restype = ctypes.c_ulong
        self.x11.XStringToKeysym.argtypes = [ctypes.c_char_p]
        self.x11.XKeysymToKeycode.restype = ctypes.c_ubyte
        self.x11.XKeysymToKeycode.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
        self.xtst.XTestFakeMotionEvent.argtypes = [ctypes.c_void_p, *[ctypes.c_int] * 3, ctypes.c_ulong]
        self.xtst.XTestFakeButtonEvent.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_ulong]
        self.xtst.XTestFakeKeyEvent.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_ulong]
        self.display = self.x11.XOpenDisplay(display.encode())
        if not self.display:
            raise UserInputError(f"cannot open X display {display!r} (is an X server running there? see --display)")
        self.keycodes = {key: self._keycode(key) for key in KEYS if key}
        self.held = False

    def _keycode(self, key: str) -> int:
        code = self.x11.XKeysymToKeycode(self.display, self.x11.XStringToKeysym(key.encode()))
        if not code:
            raise RuntimeError(f"the X server's keyboard map has no key for keysym {key!r}")
        return code

    def move(self, x: int, y: int) -> None:
        self.xtst.XTestFakeMotionEvent(self.display, -1, x, y, 0)

    def button(self, down: bool) -> None:
        self.xtst.XTestFakeButtonEvent(self.display, 1, int(down), 0)
        self.held = down

    def key(self, key: str) -> None:
        # Press and release in one batch: the server never sees a held key, so nothing auto-repeats.
        self.xtst.XTestFakeKeyEvent(self.display, self.keycodes[key], 1, 0)
        self.xtst.XTestFakeKeyEvent(self.display, self.keycodes[key], 0, 0)

    def sync(self) -> None:
        """Return once the server has processed every event sent (and queued the app's events)."""
        self.x11.XSync(self.display, 0)

    def close(self) -> None:
        if self.display:
            self.x11.XCloseDisplay(self.display)
            self.display = None


# --- the scripted user ----------------------------------------------------------------------------------------------
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
# What it types into the focused entry: mostly letters, sometimes digits, spaces, corrections, Return (clears), Tab.
TYPING = {"letter": 72, "digit": 8, "space": 8, "BackSpace": 8, "Return": 2, "Tab": 2}
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
            return [Step("key", *pointer, target="entry", key=self._typed_key()) for _ in range(rng.randint(1, 5))]
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


def _clamp(value: int) -> int:
    return min(ui_app.SCREEN - 1, max(0, value))


def _inside(point: tuple[int, int], box: tuple[int, ...]) -> bool:
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]


def _under(point: tuple[int, int], boxes: dict[str, tuple[int, ...]]) -> str | None:
    """The widget at a point; an open menu's items lie on top of the rest."""
    hits = [name for name, box in boxes.items() if _inside(point, box)]
    return next((name for name in hits if name.startswith("menu:")), hits[0] if hits else None)


# --- one episode at a time ------------------------------------------------------------------------------------------
def action_of(step: Step, held: bool, side: int = ui_app.SCREEN) -> dict[str, Any]:
    """The action dict of a step: the cursor at the centre of its screen pixel, as a fraction of the screen."""
    return {
        "x": (step.x + 0.5) / side,
        "y": (step.y + 0.5) / side,
        "button": int(held),
        "click": int(step.kind in ("click", "drag_press")),
        "key": step.key,
    }


class AppProcess:
    """data.ui_app running on `display` in its own process (see ui_app.serve), answering with its state."""

    def __init__(self, display: str) -> None:
        command = [sys.executable, "-m", "gen_lightning.data.ui_app", "--display", display, "--serve"]
        # A file, not a pipe: Tk warnings can never fill it and block the app. Closed in close().
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip

    def request(self, command: str) -> dict[str, Any]:
        assert self.process.stdin and self.process.stdout
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.errors.seek(0)
            error = self.errors.read().decode(errors="replace").strip()[-1000:]
            raise RuntimeError(f"the UI app (data.ui_app) exited (code {self.process.wait()}): {error}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError, subprocess.TimeoutExpired):
            self.process.communicate("quit\n", timeout=5)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.errors.close()


class UiRecorder:
    """The app plus real input on `display`: reset() starts an episode, do() performs one step. Both leave in
    `state` what the app shows and return the screen as it is afterwards, size × size, without the cursor."""

    def __init__(self, display: str, size: int = 64) -> None:
        if not features.check("xcb"):
            raise UserInputError(
                "the UI recorder captures the screen with Pillow's XCB support, which this Pillow lacks"
            )
        self.display, self.size = display, size
        self.input = XInput(display)
        try:
            self.app = AppProcess(display)
        except BaseException:
            self.input.close()
            raise
        self.state: dict[str, Any] = {}
        self.pointer = (0, 0)

    def reset(self, x: int, y: int) -> Image.Image:
        """A fresh app (no state kept from an earlier episode) with the pointer at (x, y)."""
        if self.input.held:
            self.input.button(False)
        self.input.move(x, y)  # before the window maps, so it maps under the pointer as it will be at step 0
        self.input.sync()
        self.pointer = (x, y)
        return self._capture("reset")

    def do(self, step: Step) -> Image.Image:
        if step.kind == "key":
            self.input.key(step.key)
        else:
            self.input.move(step.x, step.y)
            if step.kind in ("click", "drag_press"):
                self.input.button(True)
            if step.kind in ("click", "drag_release"):
                self.input.button(False)
            self.pointer = (step.x, step.y)
        return self._capture("settle")

    def _capture(self, command: str) -> Image.Image:
        self.input.sync()  # the server has turned our input into the app's events...
        self.state = self.app.request(command)  # ...which the app has handled and drawn when it answers
        screen = ImageGrab.grab(xdisplay=self.display).convert("RGB")
        if screen.size != (ui_app.SCREEN, ui_app.SCREEN):
            raise UserInputError(
                f"X display {self.display} is {screen.size[0]}×{screen.size[1]}, the app needs "
                f"{ui_app.SCREEN}×{ui_app.SCREEN} (start Xvfb with -screen 0 {ui_app.SCREEN}x{ui_app.SCREEN}x24)"
            )
        # BOX averages whole source pixels: a clean 2× reduction at the default size, no ringing at any size.
        return screen.resize((self.size, self.size), Image.Resampling.BOX)

    def close(self) -> None:
        if self.input.held:
            self.input.button(False)
            self.input.sync()
        self.app.close()
        self.input.close()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def episode_of(key: str) -> str:
    """'e00012-t0003' -> 'e00012': what decides a sample's split, so an episode is never split."""
    return key.split("-", 1)[0]


def iter_ui_samples(
    display: str, episodes: Iterable[int], steps: int = 32, context: int = 4, size: int = 64, seed: int = 0
) -> Iterator[dict[str, Any]]:
    """Samples of the given episode numbers, `steps` steps each, episode by episode, step by step (layout: see
    write_ui_shards). An episode's samples depend only on (seed, its number), not on the episodes before it."""
    recorder = UiRecorder(display, size)
    try:
        for episode in episodes:
            # A str seed is hashed with SHA-512 by random.Random: the same in every process, unlike hash().
            policy = ScriptedPolicy(f"ui:{seed}:{episode}")
            start = policy.start_position()
            first = action_of(Step("move", *start), held=False)
            frame = draw_cursor(recorder.reset(*start), first["x"], first["y"])
            history = deque([frame] * context, maxlen=context)  # frames before 0 repeat frame 0
            for t in range(steps):
                step = policy.next_step(recorder.state, recorder.pointer)
                screen = recorder.do(step)
                action = check_action(action_of(step, recorder.input.held), f"episode {episode} step {t}")
                frame = draw_cursor(screen, action["x"], action["y"])
                tiles = Image.new("RGB", (context * size, size))
                for index, past in enumerate(history):
                    tiles.paste(past, (index * size, 0))
                yield {
                    "__key__": f"e{episode:05d}-t{t:04d}",
                    "png": _png(frame),
                    "context.png": _png(tiles),
                    "action.json": action,
                    "json": {
                        "episode": episode,
                        "t": t,
                        "kind": step.kind,
                        "target": step.target,
                        "context_frames": context,
                    },
                }
                history.append(frame)
    finally:
        recorder.close()


def app_description() -> dict[str, Any]:
    """What the manifest says about the app: name, version, Tk version and widget boxes as fractions of the frame."""
    import tkinter

    side = ui_app.SCREEN
    boxes = {name: [x / side, y / side, (x + w) / side, (y + h) / side] for name, (x, y, w, h) in ui_app.LAYOUT.items()}
    tk_version = tkinter.Tcl().eval("info patchlevel")
    return {"name": ui_app.APP_NAME, "version": ui_app.APP_VERSION, "tk": tk_version, "widgets": boxes}


def write_ui_shards(
    out_dir: str | Path,
    episodes: int = 600,
    steps: int = 32,
    context: int = 4,
    size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 256,
    val_fraction: float = 0.1,
    display: str | None = None,
) -> dict:
    """Record `episodes` episodes into train/val shards under `out_dir` (split by episode); returns the manifest.

    `display` is an X display with a SCREEN × SCREEN screen to use; None starts a private Xvfb and stops it after.
    """
    for name, value, low in (("episodes", episodes, 1), ("steps", steps, 1), ("context", context, 1)):
        if value < low:
            raise UserInputError(f"--{name} must be >= {low}, got {value}")
    if not 8 <= size <= ui_app.SCREEN:
        raise UserInputError(
            f"--size must be in [8, {ui_app.SCREEN}] (the app's screen is {ui_app.SCREEN} px), got {size}"
        )
    source = {
        "name": "ui",
        "app": app_description(),
        "episodes": episodes,
        "steps_per_episode": steps,
        "context_frames": context,
        "frame_size": size,
        "screen_size": [ui_app.SCREEN, ui_app.SCREEN],
        "seed": seed,
        "keys": list(KEYS),
    }
    with contextlib.ExitStack() as stack:
        if display is None:
            display = stack.enter_context(virtual_display())
        samples = iter_ui_samples(display, range(episodes), steps, context, size, seed)
        stack.callback(samples.close)  # stops the app before the display goes, even when writing fails
        return write_shards(
            samples,
            out_dir,
            samples_per_shard=samples_per_shard,
            val_fraction=val_fraction,
            source=source,
            split_key=episode_of,
        )
