"""Built-in dataset for the world model: a real Tk app (data.ui_app) on a virtual X display, driven by a scripted
random-but-plausible user through real X input, its screen captured after every action.

One sample per step t = 0..T-1 of an episode (frame 0 is the screen before any action, frame t+1 the one after
action t; every frame carries the cursor sprite at its own step's pointer position, see gen_lightning.actions):
    __key__      "e{episode:05d}-t{t:04d}"
    png          frame t+1, size × size RGB
    context.png  frames t-K+1..t tiled left to right, (K·size) × size (frames before 0 repeat frame 0)
    action.json  action t: {"x", "y", "button", "click", "key"} (gen_lightning.actions.check_action)
    json         {"episode", "t", "kind", "target", "context_frames", "entry_scrolled"}; kind is move, click, key,
                 drag_press, drag_move or drag_release, target the widget aimed at ("toggle", "menu:red", ...) or
                 null; entry_scrolled whether the action moved the text entry's view (its text overflowed, or came
                 back into view): a rare change that moves a whole line of glyphs, for data.oversample
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
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image, ImageGrab, features

from gen_lightning.actions import KEYS, check_action, draw_cursor
from gen_lightning.data import ui_app
from gen_lightning.data.shard_writer import write_shards
from gen_lightning.data.ui_policy import LoggingPolicy, ReplayPolicy, ScriptedPolicy, Step, action_of
from gen_lightning.errors import UserInputError
from gen_lightning.progress import progress

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


# --- one episode at a time ------------------------------------------------------------------------------------------
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
    display: str,
    episodes: Iterable[int],
    steps: int = 32,
    context: int = 4,
    size: int = 64,
    seed: int = 0,
    policy_for: Callable[[int], ScriptedPolicy | ReplayPolicy | LoggingPolicy] | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples of the given episode numbers, `steps` steps each, episode by episode, step by step (layout: see
    write_ui_shards). An episode's samples depend only on (seed, its number), not on the episodes before it.
    `policy_for(episode)` replaces the scripted random user (e.g. a ReplayPolicy)."""
    recorder = UiRecorder(display, size)
    try:
        for episode in episodes:
            # A str seed is hashed with SHA-512 by random.Random: the same in every process, unlike hash().
            policy = policy_for(episode) if policy_for else ScriptedPolicy(f"ui:{seed}:{episode}")
            start = policy.start_position()
            first = action_of(Step("move", *start), held=False)
            frame = draw_cursor(recorder.reset(*start), first["x"], first["y"])
            history = deque([frame] * context, maxlen=context)  # frames before 0 repeat frame 0
            for t in range(steps):
                step = policy.next_step(recorder.state, recorder.pointer)
                first_in_view = recorder.state["text_first"]
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
                        "entry_scrolled": recorder.state["text_first"] != first_in_view,
                    },
                }
                history.append(frame)
    finally:
        recorder.close()


def iter_logged_ui_samples(
    display: str, episodes: Iterable[int], steps: int = 32, context: int = 4, size: int = 64, seed: int = 0
) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """iter_ui_samples' samples, each as (sample, the app's state before its action, after it) (UiApp.state()): the
    truth the frame readers are calibrated against. The policy sees the state after a step only when it plans the
    next one, so each episode records one step more, which is not yielded."""
    logs: dict[int, list[dict[str, Any]]] = {}

    def policy_for(episode: int) -> LoggingPolicy:
        policy = LoggingPolicy(ScriptedPolicy(f"ui:{seed}:{episode}"))  # iter_ui_samples' own user
        logs[episode] = policy.log
        return policy

    previous: dict[str, Any] | None = None
    for sample in iter_ui_samples(display, episodes, steps + 1, context, size, seed, policy_for=policy_for):
        if previous is not None:  # its step's after-state is logged now that this step has been planned
            episode, t = previous["json"]["episode"], previous["json"]["t"]
            yield previous, logs[episode][t], logs[episode][t + 1]
        previous = sample if sample["json"]["t"] < steps else None


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
            progress(samples, total=episodes * steps, desc="recording", unit="samples"),
            out_dir,
            samples_per_shard=samples_per_shard,
            val_fraction=val_fraction,
            source=source,
            split_key=episode_of,
        )
