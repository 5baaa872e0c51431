"""`gen-lightning play`: drive a world model from a web page served on localhost.

One PlaySession holds the model and the current context; a stdlib ThreadingHTTPServer serves the page
(gen_lightning.play_page) and turns each POSTed mouse/keyboard action into one model step. A web page rather than a
window because the usual setup is a GPU node reached over `ssh -L`, where no display exists.

Endpoints:
    GET  /           the page
    GET  /frame.png  the current frame (never cached)
    GET  /state      {"step", "image_size", "scale", "sample_steps", "sampler", "context_frames", "history"}
    POST /action     an action dict (gen_lightning.actions) -> one model step -> {"step", "action", "seconds", "frame"}
    POST /reset      back to the stored start screen -> the same reply, step 0
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from gen_lightning.actions import check_action
from gen_lightning.errors import UserInputError
from gen_lightning.images import to_uint8
from gen_lightning.interrupts import sigterm_as_interrupt
from gen_lightning.models.world_model import NextFrame, WorldModel
from gen_lightning.play_page import PAGE

log = logging.getLogger(__name__)
# Actions kept per episode for GET /state (a person at the page makes a few per second; this is hours).
HISTORY_LIMIT = 10_000
# An action is ~100 bytes of JSON; anything much larger is not one.
MAX_BODY_BYTES = 16 * 1024


@dataclass(frozen=True)
class Frame:
    """The session's state after a step or reset, taken under the lock so step and picture always agree."""

    step: int
    png: bytes
    action: dict[str, Any] | None = None
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        data_url = "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")
        return {"step": self.step, "action": self.action, "seconds": round(self.seconds, 4), "frame": data_url}


def frame_png(frame: torch.Tensor) -> bytes:
    """[3, H, W] in [-1, 1] -> PNG bytes."""
    pixels = to_uint8(frame[None].cpu())[0].permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class PlaySession:
    """A world model's autoregressive rollout, one step per action; thread-safe (the HTTP server is threaded but
    there is one model and one context, so steps run one at a time, in arrival order)."""

    def __init__(
        self, model: WorldModel, steps: int | None = None, seed: int = 0, scale: int = 6, sampler: str | None = None
    ) -> None:
        if not isinstance(model, WorldModel):
            raise UserInputError(f"play needs a WorldModel, got a {type(model).__name__}")
        if steps is not None and steps < 1:
            raise UserInputError(f"--steps {steps}: the sampler needs at least one step")
        self.model = model.eval()
        self.steps = steps
        self.sampler = model.resolve_sampler(sampler)  # a name of another objective is refused here, by name
        self.sampler_name = sampler or str(model.hparams.sampler)
        self.seed = seed
        self.scale = scale
        self.generator = torch.Generator(device=model.device)
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LIMIT)
        self._lock = threading.Lock()
        self.reset()

    @property
    def image_size(self) -> int:
        return int(self.model.hparams.image_size)

    def reset(self) -> Frame:
        """Back to the checkpoint's start screen, step 0, and the seed's first noise (a reset replays exactly)."""
        with self._lock:
            self.context = self.model.start_context(1).to(self.model.device)
            self.step_count = 0
            self.generator.manual_seed(self.seed)
            self.history.clear()
            return self._snapshot(None, 0.0)

    def step(self, action: Mapping[str, Any], where: str = "action") -> Frame:
        """One model step: the next frame for `action`; the oldest context frame drops out, the new one joins."""
        checked = check_action(action, where)  # before the lock: a bad request never waits for the model
        with self._lock:
            start = time.perf_counter()
            cond = NextFrame(self.context, [checked])
            frame = self.model.sample(1, cond, steps=self.steps, sampler=self.sampler, generator=self.generator)
            self.context = torch.cat([self.context[:, 1:], frame[:, None]], 1)
            self.step_count += 1
            self.history.append({"step": self.step_count, **checked})
            return self._snapshot(checked, time.perf_counter() - start)

    def current(self) -> Frame:
        with self._lock:
            return self._snapshot(None, 0.0)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "step": self.step_count,
                "image_size": self.image_size,
                "scale": self.scale,
                "sample_steps": self.steps or int(self.model.hparams.sample_steps),
                "sampler": self.sampler_name,
                "context_frames": int(self.model.hparams.context_frames),
                "history": list(self.history),
            }

    def _snapshot(self, action: dict[str, Any] | None, seconds: float) -> Frame:
        return Frame(self.step_count, frame_png(self.context[0, -1]), action, seconds)


def load_session(
    ckpt: str | Path,
    device: str = "cpu",
    steps: int | None = None,
    seed: int = 0,
    use_ema: bool = True,
    scale: int = 6,
    sampler: str | None = None,
) -> PlaySession:
    """A PlaySession on a WorldModel checkpoint; errors name the checkpoint."""
    from gen_lightning.models.loading import load_model

    model = load_model(ckpt, expected=WorldModel)
    if not torch.isfinite(model.start_frames).all():
        raise UserInputError(
            f"checkpoint {str(ckpt)!r} has no start screen (WorldModel.start_frames is filled by the first training "
            "batch): use a checkpoint saved after at least one training step"
        )
    if not use_ema:  # the raw weights: copied into the network sample() uses
        model.ema.copy_from(model.net)
    return PlaySession(model.to(device), steps=steps, seed=seed, scale=scale, sampler=sampler)


# --- HTTP -------------------------------------------------------------------------------------------------------------
class PlayServer(ThreadingHTTPServer):
    daemon_threads = True  # an open browser tab must not keep Ctrl-C from ending the server

    def __init__(self, address: tuple[str, int], session: PlaySession) -> None:
        super().__init__(address, PlayHandler)
        self.session = session

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'localhost' if host in ('127.0.0.1', '0.0.0.0', '') else host}:{port}/"


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class PlayHandler(BaseHTTPRequestHandler):
    server: PlayServer
    protocol_version = "HTTP/1.1"  # keep-alive: one connection carries a whole session of mouse moves

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/frame.png":
            frame = self.server.session.current()
            self._send(HTTPStatus.OK, frame.png, "image/png", {"X-Step": str(frame.step)})
        elif path == "/state":
            self._send_json(HTTPStatus.OK, self.server.session.state())
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no page {path!r}: try / , /frame.png or /state"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/action":
                body = self._json_body()
                if not isinstance(body, dict):
                    raise BadRequest(HTTPStatus.BAD_REQUEST, f"POST /action: expected a JSON object, got {body!r}")
                try:
                    frame = self.server.session.step(body, where="POST /action")
                except UserInputError as err:
                    raise BadRequest(HTTPStatus.BAD_REQUEST, str(err)) from err
            elif path == "/reset":
                self._read_body()  # and ignore it, but read it: the kept-alive connection must stay in step
                frame = self.server.session.reset()
            else:
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no endpoint POST {path!r}: try /action or /reset")
        except BadRequest as err:
            self._send_json(err.status, {"error": str(err)})
            return
        except Exception as err:  # a model failure: the page shows it, the terminal gets the traceback
            log.exception("POST %s failed", path)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"})
            return
        self._send_json(HTTPStatus.OK, frame.as_json())

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"Content-Length {self.headers.get('Content-Length')!r}")
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would otherwise be parsed as the next request
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; an action is < 1 KiB")
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        raw = self._read_body()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"POST {self.path}: body is not JSON ({err})") from err

    def _send_json(self, status: HTTPStatus, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # every frame is new: a cached one would be a wrong screen
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # A mouse move is a request: the default stderr line per request would drown the terminal.
        log.debug("%s %s", self.address_string(), format % args)


def make_server(session: PlaySession, host: str = "127.0.0.1", port: int = 0) -> PlayServer:
    """A bound (not yet serving) server; port 0 picks a free one (see `server.url`)."""
    try:
        return PlayServer((host, port), session)
    except OSError as err:
        raise UserInputError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from err


def serve(server: PlayServer) -> None:
    """Serve until Ctrl-C or SIGTERM (what `kill` and job schedulers send), after telling the person where to point a
    browser."""
    port = server.server_address[1]
    print(f"gen-lightning play: open {server.url} (Ctrl-C stops)", flush=True)
    print(
        f"  from another machine: ssh -L {port}:localhost:{port} THIS_HOST, then open http://localhost:{port}/",
        flush=True,
    )
    try:
        with sigterm_as_interrupt():
            server.serve_forever()
    except KeyboardInterrupt:
        print("gen-lightning play: stopped", flush=True)
    finally:
        server.server_close()
