"""The small Tk desktop app that the UI recorder (data.ui_source) drives: a 128×128 screen, recorded at 64×64.

    +-------------+-------------+   Menu: a real Tk menubutton; its dropdown (Red / Green / Blue, each drawn in its
    |    Menu     |    panel    |         colour) opens over the app; choosing an item paints the panel.
    +-------------+-------------+   Toggle: OFF (light grey) / ON (dark blue); hover turns it yellow / light blue.
    |   toggle    |  checkbox   |   Checkbox: a 32-px box that fills dark green with a tick; hover turns it yellow.
    |   OFF/ON    |    [ ]      |   Entry: typed text in a big black monospace font; an orange ring while it has the
    +-------------+-------------+          focus, which a click on it takes and a click anywhere else drops.
    |  entry: typed text        |
    +---------------------------+

Every change is a large block of strongly different colour, so it survives the 2× downscale. No colour is near
magenta (the recorder's cursor sprite). Nothing animates: the insertion cursor does not blink and no Tcl timer is
ever left pending (the recorder checks), so a frame depends only on the input events, never on the clock.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tkinter as tk
from typing import Any, TextIO

# The app's name, version and look live in a leaf module that the frame readers (metrics.ui_state, metrics.ui_text)
# share; re-exported here, where the recorder and its tests read them.
from gen_lightning.ui_layout import (  # noqa: F401 (APP_NAME, APP_VERSION: the recorder's manifest reads them here)
    APP_NAME,
    APP_VERSION,
    BACKGROUND,
    BOX_BORDER,
    BOX_CHECKED,
    BOX_SIDE,
    BOX_UNCHECKED,
    CHECKED_BACKGROUND,
    ENTRY_FOCUS_RING,
    ENTRY_FONT,
    ENTRY_RING,
    ENTRY_SELECTION,
    FONT,
    HOVER,
    LAYOUT,
    MENU_BUTTON,
    MENU_ITEMS,
    PANEL_START,
    SCREEN,
    TOGGLE_OFF,
    TOGGLE_ON,
    TOGGLE_ON_HOVER,
)


def _box_image(root: tk.Tk, checked: bool) -> tk.PhotoImage:
    """The checkbox indicator: 32 px, black 3-px border, white or dark green with a white tick."""
    side, border = BOX_SIDE, BOX_BORDER
    image = tk.PhotoImage(master=root, width=side, height=side)
    image.put("#000000", to=(0, 0, side, side))
    image.put(BOX_CHECKED if checked else BOX_UNCHECKED, to=(border, border, side - border, side - border))
    if checked:
        for x in range(8, 25):  # a thick tick: down-right to (13, 22), then up-right
            y = 16 + (x - 8) if x <= 13 else 22 - (x - 13)
            image.put("#ffffff", to=(x - 2, y - 2, x + 2, y + 2))
    return image


class UiApp:
    """The app on X display `display`; `settle()` makes the screen show every input event sent so far."""

    def __init__(self, display: str) -> None:
        self.root = tk.Tk(screenName=display, className="GenLightningUi")
        self.root.geometry(f"{SCREEN}x{SCREEN}+0+0")  # no window manager: the geometry is taken as is
        self.root.configure(background=BACKGROUND)
        self.toggled = False
        self.checked = tk.BooleanVar(master=self.root, value=False)
        self.panel_colour = PANEL_START
        self._images = [_box_image(self.root, False), _box_image(self.root, True)]  # kept alive: Tk holds names only
        self._build()
        self.settle()
        self.root.focus_force()  # keys go to this window without a window manager to give it the focus
        self.settle()

    def _build(self) -> None:
        root = self.root
        common = {"font": FONT, "borderwidth": 2, "highlightthickness": 0, "takefocus": 0}
        self.menubutton = tk.Menubutton(
            root, text="Menu", background=MENU_BUTTON, foreground="#ffffff", activebackground=HOVER,
            activeforeground="#000000", relief="raised", **common,
        )  # fmt: skip
        self.menu = tk.Menu(self.menubutton, tearoff=0, font=FONT, borderwidth=0, activeborderwidth=0, relief="flat")
        for name, (colour, hover) in MENU_ITEMS.items():
            self.menu.add_command(
                label=name.capitalize(), background=colour, foreground="#ffffff", activebackground=hover,
                activeforeground="#000000", command=lambda colour=colour: self._paint_panel(colour),
            )  # fmt: skip
        self.menubutton.configure(menu=self.menu)
        self.panel = tk.Frame(root, background=PANEL_START, borderwidth=0, highlightthickness=0)
        # A Button, not a Checkbutton: it keeps "ON" as a colour change of the whole block, with its own hover colour.
        self.toggle = tk.Button(root, command=self._flip, relief="raised", **common)
        self.checkbox = tk.Checkbutton(
            root, variable=self.checked, image=self._images[0], selectimage=self._images[1], indicatoron=False,
            background=BACKGROUND, activebackground=HOVER, selectcolor=CHECKED_BACKGROUND, relief="flat",
            offrelief="flat", overrelief="flat", **common,
        )  # fmt: skip
        self.entry = tk.Entry(
            root, font=ENTRY_FONT, background="#ffffff", foreground="#000000", relief="flat", borderwidth=2,
            highlightthickness=5, highlightcolor=ENTRY_FOCUS_RING, highlightbackground=ENTRY_RING,
            insertbackground="#000000", insertwidth=4, insertofftime=0,  # no blinking: no clock in the frames
            selectbackground=ENTRY_SELECTION, selectforeground="#ffffff", exportselection=False,
        )  # fmt: skip
        self._tame_entry()
        self._draw_toggle()
        for name, widget in self.widgets().items():
            x, y, width, height = LAYOUT[name]
            widget.place(x=x, y=y, width=width, height=height)
        # The toplevel's tag is in every child's bindtags: a click anywhere but the entry takes the focus from it
        # (the menubutton is left out: its menu takes the focus while open and gives it back when it closes).
        root.bind("<Button-1>", self._click_anywhere, add=True)

    def _tame_entry(self) -> None:
        """Take the clock out of Tk's entry bindings.

        Double/triple clicks are told apart from single ones by the X server's timestamps (real time), so two quick
        clicks would select a word in one recording and not in another: here every click acts as a single click.
        Dragging out of the entry starts a 50 ms auto-scroll timer: here it does nothing. Return clears the text.
        """
        single = self.root.tk.call("bind", "Entry", "<Button-1>")
        for sequence in ("<Double-Button-1>", "<Triple-Button-1>"):  # the user never holds Shift
            self.root.tk.call("bind", str(self.entry), sequence, f"{single}\nbreak")
        self.root.tk.call("bind", str(self.entry), "<B1-Leave>", "break")
        self.entry.bind("<Return>", lambda _event: self.entry.delete(0, "end"))

    def widgets(self) -> dict[str, tk.Widget]:
        return {
            "menu": self.menubutton,
            "panel": self.panel,
            "toggle": self.toggle,
            "checkbox": self.checkbox,
            "entry": self.entry,
        }

    def _click_anywhere(self, event: tk.Event) -> None:
        if event.widget not in (self.entry, self.menubutton):
            self.root.focus_set()

    def _flip(self) -> None:
        self.toggled = not self.toggled
        self._draw_toggle()

    def _draw_toggle(self) -> None:
        if self.toggled:
            look = {"text": "ON", "background": TOGGLE_ON, "foreground": "#ffffff", "activebackground": TOGGLE_ON_HOVER}
        else:
            look = {"text": "OFF", "background": TOGGLE_OFF, "foreground": "#000000", "activebackground": HOVER}
        self.toggle.configure(activeforeground=look["foreground"], **look)

    def _paint_panel(self, colour: str) -> None:
        self.panel_colour = colour
        self.panel.configure(background=colour)

    # --- what the recorder reads ----------------------------------------------------------------------------------
    def boxes(self) -> dict[str, tuple[int, int, int, int]]:
        """Clickable targets now -> (x0, y0, x1, y1) screen pixels, x1/y1 exclusive; menu items only while open."""
        boxes = {name: (x, y, x + w, y + h) for name, (x, y, w, h) in LAYOUT.items()}
        if self.menu.winfo_ismapped():
            left, top, width = self.menu.winfo_rootx(), self.menu.winfo_rooty(), self.menu.winfo_width()
            last = self.menu.index("end")
            for index, name in enumerate(MENU_ITEMS):
                y0 = top + self.menu.yposition(index)
                y1 = top + (self.menu.yposition(index + 1) if index < last else self.menu.winfo_height())
                boxes[f"menu:{name}"] = (left, y0, min(SCREEN, left + width), min(SCREEN, y1))
        return boxes

    def state(self) -> dict[str, Any]:
        """What the screen shows, as data: the recorder's policy plans from it and tests check it."""
        return {
            "menu_open": bool(self.menu.winfo_ismapped()),
            "entry_focused": self.root.focus_get() is self.entry,
            "toggled": self.toggled,
            "checked": self.checked.get(),
            "text": self.entry.get(),
            # The first character in view: Tk scrolls the entry by whole characters once its text overflows.
            "text_first": int(self.entry.index("@0")),
            "panel": self.panel_colour,
            "boxes": self.boxes(),
        }

    def settle(self) -> None:
        """Handle every event the X server has queued for the app and flush its redraws to the server.

        Tk's `update` runs events and idle redraws, then XSyncs with the server until nothing is left, so once it
        returns a screen capture taken over another connection shows the result of every input sent before.
        """
        self.root.update()
        pending = self.root.tk.call("after", "info")
        if pending:  # a timer would make the next frames depend on the clock: a bug in this app, not in the input
            raise RuntimeError(f"ui_app: Tcl timers pending after an input event ({pending}); frames would not repeat")

    def close(self) -> None:
        self.root.destroy()


def serve(display: str, commands: TextIO, replies: TextIO) -> None:
    """Answer the recorder's commands, one per line, each with the app's state as one JSON line.

    "reset": a fresh app (a new Tk interpreter: nothing kept from the last episode); "settle": handle every input
    event sent so far; "quit". The app runs in its own process because Tk never closes an X connection: a recorder
    that ran Tk itself would die with its first Xvfb (Tk polls the dead connection and Xlib exits the process).
    """
    app: UiApp | None = None
    for line in commands:
        command = line.strip()
        try:
            if command == "quit":
                break
            if command == "reset":
                if app is not None:
                    app.close()
                app = UiApp(display)
            elif command != "settle" or app is None:
                raise RuntimeError(f"ui_app: unknown command {command!r} (or 'settle' before 'reset')")
            app.settle()
            reply: dict[str, Any] = app.state()
        except (RuntimeError, tk.TclError) as err:
            reply = {"error": str(err)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    if app is not None:
        app.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m gen_lightning.data.ui_app [--display :N]` shows the app to try it by hand; --serve is the
    recorder's way to run it."""
    parser = argparse.ArgumentParser(prog="python -m gen_lightning.data.ui_app", description=__doc__.split("\n")[0])
    parser.add_argument("--display", default=os.environ.get("DISPLAY", ":0"), help="X display (default: $DISPLAY)")
    parser.add_argument("--serve", action="store_true", help="answer recorder commands on stdin (see serve())")
    ns = parser.parse_args(argv)
    if ns.serve:
        serve(ns.display, sys.stdin, sys.stdout)
    else:
        UiApp(ns.display).root.mainloop()


if __name__ == "__main__":
    main()
