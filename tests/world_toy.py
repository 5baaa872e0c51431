"""A toy 'desktop' in the UI recorder's sample layout, drawn with Pillow (no X server): a button that toggles its colour
when clicked, and the cursor sprite. For unit tests of decoding, the model and the metrics; the real recorder
(data.ui_source) has its own tests."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any

from PIL import Image, ImageDraw

from gen_lightning.actions import draw_cursor

BUTTON = (0.1, 0.1, 0.6, 0.4)  # left, top, right, bottom as fractions of the frame
COLORS = ((170, 170, 170), (30, 90, 220))  # off, on


def toy_frame(size: int, on: bool, x: float, y: float) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    left, top, right, bottom = (int(v * size) for v in BUTTON)
    ImageDraw.Draw(image).rectangle((left, top, right, bottom), fill=COLORS[on])
    return draw_cursor(image, x, y)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def toy_world_samples(episodes: int, steps: int, context: int = 2, size: int = 16, seed: int = 0) -> Iterator[dict]:
    for episode in range(episodes):
        rng = random.Random(seed * 1000 + episode)
        on, x, y = False, 0.5, 0.9
        frames = [toy_frame(size, on, x, y)]
        for t in range(steps):
            x, y = rng.random(), rng.random()
            click = int(rng.random() < 0.4)
            if click and BUTTON[0] <= x <= BUTTON[2] and BUTTON[1] <= y <= BUTTON[3]:
                on = not on
            frames.append(toy_frame(size, on, x, y))
            history = [frames[max(0, i)] for i in range(t - context + 1, t + 1)]
            strip = Image.new("RGB", (size * context, size))
            for i, frame in enumerate(history):
                strip.paste(frame, (i * size, 0))
            action: dict[str, Any] = {"x": x, "y": y, "button": 0, "click": click, "key": ""}
            yield {
                "__key__": f"e{episode:05d}-t{t:04d}",
                "png": png(frames[-1]),
                "context.png": png(strip),
                "action.json": action,
                # The UI recorder's fields (a toy has no text field to scroll), so its configs' oversample rules apply.
                "json": {
                    "episode": episode,
                    "t": t,
                    "kind": "click" if click else "move",
                    "context_frames": context,
                    "entry_scrolled": False,
                },
            }
