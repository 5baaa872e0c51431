"""The UI app's look: screen size, widget layout, colours and fonts, shared by the app the recorder drives
(data.ui_app) and the readers that score frames of it (metrics.ui_state, metrics.ui_text).

A leaf, as gen_lightning.actions is for the action schema: metrics may not import data (import-linter), and the
readers must see exactly what the app draws. The recorder writes APP_NAME and APP_VERSION into a dataset's
manifest, and the world-model evaluation reads frames with these readers only when they match.
"""

from __future__ import annotations

APP_NAME = "tk_panel"
APP_VERSION = 1  # bump when the look (below) or the behaviour changes: recorded data and models depend on it
SCREEN = 128  # the virtual screen is SCREEN × SCREEN pixels; the app fills it

BACKGROUND = "#e0e0e0"
HOVER = "#ffe040"  # yellow: the hover highlight of the toggle (off), the checkbox and the menubutton
TOGGLE_OFF, TOGGLE_ON, TOGGLE_ON_HOVER = "#b0b0b0", "#0a2a80", "#4080ff"
CHECKED_BACKGROUND = "#80e080"
MENU_BUTTON = "#303030"
PANEL_START = "#ffffff"
# Menu item -> (its colour, its hover colour); the chosen colour paints the panel.
MENU_ITEMS = {"red": ("#d02020", "#ff6040"), "green": ("#208020", "#40c040"), "blue": ("#1050c0", "#40a0ff")}
ENTRY_FOCUS_RING, ENTRY_RING = "#ff8000", "#909090"
ENTRY_SELECTION = "#2080ff"  # the entry's selected text: white on this blue
# The checkbox indicator: a BOX_SIDE-px image, a black BOX_BORDER-px border around one of these (a white tick on
# the checked one).
BOX_SIDE, BOX_BORDER = 32, 3
BOX_UNCHECKED, BOX_CHECKED = "#ffffff", "#1b5e20"

FONT = ("DejaVu Sans", -18, "bold")  # negative size: pixels, independent of the X server's DPI
ENTRY_FONT = ("DejaVu Sans Mono", -22, "bold")

# Widget name -> (x, y, width, height) on the screen.
LAYOUT = {
    "menu": (0, 0, 64, 32),
    "panel": (64, 0, 64, 32),
    "toggle": (0, 32, 64, 48),
    "checkbox": (64, 32, 64, 48),
    "entry": (0, 84, 128, 40),
}
