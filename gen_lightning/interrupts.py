"""SIGTERM handled as Ctrl-C, for commands whose clean-up lives in `finally` / `except BaseException` blocks."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (what `kill`, job schedulers and CI time-outs send) raises KeyboardInterrupt as
    Ctrl-C does, so clean-ups run: temporary shard files are removed, child processes (Xvfb, the recorded app) are
    stopped. Python's default for SIGTERM is to die at once, skipping them. Main thread only (signal handlers can
    only be set there); the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
