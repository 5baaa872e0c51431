"""The UI readers' calibration on the held-out episodes of `gen-lightning shards ui`, and what copying the last frame
scores there: the baselines that the world model's state and typed-text accuracy are reported beside.

    python -m bench.ui_readers [--episodes 600 --steps 32 --seed 0 --val-fraction 0.1 --size 64 --context 4]

Records again exactly the held-out episodes of a `gen-lightning shards ui` run with these settings (an episode
depends only on the seed and its number), keeping the app's own state log, and decodes them as the DataModule does.
Counts the real next frames and last context frames whose reading (metrics.ui_state, metrics.ui_text) differs from
the log (0: calibrated), then scores the real next frames (a perfect predictor) and the last context frames
(copying the screen) with the evaluation's StateAccuracy and TextAccuracy. Needs Xvfb.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from gen_lightning.data.decode import ImageTransform, decode_sample
from gen_lightning.data.shard_writer import split_of
from gen_lightning.data.ui_source import episode_of, iter_logged_ui_samples, virtual_display
from gen_lightning.metrics.ui_state import StateAccuracy, logged_states, read_states
from gen_lightning.metrics.ui_text import TextAccuracy, read_text, visible_texts

CHUNK = 256  # frames read at once


def held_out(episodes: int, val_fraction: float) -> list[int]:
    """The episode numbers `gen-lightning shards ui` puts in its val split."""
    return [e for e in range(episodes) if split_of(episode_of(f"e{e:05d}-t0000"), val_fraction) == "val"]


def misread(frames: torch.Tensor, cursor: torch.Tensor | None, log: list[dict]) -> tuple[int, int]:
    """(frames whose widget states differ from the log, frames whose text does)."""
    states = read_states(frames, cursor).tolist()
    texts = read_text(frames, cursor)
    wrong_states = sum(got != logged_states(state) for got, state in zip(states, log, strict=True))
    wrong_texts = sum(
        (text is None) != state["menu_open"] or (text is not None and text not in visible_texts(state["text"]))
        for text, state in zip(texts, log, strict=True)
    )
    return wrong_states, wrong_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--context", type=int, default=4)
    ns = parser.parse_args()

    episodes = held_out(ns.episodes, ns.val_fraction)
    start = time.perf_counter()
    with virtual_display() as display:
        logged = list(iter_logged_ui_samples(display, episodes, ns.steps, ns.context, ns.size, ns.seed))
    recorded = time.perf_counter() - start
    transform, rng = ImageTransform(ns.size), random.Random(0)
    counts = {"next frame: states": 0, "next frame: text": 0, "last context: states": 0, "last context: text": 0}
    perfect, copying = (StateAccuracy(), TextAccuracy()), (StateAccuracy(), TextAccuracy())
    start = time.perf_counter()
    for first in range(0, len(logged), CHUNK):
        chunk = logged[first : first + CHUNK]
        encoded = [{k: json.dumps(v).encode() if isinstance(v, dict) else v for k, v in s.items()} for s, _, _ in chunk]
        decoded = [decode_sample(sample, transform, rng) for sample in encoded]
        real = torch.stack([d["image"] for d in decoded])
        last = torch.stack([d["frames"][-1] for d in decoded])
        cursor = torch.stack([d["action"][:2] for d in decoded])
        # The last context frame's cursor is the step before's: the readers find it by its colour.
        for where, frames, at, log in (
            ("next frame", real, cursor, [after for _, _, after in chunk]),
            ("last context", last, None, [before for _, before, _ in chunk]),
        ):
            wrong_states, wrong_text = misread(frames, at, log)
            counts[f"{where}: states"] += wrong_states
            counts[f"{where}: text"] += wrong_text
        for metric in perfect:
            metric.update(real, real, last, cursor)
        for metric in copying:
            metric.update(last, real, last, cursor)
    read = time.perf_counter() - start

    print(f"{len(episodes)} held-out episodes of {ns.episodes} (seed {ns.seed}), {len(logged)} frames at {ns.size} px;")
    print(f"recorded in {recorded:.0f} s, read in {read:.0f} s")
    for name, count in counts.items():
        print(f"misread ({name}): {count} of {len(logged)}")
    scores = {**perfect[0].compute(), **perfect[1].compute()}
    copied = {**copying[0].compute(), **copying[1].compute()}
    print(f"{'metric':<32}{'real next frames':>18}{'copy last frame':>18}{'reported copy_last':>20}")
    for name, value in scores.items():
        if name.endswith("_copy_last"):
            continue
        reported = scores.get(f"{name}_copy_last", float("nan"))
        print(f"{name:<32}{value:>18.4f}{copied[name]:>18.4f}{reported:>20.4f}")


if __name__ == "__main__":
    main()
