"""Write samples into webdataset tar shards split into train/val, plus a manifest.json that describes them.

Layout of an output folder:
    train-000000.tar, train-000001.tar, ..., val-000000.tar, ..., manifest.json

Every file appears under its final name only once complete (written to a hidden temp name in the same folder, then
`os.replace`d), and the manifest is written last: a folder with a manifest.json is a finished dataset, and a crash
leaves no half shard behind a final name. Shards are byte-for-byte reproducible (fixed tar mtime and owner).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from gen_lightning.atomic import write_bytes_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gen_lightning.shards/1"
SPLITS = ("train", "val")
_SHARD_DIGITS = 6
_SHARD_NAME = re.compile(r"^(train|val)-(\d{6})\.tar$")
_TMP_PREFIX = ".tmp-"


def split_of(key: str, val_fraction: float = 0.1) -> str:
    """ "train" or "val" for a sample key, the same on every machine and in every run.

    The first 8 bytes of sha256(key as UTF-8), read as a big-endian integer and divided by 2**64, give a number in
    [0, 1); the key is "val" when that number is below `val_fraction`. Python's hash() is salted per process, so it
    cannot be used: a sample must never move between train and val when a dataset is rebuilt.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _check_key(key: Any) -> str:
    # webdataset groups tar members into samples by the name up to the first dot; a slash would make a folder.
    if not isinstance(key, str) or not key or "." in key or "/" in key or "\\" in key:
        raise ValueError(f"invalid __key__ {key!r}: must be a non-empty str without dots or slashes")
    return key


def _encode(sample: Mapping[str, Any]) -> dict[str, bytes | str]:
    """Payload values -> bytes, so the tar holds exactly what the source produced (no guessing encoders)."""
    out: dict[str, bytes | str] = {"__key__": _check_key(sample.get("__key__"))}
    for ext, value in sample.items():
        if ext.startswith("__"):
            continue
        if isinstance(value, bytes | bytearray | memoryview):
            out[ext] = bytes(value)
        elif isinstance(value, str):
            out[ext] = value.encode("utf-8")
        elif ext == "json" or isinstance(value, dict | list):
            out[ext] = json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
        else:
            raise TypeError(f"sample {out['__key__']}: {ext!r} has unsupported type {type(value).__name__}")
    if len(out) == 1:
        raise ValueError(f"sample {out['__key__']} has no payload")
    return out


def _write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


class _SplitWriter:
    """Rolls one split's samples over numbered shards; each shard is renamed into place when full."""

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int) -> None:
        self.out_dir, self.split, self.samples_per_shard = out_dir, split, samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self._writer: Any = None
        self._count = 0
        self._name = ""
        self._tmp: Path | None = None

    def write(self, sample: dict[str, bytes | str]) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(sample)
        self._count += 1
        if self._count == self.samples_per_shard:
            self.close()

    def _open(self) -> None:
        import webdataset as wds  # imports torch (~2 s): only when a dataset is actually written

        name = f"{self.split}-{len(self.shards):0{_SHARD_DIGITS}d}.tar"
        self._tmp = self.out_dir / f"{_TMP_PREFIX}{os.getpid()}-{name}"
        # PAX: long and non-ASCII member names (folder sources) that plain ustar refuses; mtime 0: reproducible bytes.
        self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=0.0, format="PAX_FORMAT")
        self._name, self._count = name, 0

    def close(self) -> None:
        """Finish the open shard (if any) and move it to its final name."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        os.replace(self._tmp, self.out_dir / self._name)
        self._tmp = None
        self.shards.append({"url": self._name, "num_samples": self._count})

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                if self._tmp is not None:
                    self._tmp.unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        return {"num_samples": sum(s["num_samples"] for s in self.shards), "shards": self.shards}


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    samples_per_shard: int = 64,
    val_fraction: float = 0.1,
    source: dict | None = None,
    skipped: Mapping[str, int] | None = None,
    split_key: Callable[[str], str] | None = None,
) -> dict:
    """Write `samples` into train/val tar shards under `out_dir` and return the manifest (also saved as manifest.json).

    Each sample is a dict with "__key__" (str, no dots or slashes, unique) and payload entries named by extension:
    bytes ("png", "jpg", ...), str ("txt") or JSON-able ("json"). `skipped` is read only after the last sample,
    so a source's live `stats` dict (filled while it is iterated) can be passed directly. `split_key` maps a key to
    what decides its split (default: the key itself): samples that must stay together, such as the steps of one
    recorded episode, share a split when it gives them the same value. Samples keep their order within a split.
    A previous manifest in `out_dir` is removed first and shards of an older, larger build are deleted at the end.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    split_of("", val_fraction)  # validates val_fraction before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Without this, a crash mid-build would leave the old manifest describing a mix of old and new shards.
    (out / MANIFEST_NAME).unlink(missing_ok=True)

    writers = {split: _SplitWriter(out, split, samples_per_shard) for split in SPLITS}
    seen: set[str] = set()
    fields: set[str] = set()
    try:
        for sample in samples:
            encoded = _encode(sample)
            key = encoded["__key__"]
            if key in seen:
                raise ValueError(f"duplicate __key__ {key!r}")
            seen.add(key)
            fields.update(k for k in encoded if k != "__key__")
            writers[split_of(split_key(key) if split_key else key, val_fraction)].write(encoded)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise

    written = {shard["url"] for writer in writers.values() for shard in writer.shards}
    for stale in out.iterdir():
        if _SHARD_NAME.match(stale.name) and stale.name not in written:
            stale.unlink()

    manifest = {
        "format": MANIFEST_FORMAT,
        "source": dict(source or {}),
        "val_fraction": val_fraction,
        "fields": sorted(fields),
        "splits": {split: writer.summary() for split, writer in writers.items()},
        "skipped": dict(sorted((skipped or {}).items())),
    }
    _write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def _manifest_path(path_or_dir: str | Path) -> Path:
    path = Path(path_or_dir)
    return path / MANIFEST_NAME if path.is_dir() else path


def read_manifest(path_or_dir: str | Path) -> dict:
    """Load and check a manifest.json (or the one inside a folder); errors name the path and what is wrong."""
    path = _manifest_path(path_or_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path} (build the dataset first, e.g. `gen-lightning shards`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"shard manifest {path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"shard manifest {path}: format is {found!r}, expected {MANIFEST_FORMAT!r}")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(
        isinstance(s, dict) and isinstance(s.get("shards"), list) and isinstance(s.get("num_samples"), int)
        for s in splits.values()
    ):
        raise ValueError(f"shard manifest {path}: 'splits' must map names to {{'num_samples', 'shards'}}")
    return manifest


def shard_pattern(manifest_dir: str | Path, split: str) -> str:
    """Brace-expandable URL of a split's shards, e.g. "/abs/dir/train-{000000..000052}.tar", as webdataset takes it."""
    path = _manifest_path(manifest_dir)
    manifest = read_manifest(path)
    if split not in manifest["splits"]:
        raise KeyError(f"split {split!r} not in {path} (has {sorted(manifest['splits'])})")
    urls = [shard["url"] for shard in manifest["splits"][split]["shards"]]
    if not urls:
        raise ValueError(f"split {split!r} in {path} has no shards")
    expected = [f"{split}-{i:0{_SHARD_DIGITS}d}.tar" for i in range(len(urls))]
    if urls != expected:
        raise ValueError(f"split {split!r} in {path}: shards are not numbered {expected[0]}..{expected[-1]}")
    base = path.parent.resolve()
    if len(urls) == 1:
        return str(base / urls[0])
    return str(base / f"{split}-{{{0:0{_SHARD_DIGITS}d}..{len(urls) - 1:0{_SHARD_DIGITS}d}}}.tar")
