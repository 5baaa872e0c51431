"""The text in the UI app's entry read off frames, and the world model's typed-text accuracy beside copying the screen.

No OCR model: the app's font and layout are ours (gen_lightning.ui_layout). The entry draws DejaVu Sans Mono Bold at
22 px, a monospace font, so character k sits in a fixed cell, TEXT_X + k·ADVANCE on the screen; Tk scrolls the view by
whole characters, so that stays true for long text. Each cell of a frame is compared with the same font's glyphs
rendered by Pillow at the cell's place and shrunk as the recorder shrinks the screen (BOX), on the entry's white
and on the selection's blue (Tab and drags select text), and reads as the nearest one (mean squared RGB difference);
a blank cell reads as a space, and trailing spaces are dropped, as they show nothing. Pillow's hinting is not
Xft's (glyph edges differ by a pixel here and there), but the nearest glyph is still the right one: the calibration
test reads every recorded real frame exactly as the app's own log says.

The insertion cursor, a 4-px black bar between two cells, is found in the rows above every glyph's ink (only it draws
there) and its columns are left out of the comparison, as are the pixels under the cursor sprite. While the menu is
open its dropdown covers the text: the frame has no readable text (None).

TextAccuracy compares the characters a predicted frame shows with those of the real next frame, cell by cell.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchmetrics import Metric

from gen_lightning import ui_layout
from gen_lightning.errors import UserInputError
from gen_lightning.metrics.ui_frames import cursor_mask, frames_rgb, hex_rgb, inside
from gen_lightning.metrics.ui_state import WIDGET_NAMES, read_states

CHARACTERS = " abcdefghijklmnopqrstuvwxyz0123456789"  # what the recorder types (actions.KEYS); " " = blank
UNKNOWN = "?"  # a cell with nothing left to compare (all under the cursor): matches nothing

# The entry's text line on the screen, measured on the app's captures (Tk 8.6, Xft): the first character's origin is
# inside the 5-px ring, the 2-px border and Tk's 1-px pad; the font's 13.25-px advance is drawn as 13 whole pixels;
# the line is the font's ascent (21) + descent (6) = 27 rows; Tk clips the text at the ring.
TEXT_X, ADVANCE, LINE_TOP, ASCENT, DESCENT = 8, 13, 90, 21, 6
CLIP = (5, ui_layout.SCREEN - 5)
CELLS = 9  # 8 whole cells, and 11 of the 9th's 13 px
CARET_ROWS = (LINE_TOP, LINE_TOP + 4)  # above the tallest glyph (17 px over the baseline): only the caret is there
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
SELECTION = (hex_rgb(ui_layout.ENTRY_SELECTION), WHITE)  # the entry's selected text: white on blue
CARET_TOLERANCE = 60.0  # RGB distance from the line's background beyond which a caret-row pixel is the caret


def _font() -> ImageFont.FreeTypeFont:
    family, size, weight = ui_layout.ENTRY_FONT
    file_name = family.replace(" ", "") + ("-Bold" if weight == "bold" else "") + ".ttf"
    try:  # Pillow looks the file up in the system's font folders
        return ImageFont.truetype(file_name, -size)  # Tk's negative size is in pixels, as Pillow's
    except OSError as err:
        raise UserInputError(
            f"the typed-text reader needs the UI app's font {file_name} (Debian: fonts-dejavu-core)"
        ) from err


def _cell_columns(cell: int) -> tuple[int, int]:
    """The screen columns of a cell, clipped as Tk clips the text."""
    left = TEXT_X + ADVANCE * cell
    return max(left, CLIP[0]), min(left + ADVANCE, CLIP[1])


@functools.lru_cache(maxsize=4)
def glyph_templates(size: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """For size × size frames: the frame rows of the text line, and per cell the frame columns it owns and its
    templates [len(CHARACTERS), 2 (plain, selected), rows, columns, 3] (0..255). Only pixels wholly inside a cell
    are used: their colour depends on that cell's character alone."""
    font = _font()
    rows = torch.tensor(inside(LINE_TOP, LINE_TOP + ASCENT + DESCENT, size))
    cells = [torch.tensor(inside(*_cell_columns(cell), size)) for cell in range(CELLS)]
    if len(rows) == 0 or any(len(cols) == 0 for cols in cells):
        raise ValueError(f"{size}×{size} frames are too small to read the entry's text")
    templates = [torch.zeros(len(CHARACTERS), 2, len(rows), len(cols), 3) for cols in cells]
    for selected, (background, ink) in enumerate(((WHITE, BLACK), SELECTION)):
        for index, char in enumerate(CHARACTERS):
            for parity in (0, 1):  # one canvas per other cell: a glyph's edge never lands in its neighbour's cell
                screen = Image.new("RGB", (ui_layout.SCREEN, ui_layout.SCREEN), WHITE)
                draw = ImageDraw.Draw(screen)
                draw.rectangle((CLIP[0], LINE_TOP, CLIP[1] - 1, LINE_TOP + ASCENT + DESCENT - 1), fill=background)
                for cell in range(parity, CELLS, 2):
                    draw.text((TEXT_X + ADVANCE * cell, LINE_TOP + ASCENT), char, font=font, fill=ink, anchor="ls")
                pixels = torch.from_numpy(np.array(screen.resize((size, size), Image.Resampling.BOX))).float()
                for cell in range(parity, CELLS, 2):
                    templates[cell][index, selected] = pixels[rows[:, None], cells[cell][None, :]]
    return rows, cells, templates


def caret_columns(rgb: torch.Tensor, ignored: torch.Tensor) -> torch.Tensor:
    """N×W bool: the columns the insertion cursor darkens, from the line's top rows (where no glyph draws).

    A column counts if a pixel there is far from both line backgrounds (white, the selection's blue). More columns
    than a caret can cover mean a frame that draws something else there (a generated one): then none are left out."""
    size = rgb.shape[1]
    rows, cols = inside(*CARET_ROWS, size), inside(*CLIP, size)  # within the ring, which is neither background
    top = rgb[:, rows][:, :, cols]  # [N, r, c, 3]
    backgrounds = torch.tensor([WHITE, SELECTION[0]], dtype=torch.float32)
    distance = (top[..., None, :] - backgrounds).norm(dim=-1).min(-1).values  # [N, r, c]
    dark = torch.zeros(rgb.shape[:1] + rgb.shape[2:3], dtype=torch.bool)
    dark[:, cols] = ((distance > CARET_TOLERANCE) & ~ignored[:, rows][:, :, cols]).any(1)
    widest = int(4 * size / ui_layout.SCREEN) + 2  # the 4-px bar over whole and partly covered columns
    return dark & (dark.sum(1, keepdim=True) <= widest)


def read_text(frames: torch.Tensor, cursor: torch.Tensor | None = None) -> list[str | None]:
    """The characters the entry shows on each frame ([-1, 1] NCHW), cell by cell, trailing blanks dropped; None
    where the open menu covers the entry. `cursor`: the action's position, [N, 2] fractions (see read_states)."""
    rgb = frames_rgb(frames)
    rows, cells, templates = glyph_templates(rgb.shape[1])
    ignored = cursor_mask(rgb, cursor)
    ignored |= caret_columns(rgb, ignored)[:, None, :]
    menu_open = read_states(frames, cursor)[:, WIDGET_NAMES.index("menu")] == 1
    picks = []
    for cols, template in zip(cells, templates, strict=True):
        patch = rgb[:, rows[:, None], cols[None, :]].flatten(1)  # [N, r·c·3]
        valid = (~ignored[:, rows[:, None], cols[None, :]]).float()  # [N, r, c]
        count = valid.sum((1, 2))
        valid3 = valid[..., None].expand(-1, -1, -1, 3).flatten(1)
        flat = template.flatten(0, 1).flatten(1)  # [K, r·c·3]
        # Σ valid·(patch − template)², expanded into matrix products: one pass for every template at once.
        squared = (valid3 * patch.pow(2)).sum(1, keepdim=True) - 2 * (valid3 * patch) @ flat.T + valid3 @ flat.pow(2).T
        distance = squared / count.clamp(min=1)[:, None]
        best = distance.argmin(1) // 2  # the character, plain or selected
        picks.append(torch.where(count > 0, best, -1))
    texts: list[str | None] = []
    for i, chosen in enumerate(torch.stack(picks, 1).tolist()):
        text = "".join(CHARACTERS[k] if k >= 0 else UNKNOWN for k in chosen).rstrip(" ")
        texts.append(None if menu_open[i] else text)
    return texts


def visible_texts(text: str) -> list[str]:
    """What read_text may give for an entry holding `text` (the app's log): all of it when it fits, else any window
    of CELLS characters Tk may have scrolled to (trailing blanks dropped, as read_text drops them)."""
    if len(text) < CELLS:
        return [text.rstrip(" ")]
    return [text[left : left + CELLS].rstrip(" ") for left in range(len(text) + 1)]


def matching_characters(shown: str | None, real: str) -> tuple[int, int]:
    """(characters right, characters scored) of `shown` against `real`, cell by cell: every cell that either
    shows a character counts, so missing, wrong and extra characters all cost. None (no readable text) shows none."""
    shown = shown or ""
    right = sum(a == b and a != UNKNOWN for a, b in zip(shown, real, strict=False))
    return right, max(len(shown), len(real))


class TextAccuracy(Metric):
    """Typed-text accuracy of predicted next frames, beside copying the last context frame (summed over ranks).

    compute() gives
        text_accuracy                   characters right / characters scored (matching_characters), over frames
                                        whose real next frame shows the entry
        text_accuracy_copy_last         the same for the last context frame
        text_accuracy_typed             the same over the frames where the real entry's text changed (a key typed,
                                        deleted or cleared it, or the view scrolled): where copying falls short
        text_accuracy_typed_copy_last   the same for the last context frame
        text_exact_typed                share of those frames whose whole text the prediction shows right
        text_exact_typed_copy_last      the same for the last context frame: 0 by construction, for the scale
        text_frames, text_typed_frames  the counts behind them
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("right", "scored", "typed_right", "typed_scored"):  # [model, copy]
            self.add_state(name, torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("frames", "typed_frames", "typed_exact"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        predicted: torch.Tensor,
        real: torch.Tensor,
        last_context: torch.Tensor,
        cursor: torch.Tensor | None = None,
    ) -> None:
        """Frames in [-1, 1] NCHW; `cursor`: the action's (x, y) fractions [N, 2] (see StateAccuracy.update)."""
        truth = read_text(real, cursor)
        shown = read_text(predicted, cursor)
        before = read_text(last_context)
        # Rows: all frames, then the typed ones; columns: right, scored for the prediction, then for the copy.
        sums = torch.zeros(2, 4, dtype=torch.float64)
        frames = typed = exact = 0
        for real_text, shown_text, copied_text in zip(truth, shown, before, strict=True):
            if real_text is None:
                continue  # the open menu covers the real entry: nothing to compare with
            frames += 1
            scores = torch.tensor(
                [*matching_characters(shown_text, real_text), *matching_characters(copied_text, real_text)],
                dtype=torch.float64,
            )
            sums[0] += scores
            if copied_text is not None and copied_text != real_text:
                typed += 1
                exact += shown_text == real_text
                sums[1] += scores
        sums = sums.to(self.right.device)
        self.right += sums[0, 0::2]
        self.scored += sums[0, 1::2]
        self.typed_right += sums[1, 0::2]
        self.typed_scored += sums[1, 1::2]
        self.frames += frames
        self.typed_frames += typed
        self.typed_exact += exact

    def compute(self) -> dict[str, float]:
        return {
            "text_accuracy": float(self.right[0] / self.scored[0]),  # NaN if no frame showed any character
            "text_accuracy_copy_last": float(self.right[1] / self.scored[1]),
            "text_accuracy_typed": float(self.typed_right[0] / self.typed_scored[0]),
            "text_accuracy_typed_copy_last": float(self.typed_right[1] / self.typed_scored[1]),
            "text_exact_typed": float(self.typed_exact / self.typed_frames),
            "text_exact_typed_copy_last": float(torch.zeros(()) / self.typed_frames.cpu()),
            "text_frames": float(self.frames),
            "text_typed_frames": float(self.typed_frames),
        }
