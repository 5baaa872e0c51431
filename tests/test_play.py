"""`gen-lightning play`: the session on a real (tiny, untrained) WorldModel checkpoint, its HTTP server, the CLI, and
the page driven by real input events in a headless Chromium, checked on a screenshot."""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from gen_lightning.errors import UserInputError
from gen_lightning.images import pil_to_tensor
from gen_lightning.models.loading import CheckpointError, load_model
from gen_lightning.models.world_model import NextFrame, WorldModel
from gen_lightning.play import PlayServer, PlaySession, load_session, make_server
from tests.conftest import save_checkpoint, shape_png

SIZE = 32
UNET = {"channels": [16, 32], "attention_levels": [], "num_res_blocks": 1}


def tiny_world_model(start: bool = True) -> WorldModel:
    torch.manual_seed(0)
    model = WorldModel(unet=UNET, image_size=SIZE, context_frames=2, sample_steps=4)
    if start:  # a red circle on white: far from the noise an untrained model generates
        circle = pil_to_tensor(Image.open(io.BytesIO(shape_png("red", "circle", SIZE))))
        model.start_frames.copy_(circle.expand_as(model.start_frames))
    return model


@pytest.fixture(scope="module")
def world_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tiny_world_model(), tmp_path_factory.mktemp("world") / "world.ckpt")


@pytest.fixture
def session(world_ckpt) -> PlaySession:
    return load_session(world_ckpt)


@pytest.fixture
def server(session) -> Iterator[PlayServer]:
    server = make_server(session)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def png_array(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


ACTION = {"x": 0.25, "y": 0.75, "button": 1, "click": 1, "key": "a"}


# --- the session ------------------------------------------------------------------------------------------------------
def test_session_rolls_the_context_counts_steps_and_reset_replays(session):
    start = session.model.start_context(1)
    assert torch.equal(session.context, start) and session.step_count == 0
    first = session.step(ACTION)
    assert first.step == session.step_count == 1 and first.action == ACTION
    assert torch.equal(session.context[:, 0], start[:, 1])  # the oldest frame dropped out
    newest = session.context[:, 1].clone()
    second = session.step({"x": 0.5, "y": 0.5})
    assert second.step == 2 and torch.equal(session.context[:, 0], newest)
    assert [entry["step"] for entry in session.history] == [1, 2]
    assert session.history[1] == {"step": 2, "x": 0.5, "y": 0.5, "button": 0, "click": 0, "key": ""}
    assert first.png != second.png
    # The PNG is the newest context frame (8-bit rounding apart).
    assert np.abs(png_array(second.png) / 127.5 - 1 - session.context[0, 1].permute(1, 2, 0).numpy()).max() < 1 / 127

    reset = session.reset()
    assert reset.step == session.step_count == 0 and not session.history
    assert torch.equal(session.context, start)
    assert session.step(ACTION).png == first.png  # the seed's noise starts over


@pytest.mark.parametrize(
    ("action", "named"),
    [
        ({"x": 1.5, "y": 0.5}, "x=1.5"),
        ({"x": 0.5, "y": 0.5, "key": "Escape"}, "key 'Escape'"),
        ({"x": 0.5, "y": 0.5, "button": 2}, "button=2"),
        ({"y": 0.5}, "KeyError('x')"),
    ],
)
def test_session_rejects_a_bad_action_naming_the_field(session, action, named):
    with pytest.raises(UserInputError, match="my request") as err:
        session.step(action, where="my request")
    assert named in str(err.value)
    assert session.step_count == 0 and not session.history


def test_load_session_names_the_checkpoint(tmp_path, tiny_vae_checkpoint):
    with pytest.raises(CheckpointError, match=r"vae\.ckpt.*holds a VAEModel, expected a WorldModel"):
        load_session(tiny_vae_checkpoint)
    blank = save_checkpoint(tiny_world_model(start=False), tmp_path / "blank.ckpt")
    with pytest.raises(UserInputError, match=r"blank\.ckpt.*no start screen"):
        load_session(blank)


def test_a_session_samples_with_the_sampler_and_steps_it_was_given(world_ckpt):
    # ddpm: its fresh noise each step tells it apart from the model's ddim even on an untrained (zero-output) UNet
    fast = load_session(world_ckpt, steps=3, sampler="ddpm")
    assert fast.state()["sampler"] == "ddpm" and fast.state()["sample_steps"] == 3
    frame = fast.step(ACTION)
    model = load_model(world_ckpt)
    generator = torch.Generator().manual_seed(0)  # the session's seed, its first step
    by_hand = model.sample(1, NextFrame(model.start_context(1), [ACTION]), steps=3, sampler="ddpm", generator=generator)
    torch.testing.assert_close(fast.context[:, -1], by_hand, atol=0, rtol=0)
    assert frame.png != load_session(world_ckpt, steps=3).step(ACTION).png
    with pytest.raises(UserInputError, match="flow_euler"):
        load_session(world_ckpt, sampler="flow_euler")


# --- the HTTP server --------------------------------------------------------------------------------------------------
def test_server_serves_page_frame_and_steps(server, session):
    with urllib.request.urlopen(server.url, timeout=10) as response:
        page = response.read().decode()
    assert '<img id="screen"' in page and "<script>" in page
    assert "http://" not in page and "https://" not in page  # no external assets: works offline through ssh -L

    with urllib.request.urlopen(server.url + "frame.png", timeout=10) as response:
        assert response.headers["Cache-Control"] == "no-store" and response.headers["X-Step"] == "0"
        assert Image.open(io.BytesIO(response.read())).size == (SIZE, SIZE)

    status, reply = post(server.url + "action", json.dumps(ACTION).encode())
    assert status == 200 and reply["step"] == 1 and reply["action"] == ACTION
    frame = base64.b64decode(reply["frame"].removeprefix("data:image/png;base64,"))
    with urllib.request.urlopen(server.url + "frame.png", timeout=10) as response:
        assert response.read() == frame == session.current().png
    with urllib.request.urlopen(server.url + "state", timeout=10) as response:
        state = json.loads(response.read())
    assert state["step"] == 1 and state["history"] == [{"step": 1, **ACTION}] and state["image_size"] == SIZE

    status, reply = post(server.url + "reset", b"")
    assert status == 200 and reply["step"] == 0 and session.step_count == 0


def test_a_taken_port_is_named(server, session):
    with pytest.raises(UserInputError, match=f"--port {server.server_address[1]}: cannot listen"):
        make_server(session, port=server.server_address[1])


@pytest.mark.parametrize(
    ("path", "body", "status", "named"),
    [
        ("action", b'{"x": 0.5, "y": -0.1}', 400, "y=-0.1"),
        ("action", b'{"x": 0.5, "y": 0.5, "key": "F1"}', 400, "key 'F1'"),
        ("action", b'{"x": 0.5, "y": 0.5, "click": "yes"}', 400, "POST /action: not an action"),
        ("action", b"x=1", 400, "not JSON"),
        ("action", b"[0.5, 0.5]", 400, "expected a JSON object"),
        ("action", b"{" + b" " * 20000 + b"}", 413, "20002 bytes"),
        ("jump", b"{}", 404, "POST '/jump'"),
    ],
)
def test_server_refuses_bad_requests_with_a_message(server, session, path, body, status, named):
    code, reply = post(server.url + path, body)
    assert code == status and named in reply["error"]
    assert session.step_count == 0


# --- the CLI ----------------------------------------------------------------------------------------------------------
def test_play_command_serves_until_interrupted(world_ckpt):
    from gen_lightning.cli import main

    with pytest.raises(SystemExit):
        main(["play", "--ckpt", str(world_ckpt), "--steps", "0"])
    process = subprocess.Popen(
        [sys.executable, "-m", "gen_lightning.cli", "play", "--ckpt", str(world_ckpt), "--port", "0", "--steps", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        # Warnings printed while the model loads may come first (stderr is merged): read up to the URL line.
        while not (line := process.stdout.readline()).startswith("gen-lightning play: open http://localhost:"):
            assert line, f"play exited before serving: {''.join(seen)}"
            seen.append(line)
        url = line.split()[3]
        assert "ssh -L" in process.stdout.readline()
        status, reply = post(url + "action", json.dumps(ACTION).encode())
        assert status == 200 and reply["step"] == 1
    finally:
        # SIGTERM, not SIGINT: when the suite itself was started in the background by a non-interactive shell
        # (`bash -c 'pytest ... &'`, as CI wrappers do), bash starts it with SIGINT ignored, every child inherits
        # that, and Python then installs no KeyboardInterrupt handler. `play` stops on both.
        process.send_signal(signal.SIGTERM)
        try:
            output = process.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
            pytest.fail(f"play did not stop within 60 s of SIGTERM; before serving it printed {seen}, then {output!r}")
    assert process.returncode == 0 and "stopped" in output, output


# --- a real browser ---------------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMIUM_FLAGS = (
    "--headless=new",
    "--remote-debugging-pipe",
    "--no-sandbox",  # the tests run as root, where Chromium's sandbox refuses to start
    "--no-first-run",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--mute-audio",
    "--force-device-scale-factor=1",  # one CSS pixel = one screenshot pixel
    "--force-color-profile=srgb",  # screenshot colours = the PNG's bytes
    "--window-size=640,480",
)


class Chromium:
    """Headless Chromium driven with the DevTools protocol over a pipe (Chromium reads fd 3, writes fd 4; messages
    are NUL-terminated JSON): stdlib only, no port, no websocket."""

    def __init__(self, folder: Path) -> None:
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        self.log = folder / "chromium.log"
        # bash moves the pipe ends to fds 3 and 4: pass_fds keeps their numbers, preexec_fn is unsafe beside the
        # server's threads, and dash (/bin/sh) refuses fd numbers above 9.
        command = f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}'
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={folder / 'profile'}", "about:blank"]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["bash", "-c", command, CHROMIUM, *flags],
                pass_fds=(to_browser, from_browser),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        self.session_id: str | None = None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session_id = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session_id:
            message["sessionId"] = self.session_id
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:  # events arrive interleaved with replies: skip them
            while b"\0" not in self._buffer:
                if not select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"Chromium did not answer {method} in {timeout} s")
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    log = self.log.read_text(errors="replace")[-2000:]
                    raise EOFError(f"Chromium closed the pipe during {method}; {self.log}:\n{log}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        # Right after a navigation the old document or none at all may answer: an error there means "not yet".
        guarded = f"(() => {{ try {{ return {expression}; }} catch (error) {{ return null; }} }})()"
        while not (value := self.evaluate(guarded)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page: {expression} still false after {timeout} s; status: {self.status()}")
            time.sleep(0.02)
        return value

    def status(self) -> str:
        return self.evaluate("document.body.dataset.state + ': ' + document.getElementById('status').textContent")

    def mouse(self, kind: str, x: float, y: float) -> None:
        params = {"type": kind, "x": x, "y": y, "button": "none" if kind == "mouseMoved" else "left"}
        if kind != "mouseMoved":
            params["clickCount"] = 1
        self.call("Input.dispatchMouseEvent", params)

    def key(self, key: str, code: str, key_code: int, text: str = "") -> None:
        params = {"key": key, "code": code, "windowsVirtualKeyCode": key_code}
        self.call("Input.dispatchKeyEvent", {"type": "keyDown" if text else "rawKeyDown", "text": text, **params})
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", **params})

    def screenshot(self) -> Image.Image:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
            self.process.wait(10)
        except (OSError, EOFError, TimeoutError, RuntimeError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(10)
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)


@pytest.fixture
def browser(tmp_path) -> Iterator[Chromium]:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    chromium = Chromium(tmp_path)
    yield chromium
    chromium.close()


def shown_frame(browser: Chromium, rect: dict[str, float]) -> np.ndarray:
    """The screen element cut out of a real screenshot and shrunk back to the frame size (each frame pixel is a
    scale × scale block, drawn pixelated, so the box average gives the pixel back)."""
    box = tuple(round(rect[k]) for k in ("left", "top", "right", "bottom"))
    crop = browser.screenshot().crop(box).resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(crop, dtype=np.float64)


def test_page_in_a_real_browser_drives_the_model(server, session, browser):
    browser.call("Page.navigate", {"url": server.url})
    browser.wait_for("document.body.dataset.state === 'idle'")
    rect = browser.evaluate("(({left, top, right, bottom, width, height}) => ({left, top, right, bottom, width, "
                            "height}))(document.getElementById('screen').getBoundingClientRect())")  # fmt: skip
    assert rect["width"] == rect["height"] == SIZE * session.scale, rect
    start = png_array(session.current().png)
    difference = np.abs(shown_frame(browser, rect) - start).mean()
    assert difference < 1.0, difference  # the start screen, as the server has it
    assert browser.evaluate("document.getElementById('step').textContent") == "0"

    def at(fx: float, fy: float) -> tuple[int, int]:  # a whole CSS pixel inside the image
        return round(rect["left"] + fx * rect["width"]), round(rect["top"] + fy * rect["height"])

    def fraction(point: tuple[int, int]) -> tuple[float, float]:
        return (point[0] - rect["left"]) / rect["width"], (point[1] - rect["top"]) / rect["height"]

    press, release = at(0.25, 0.5), at(0.7, 0.2)
    browser.mouse("mouseMoved", *press)
    browser.mouse("mousePressed", *press)
    browser.mouse("mouseMoved", *release)  # a drag: the button stays held
    browser.mouse("mouseReleased", *release)
    browser.mouse("mouseMoved", rect["right"] + 40, rect["top"] + 10)  # off the image, no button: not an action
    browser.key("a", "KeyA", 65, "a")
    browser.key("Shift", "ShiftLeft", 16)  # not in the vocabulary: ignored
    browser.key("Enter", "Enter", 13, "\r")
    browser.key(" ", "Space", 32, " ")
    browser.wait_for("document.body.dataset.state === 'idle' && document.getElementById('step').textContent === '7'")
    expected = [
        (press, 0, 0, ""),
        (press, 1, 1, ""),
        (release, 1, 0, ""),
        (release, 0, 0, ""),
        (release, 0, 0, "a"),
        (release, 0, 0, "Return"),
        (release, 0, 0, "space"),
    ]
    assert len(session.history) == len(expected)
    pixel = 1 / rect["width"]  # one CSS pixel as a fraction
    for got, (point, button, click, key) in zip(session.history, expected, strict=True):
        x, y = fraction(point)
        assert abs(got["x"] - x) <= pixel and abs(got["y"] - y) <= pixel, (got, x, y)
        assert (got["button"], got["click"], got["key"]) == (button, click, key), got

    # Moves made while a step is in flight coalesce: hold the model, sweep the mouse, and only the first move
    # (already sent) and the last one reach it.
    sweep = [at(0.1 + 0.04 * i, 0.9 - 0.03 * i) for i in range(20)]
    with session._lock:
        for point in sweep:
            browser.mouse("mouseMoved", *point)
    browser.wait_for("document.body.dataset.state === 'idle' && document.getElementById('step').textContent === '9'")
    assert session.step_count == 9
    # Chromium may itself merge moves before the page sees them, so the first one sent can be any of the sweep's.
    first, last = [(entry["x"], entry["y"]) for entry in list(session.history)[-2:]]
    assert any(max(abs(first[0] - x), abs(first[1] - y)) <= pixel for x, y in map(fraction, sweep[:-1])), first
    x, y = fraction(sweep[-1])
    assert abs(last[0] - x) <= pixel and abs(last[1] - y) <= pixel, (last, x, y)

    # What the browser shows is the server's current frame, not the start screen.
    shown, current = shown_frame(browser, rect), png_array(session.current().png)
    to_current, to_start = np.abs(shown - current).mean(), np.abs(shown - start).mean()
    assert to_current < 1.0 and to_start > 20, (to_current, to_start)

    # The Reset button: back to step 0 and the start screen, in the page and in the server.
    button = browser.evaluate("(({x, y, width, height}) => [x + width / 2, y + height / 2])"
                              "(document.getElementById('reset').getBoundingClientRect())")  # fmt: skip
    browser.mouse("mousePressed", *button)
    browser.mouse("mouseReleased", *button)
    browser.wait_for("document.body.dataset.state === 'idle' && document.getElementById('step').textContent === '0'")
    assert session.step_count == 0 and not session.history
    difference = np.abs(shown_frame(browser, rect) - start).mean()
    assert difference < 1.0, difference
