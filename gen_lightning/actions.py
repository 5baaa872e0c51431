"""The world model's action vocabulary and cursor sprite, shared by the UI recorder (data.ui_source), the model
(models.world_model), its metrics (metrics.world) and `gen-lightning play`.

A UI sample stores one action as JSON (`action.json`):
    {"x": 0.41, "y": 0.73,   # cursor position after the step, as a fraction of the frame's width / height
     "button": 0,            # 1 while the left button is held down after the step (drags)
     "click": 1,             # 1 if the left button was pressed during the step
     "key": "a"}             # the key pressed during the step (an X keysym name from KEYS), "" for none

Screen captures hold no cursor (X does not draw it into the framebuffer), so the recorder draws the sprite below at
the action's position: that is what makes "is the cursor where the action put it" measurable on generated frames.
Its colour, pure magenta, is one the recorded app never uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from gen_lightning.errors import UserInputError

# X keysym names the recorder types and the model knows; "" is "no key". Index 0 must stay "" (the padding class).
KEYS: tuple[str, ...] = ("", *"abcdefghijklmnopqrstuvwxyz", *"0123456789", "space", "BackSpace", "Return", "Tab")
KEY_INDEX = {key: index for index, key in enumerate(KEYS)}
# Layout of an encoded action: x, y, button, click, then a one-hot of KEYS.
ACTION_DIM = 4 + len(KEYS)

CURSOR_RGB = (255, 0, 255)
# An arrow 4 px wide and 6 px tall with its tip at (0, 0), drawn at the frame's own resolution so it stays crisp.
_CURSOR_ROWS = ("X", "XX", "XXX", "XXXX", "XX", "X")
CURSOR_PIXELS: tuple[tuple[int, int], ...] = tuple(
    (dx, dy) for dy, row in enumerate(_CURSOR_ROWS) for dx, char in enumerate(row) if char == "X"
)


def check_action(action: Mapping[str, Any], where: str = "action") -> dict[str, Any]:
    """A validated copy of an action dict; errors name `where` (a sample key, a request) and the bad field."""
    try:
        x, y = float(action["x"]), float(action["y"])
        button, click = int(action.get("button", 0)), int(action.get("click", 0))
        key = str(action.get("key", "") or "")
    except (KeyError, TypeError, ValueError) as err:
        raise UserInputError(f"{where}: not an action {{x, y, button, click, key}} ({err!r}): {dict(action)}") from err
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise UserInputError(f"{where}: cursor x={x}, y={y} outside [0, 1] (fractions of the frame size)")
    if button not in (0, 1) or click not in (0, 1):
        raise UserInputError(f"{where}: button={button}, click={click}: each must be 0 or 1")
    if key not in KEY_INDEX:
        raise UserInputError(f"{where}: key {key!r} is not in the world model's key vocabulary ({len(KEYS)} keys)")
    return {"x": x, "y": y, "button": button, "click": click, "key": key}


def encode_action(action: Mapping[str, Any], where: str = "action") -> torch.Tensor:
    """Action dict -> float vector of ACTION_DIM (x, y, button, click, one-hot key)."""
    checked = check_action(action, where)
    vector = torch.zeros(ACTION_DIM)
    vector[0], vector[1] = checked["x"], checked["y"]
    vector[2], vector[3] = checked["button"], checked["click"]
    vector[4 + KEY_INDEX[checked["key"]]] = 1.0
    return vector


def cursor_pixel(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """The pixel the cursor tip sits on for fractional position (x, y)."""
    return min(width - 1, int(x * width)), min(height - 1, int(y * height))


def draw_cursor(image: Image.Image, x: float, y: float) -> Image.Image:
    """A copy of `image` with the cursor sprite's tip at fractional position (x, y) (clipped at the borders)."""
    out = image.convert("RGB")
    width, height = out.size
    tip_x, tip_y = cursor_pixel(x, y, width, height)
    pixels = out.load()
    for dx, dy in CURSOR_PIXELS:
        px, py = tip_x + dx, tip_y + dy
        if px < width and py < height:
            pixels[px, py] = CURSOR_RGB
    return out
