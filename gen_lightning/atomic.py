"""Files that a reader (or a restart after a kill at any moment) sees whole or not at all: checkpoints, run.json,
manifests, images, the FID caches. A leaf module: every layer may use it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

TEMP_PREFIX = ".tmp-"


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(handle)` into a temp file beside `path`, fsync, rename over `path`, fsync the folder: the old file or
    the new one, never a part (the rename is atomic on POSIX within one filesystem, and the temp file is in the
    destination folder, not in /tmp, which is often another filesystem)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda handle: handle.write(data))


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
