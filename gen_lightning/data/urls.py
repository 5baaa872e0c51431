"""Resolve shard URL patterns (brace expansion; local paths, http(s)://, pipe:); fail early when they match nothing."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import braceexpand

from gen_lightning.errors import UserInputError

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://")


class ShardPatternError(UserInputError):
    """A shard pattern that cannot be used; the message names the pattern and what is wrong."""


def _shard_identity(url: str) -> str:
    """Local shards by real path (`a.tar`, `./a.tar` and `file:a.tar` are one file); remote URLs as written."""
    return url if url.startswith(REMOTE_PREFIXES) else os.path.realpath(url.removeprefix("file:"))


def expand_pattern(pattern: str) -> list[str]:
    """Expand `a-{000..009}.tar` (and `::`-separated lists, as webdataset does) and check local shards exist.

    Remote and `pipe:` URLs cannot be checked without opening them, so they are returned as given.
    """
    if not pattern or not pattern.strip():
        raise ShardPatternError("empty shard pattern")
    urls = [url for part in pattern.split("::") for url in braceexpand.braceexpand(part.strip())]
    listed = Counter(map(_shard_identity, urls))
    repeated = [url for url in urls if listed[_shard_identity(url)] > 1]
    if repeated:  # usually two `::` parts that overlap; val would count those samples twice
        raise ShardPatternError(f"shard pattern {pattern!r} lists {repeated[0]!r} more than once")
    local = [url.removeprefix("file:") for url in urls if not url.startswith(REMOTE_PREFIXES)]
    missing = [url for url in local if not os.path.exists(url)]
    if local and len(missing) == len(local):
        raise ShardPatternError(f"shard pattern {pattern!r} matches no file (first expanded: {urls[0]!r})")
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ShardPatternError(f"shard pattern {pattern!r}: {len(missing)} of {len(urls)} shards missing: {shown}")
    not_files = [url for url in local if not os.path.isfile(url)]
    if not_files:
        kind = "a directory" if os.path.isdir(not_files[0]) else "not a regular file"
        raise ShardPatternError(f"shard pattern {pattern!r}: {not_files[0]!r} is {kind}, not a tar shard")
    unreadable = [url for url in local if not os.access(url, os.R_OK)]
    if unreadable:
        raise ShardPatternError(f"shard pattern {pattern!r}: cannot read {unreadable[0]!r} (permissions)")
    return urls


def split_urls(source: str, split: str) -> str:
    """`source` is a URL pattern, or a shard folder / manifest.json written by `gen-lightning shards`, whose `split`
    ("train" / "val") pattern is returned."""
    path = Path(source)
    if path.is_dir() or path.name == "manifest.json":
        from gen_lightning.data.shard_writer import shard_pattern

        return shard_pattern(path if path.is_dir() else path.parent, split)
    return source


def train_split_of(source: str) -> str | None:
    """`source` if it is a shard folder (or manifest) with a non-empty train split, else None: a URL pattern names one
    split only, and a held-out folder (val_fraction 1) has no training images."""
    path = Path(source)
    if not (path.is_dir() or path.name == "manifest.json"):
        return None
    from gen_lightning.data.shard_writer import read_manifest

    train = read_manifest(path).get("splits", {}).get("train")
    return source if train and train["shards"] else None
