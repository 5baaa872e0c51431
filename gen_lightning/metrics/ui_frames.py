"""Where things are on a recorded frame of the UI app (data.ui_app, drawn as gen_lightning.ui_layout says), shared
by the state and text readers.

The app draws on a SCREEN × SCREEN screen; the recorder shrinks each capture to size × size with Pillow's BOX filter
and then draws the magenta cursor sprite at the action's position (data.ui_source, gen_lightning.actions). A frame
pixel is the average of its footprint on the screen, so a pixel whose footprint lies wholly inside a uniformly coloured
area has exactly that area's colour: the readers look only at such pixels, and ignore the ones the cursor may cover.
"""

from __future__ import annotations

import torch

from gen_lightning.actions import CURSOR_PIXELS
from gen_lightning.images import to_uint8
from gen_lightning.ui_layout import SCREEN

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) screen pixels, x1 / y1 exclusive


def frames_rgb(frames: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW frames (or uint8 NCHW) -> float N×H×W×3 on the CPU, 0..255, whole numbers.

    Rounding to the 8-bit values the recorder wrote makes a real frame's uniform areas exact palette colours."""
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[2] != frames.shape[3]:
        raise ValueError(f"expected N×3×S×S frames of the UI app, got shape {tuple(frames.shape)}")
    pixels = frames.detach().cpu() if frames.dtype == torch.uint8 else to_uint8(frames.cpu())
    return pixels.permute(0, 2, 3, 1).float()


def hex_rgb(colour: str) -> tuple[int, int, int]:
    """'#rrggbb' -> (r, g, b)."""
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def inside(start: float, stop: float, size: int) -> list[int]:
    """Frame pixel indices (along one axis of a size-pixel frame) whose screen footprint lies within [start, stop)."""
    scale = SCREEN / size
    return [j for j in range(size) if j * scale >= start and (j + 1) * scale <= stop]


def box_mask(boxes: tuple[Box, ...], size: int) -> torch.Tensor:
    """size × size bool: the frame pixels whose footprint lies wholly inside one of `boxes`."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        rows, cols = inside(y0, y1, size), inside(x0, x1, size)
        if rows and cols:
            mask[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = True
    return mask


def magenta(rgb: torch.Tensor) -> torch.Tensor:
    """N×H×W bool: cursor-coloured pixels of N×H×W×3 frames (0..255).

    The bounds of metrics.world.cursor_positions: loose, so a slightly blurred generated cursor is found too; no
    colour of the app is near them."""
    red, green, blue = rgb.unbind(-1)
    return (red > 166) & (blue > 166) & (green < 102) & (red - green > 115)


def cursor_mask(rgb: torch.Tensor, cursor: torch.Tensor | None = None, margin: int = 0) -> torch.Tensor:
    """N×H×W bool: pixels the readers ignore because the cursor sprite is, or may be, drawn there.

    That is every magenta-like pixel and, where `cursor` gives the action's position ([N, 2] fractions of the
    frame, as in action.json), the sprite's own pixels there, grown by `margin` pixels: a generated frame draws the
    sprite there, perhaps blurred or in another colour, and the real one hides what the app shows under it. Only
    the sprite's pixels, not its bounding box: over the entry's text the box would hide most of a glyph that the
    rest of the arrow leaves readable."""
    mask = magenta(rgb)
    if cursor is None:
        return mask
    n, height, width = mask.shape
    if cursor.shape != (n, 2):
        raise ValueError(f"cursor: expected [{n}, 2] fractions of the frame, got {tuple(cursor.shape)}")
    # actions.cursor_pixel for every frame at once (int() of a positive double is its floor).
    fractions = cursor.detach().cpu().double()
    tip_x = (fractions[:, 0] * width).floor().long().clamp(0, width - 1)
    tip_y = (fractions[:, 1] * height).floor().long().clamp(0, height - 1)
    offsets = torch.tensor(CURSOR_PIXELS)  # [P, 2] (dx, dy)
    xs, ys = tip_x[:, None] + offsets[:, 0], tip_y[:, None] + offsets[:, 1]  # [N, P]
    frame = torch.arange(n)[:, None].expand_as(xs)
    keep = (xs < width) & (ys < height)  # the sprite is clipped at the frame's right and bottom
    sprite = torch.zeros_like(mask)
    sprite[frame[keep], ys[keep], xs[keep]] = True
    if margin > 0:
        grown = torch.nn.functional.max_pool2d(sprite[:, None].float(), 2 * margin + 1, stride=1, padding=margin)
        sprite = grown[:, 0].bool()
    return mask | sprite
