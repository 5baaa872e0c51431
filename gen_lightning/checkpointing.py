"""Checkpoints that survive a kill at any moment, and finding the one to resume from.

Lightning's local save is a fsspec transaction: the bytes go to a temp file in the *system* temp dir, then
`shutil.move` puts them in place. When the checkpoint folder is on another filesystem (the usual cluster layout:
/tmp local, runs on Lustre/NFS) that move is a copy into the final name, so a kill mid-copy leaves a truncated
`last.ckpt`; and nothing is fsync'ed, so a node crash can leave an empty file. Here a checkpoint is written to a
hidden temp file in the destination folder, fsync'ed, renamed over the final name (atomic on POSIX within one
filesystem), and the folder is fsync'ed so the rename itself is durable.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger("gen_lightning")

TEMP_PREFIX = ".tmp-"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temp_files(folder: Path) -> None:
    """Temp files left by a process killed mid-save (never a complete checkpoint: those have been renamed)."""
    for temp in folder.glob(f"{TEMP_PREFIX}*"):
        temp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are temp file + fsync + rename in the destination folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):  # object stores have their own atomic put: keep Lightning's path for them
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)


def checkpoint_step(path: Path) -> int | None:
    """The global_step stored in a checkpoint, or None when the file is not a complete, readable checkpoint.

    torch.save writes a zip whose central directory comes last, so a truncated file fails here; `mmap=True` keeps
    this cheap (tensors are mapped, not read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        log.warning("skipping checkpoint %s: not readable (%s)", path, str(error).splitlines()[0][:200])
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if isinstance(step, int) else None


def checkpoint_files(checkpoint_dir: Path, run_root: Path | None = None) -> list[Path]:
    """A run's checkpoints, after removing the temp files of interrupted saves: every `*.ckpt` in its checkpoint
    folder, and Lightning's SLURM `hpc_ckpt_N.ckpt` in its root. Only those in the root: it may be the working
    directory, where other files (a VAE for latent diffusion) are no resume point of this run."""
    found: set[Path] = set()
    for folder, pattern in ((checkpoint_dir, "*.ckpt"), (run_root, "hpc_ckpt_*.ckpt")):
        if folder is not None and folder.is_dir():
            remove_stale_temp_files(folder)
            found.update(folder.glob(pattern))
    return sorted(found)


def find_resume_checkpoint(checkpoint_dir: Path, run_root: Path | None = None) -> tuple[Path, int] | None:
    """The complete checkpoint (see `checkpoint_files`) with the highest global_step; ties go to the newest file.
    None when there is none."""
    candidates: list[tuple[int, float, Path]] = []
    for path in checkpoint_files(checkpoint_dir, run_root):
        step = checkpoint_step(path)
        if step is not None:
            candidates.append((step, path.stat().st_mtime, path))
    if not candidates:
        return None
    step, _, path = max(candidates)
    return path, step


def set_aside(paths: list[Path], folder: Path) -> Path:
    """Moves earlier checkpoints into `folder/previous-<time>/` (a fresh start must not lose them, nor resume from them
    later, nor make Lightning version its new files as `last-v1.ckpt`)."""
    archive = folder / time.strftime("previous-%Y%m%d-%H%M%S")
    archive.mkdir(parents=True, exist_ok=True)
    for path in paths:
        os.replace(path, archive / path.name)
    return archive


def stored_run_ids(path: Path) -> dict[str, str]:
    """Logger run ids saved with a checkpoint by RunCheckpoint (e.g. {"wandb": "abc123"})."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return dict(state.get("gen_lightning_run", {}).get("logger_ids", {}))
