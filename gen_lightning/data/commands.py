"""The `gen-lightning shards <source>` commands that need no model: their arguments and their writers. (`shards
encode` needs a VAE, so the CLI adds it.) Writers are imported when run, so `--help` stays light."""

from __future__ import annotations

import argparse


def add_source_parsers(sub: argparse._SubParsersAction) -> None:
    emoji = sub.add_parser("emoji", help="render every fully-qualified emoji of Noto Color Emoji, captioned by name")
    emoji.add_argument("--out", required=True, help="output folder")
    emoji.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    emoji.add_argument("--font", default=None, help="path of NotoColorEmoji.ttf (default: the Debian package's)")
    emoji.add_argument("--samples-per-shard", type=int, default=64)
    emoji.add_argument("--limit", type=int, default=None, help="only the first N emoji (quick tests)")
    folder = sub.add_parser("folder", help="an image folder with optional same-name .txt captions")
    folder.add_argument("src", help="folder of images (searched recursively)")
    folder.add_argument("--out", required=True, help="output folder")
    folder.add_argument("--size", type=int, default=None, help="resize + center-crop to SIZE (default: keep bytes)")
    folder.add_argument("--samples-per-shard", type=int, default=256)
    folder.add_argument("--val-fraction", type=float, default=0.1)
    ui = sub.add_parser("ui", help="record a Tk app driven by a scripted user on Xvfb, for the world model")
    ui.add_argument("--out", required=True, help="output folder")
    ui.add_argument("--episodes", type=int, default=600, help="episodes, each a fresh app (default 600)")
    ui.add_argument("--steps", type=int, default=32, help="actions per episode (default 32)")
    ui.add_argument("--context", type=int, default=4, help="previous frames stored with each sample (default 4)")
    ui.add_argument("--size", type=int, default=64, help="frame side in pixels; the screen is 128 (default 64)")
    ui.add_argument("--seed", type=int, default=0, help="the same seed records byte-identical shards")
    ui.add_argument("--samples-per-shard", type=int, default=256)
    ui.add_argument("--val-fraction", type=float, default=0.1, help="share of episodes held out (default 0.1)")
    ui.add_argument("--display", default=None, help="X display with a 128x128 screen (default: a private Xvfb)")


def write_source_shards(ns: argparse.Namespace) -> dict:
    """Run the writer of `gen-lightning shards emoji|folder|ui`; its manifest."""
    if ns.source == "ui":
        from gen_lightning.data.ui_source import write_ui_shards

        return write_ui_shards(
            ns.out, episodes=ns.episodes, steps=ns.steps, context=ns.context, size=ns.size, seed=ns.seed,
            samples_per_shard=ns.samples_per_shard, val_fraction=ns.val_fraction, display=ns.display,
        )  # fmt: skip
    if ns.source == "emoji":
        from gen_lightning.data.emoji_source import write_emoji_shards

        return write_emoji_shards(ns.out, ns.size, ns.font, ns.samples_per_shard, ns.limit)
    from gen_lightning.data.folder_source import write_folder_shards

    return write_folder_shards(ns.src, ns.out, ns.size, ns.samples_per_shard, ns.val_fraction)


def manifest_summary(manifest: dict) -> str:
    """One line: each split's samples and shards, and what was skipped."""
    splits = ", ".join(
        f"{name}: {s['num_samples']} samples in {len(s['shards'])} shards" for name, s in manifest["splits"].items()
    )
    skipped = manifest.get("skipped") or {}
    return f"{splits}; skipped: {sum(skipped.values())} {dict(skipped)}"
