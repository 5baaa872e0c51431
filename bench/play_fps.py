"""Frames per second of `gen-lightning play` with each sampler setting, against the first setting (the world model's
default: EDM Euler, 3 steps), in the same run: the time of PlaySession.step (one generated frame per action, as the
page calls it).

The network is `make world`'s (configs/world_model_ui.yaml, 64×64, 4 context frames) with untrained weights: the cost
of a frame does not depend on the weights, so this needs no trained checkpoint (pass --ckpt to time one anyway).

    .venv/bin/python -m bench.play_fps --settings edm_euler:3 edm_euler:6 edm_heun:3 --frames 20
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml

from gen_lightning.models.loading import load_model
from gen_lightning.models.world_model import WorldModel
from gen_lightning.play import PlaySession

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "world_model_ui.yaml"
ACTIONS = [{"x": 0.3, "y": 0.4}, {"x": 0.3, "y": 0.4, "button": 1, "click": 1}, {"x": 0.5, "y": 0.5, "key": "a"}]


def make_world_network() -> WorldModel:
    config = yaml.safe_load(CONFIG.read_text())
    options: dict[str, Any] = dict(config["model"]["init_args"])
    model = WorldModel(**options, image_size=int(config["data"]["image_size"]))
    model.start_frames.uniform_(-1, 1)  # any start screen: play refuses a model without one
    return model


def frame_seconds(model: WorldModel, sampler: str, steps: int, frames: int) -> list[float]:
    session = PlaySession(model, steps=steps, sampler=sampler)
    session.step(ACTIONS[0])  # warm-up: the first call pays allocation
    return [session.step(ACTIONS[i % len(ACTIONS)]).seconds for i in range(frames)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["edm_euler:3", "edm_euler:6", "edm_heun:3"])
    parser.add_argument("--frames", type=int, default=20, help="frames timed per setting (after one warm-up)")
    parser.add_argument("--ckpt", default=None, help="a trained WorldModel checkpoint instead of the untrained one")
    parser.add_argument("--repeats", type=int, default=2, help="passes over all settings (interleaved)")
    ns = parser.parse_args()
    model = load_model(ns.ckpt, expected=WorldModel) if ns.ckpt else make_world_network()
    settings = [(name, int(steps)) for name, _, steps in (s.partition(":") for s in ns.settings)]
    times: dict[tuple[str, int], list[float]] = {setting: [] for setting in settings}
    for _ in range(ns.repeats):  # interleaved, so a slow spell of the machine hits every setting
        for sampler, steps in settings:
            times[(sampler, steps)] += frame_seconds(model, sampler, steps, ns.frames)
    base = statistics.median(times[settings[0]])
    print(f"torch threads {torch.get_num_threads()}, {int(model.hparams.image_size)}² frames, "
          f"{ns.frames} × {ns.repeats} frames per setting; baseline {settings[0][0]}:{settings[0][1]}")  # fmt: skip
    print("| sampler | steps | median s / frame | frames / s | speed-up |")
    print("|---|---|---|---|---|")
    for sampler, steps in settings:
        median = statistics.median(times[(sampler, steps)])
        print(f"| {sampler} | {steps} | {median:.3f} | {1 / median:.1f} | {base / median:.2f}× |")


if __name__ == "__main__":
    main()
