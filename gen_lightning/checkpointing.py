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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from gen_lightning.atomic import TEMP_PREFIX, write_atomic

log = logging.getLogger("gen_lightning")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    write_atomic(Path(path), lambda handle: torch.save(obj, handle))


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


@dataclass(frozen=True)
class CheckpointSummary:
    """What resuming needs to know of a checkpoint, read without loading its tensors."""

    global_step: int
    epoch: int
    wandb_id: str | None  # the W&B run it was logged to (RunCheckpoint stores it)
    finished: dict[str, Any] | None  # set when written at the end of a fit (RunCheckpoint): why it ended, its limits


def read_checkpoint_summary(path: Path) -> CheckpointSummary | None:
    """The summary of a checkpoint file, or of a DeepSpeed checkpoint folder (Lightning hands its own state to
    DeepSpeed, which stores it beside rank 0's model states); None when it is not a complete, readable checkpoint.

    torch.save writes a zip whose central directory comes last, so a truncated file fails here; `mmap=True` keeps
    this cheap (tensors are mapped, not read)."""
    file = deepspeed_states_file(path) if path.is_dir() else path
    if file is None:
        log.warning("skipping checkpoint %s: a folder without DeepSpeed's `latest` tag (not written completely)", path)
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        log.warning("skipping checkpoint %s: not readable (%s)", path, str(error).splitlines()[0][:200])
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int):
        return None
    run = state.get("gen_lightning_run") or {}
    return CheckpointSummary(
        global_step=step,
        epoch=int(state.get("epoch", 0)),
        wandb_id=(run.get("logger_ids") or {}).get("wandb"),
        finished=run.get("finished"),
    )


def deepspeed_states_file(folder: Path) -> Path | None:
    """Rank 0's model states in a DeepSpeed checkpoint folder, found through the `latest` tag DeepSpeed writes after
    them; None without the tag."""
    tag_file = folder / "latest"
    if not tag_file.is_file():
        return None
    return folder / tag_file.read_text().strip() / "mp_rank_00_model_states.pt"


def checkpoint_files(checkpoint_dir: Path, run_root: Path | None = None) -> list[Path]:
    """A run's checkpoints, after removing the temp files of interrupted saves: every `*.ckpt` in its checkpoint
    folder (files, or DeepSpeed's folders), and Lightning's SLURM `hpc_ckpt_N.ckpt` in its root. Only those in the
    root: it may be the working directory, where other files (a VAE for latent diffusion) are no resume point of this
    run."""
    found: set[Path] = set()
    for folder, pattern in ((checkpoint_dir, "*.ckpt"), (run_root, "hpc_ckpt_*.ckpt")):
        if folder is not None and folder.is_dir():
            remove_stale_temp_files(folder)
            found.update(folder.glob(pattern))
    return sorted(found)


def find_resume_checkpoint(checkpoint_dir: Path, run_root: Path | None = None) -> tuple[Path, CheckpointSummary] | None:
    """The complete checkpoint (see `checkpoint_files`) with the highest global_step, and its summary; ties go to the
    newest. None when there is none."""
    candidates: list[tuple[int, float, Path, CheckpointSummary]] = []
    for path in checkpoint_files(checkpoint_dir, run_root):
        if (summary := read_checkpoint_summary(path)) is not None:
            written = (deepspeed_states_file(path) or path) if path.is_dir() else path
            candidates.append((summary.global_step, written.stat().st_mtime, path, summary))
    if not candidates:
        return None
    *_, path, summary = max(candidates, key=lambda candidate: candidate[:2])
    return path, summary


def set_aside(paths: list[Path], folder: Path) -> Path:
    """Moves earlier checkpoints into `folder/previous-<time>/` (a fresh start must not lose them, nor resume from them
    later, nor make Lightning version its new files as `last-v1.ckpt`)."""
    archive = folder / time.strftime("previous-%Y%m%d-%H%M%S")
    archive.mkdir(parents=True, exist_ok=True)
    for path in paths:
        os.replace(path, archive / path.name)
    return archive
