"""Read back what a W&B offline run recorded, from its own `run-*.wandb` file (tied to the pinned wandb).

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0) then 32 KiB blocks of chunks, each
chunk `crc32 (4) | length (2, little-endian) | type (1)` + payload; types FULL=1, FIRST=2, MIDDLE=3, LAST=4 reassemble
one serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FILE_HEADER = 7
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = FILE_HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER:  # block trailer too small for a header: zero padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        payload = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def complete_records(run_dir: Path) -> list[wandb_internal_pb2.Record]:
    """The records of the finished run in `run_dir` (wandb/offline-run-*); an error if the file lacks the final `exit`
    record (the run was not closed, or wandb's service had not written the file out yet)."""
    (run_file,) = run_dir.glob("run-*.wandb")
    found = list(records(run_file))
    if not found or found[-1].WhichOneof("record_type") != "exit":
        raise AssertionError(f"{run_file} is incomplete: no final exit record ({len(found)} records)")
    return found


def history(run_dir: Path) -> list[dict]:
    """Every logged history row of the run in `run_dir`, values JSON-decoded."""
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in complete_records(run_dir)
        if record.WhichOneof("record_type") == "history"
    ]


def run_id(run_dir: Path) -> str:
    for record in complete_records(run_dir):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise ValueError(f"no run record in {run_dir}")
