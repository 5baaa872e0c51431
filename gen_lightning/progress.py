"""Progress of the long jobs besides training steps (sampling, evaluation, shard writing, the FID reference pass,
also when callbacks run them during fit): one tqdm, configured for where it prints.

On a terminal it is tqdm's bar. Anywhere else (a SLURM log, a pipe, a CI log) a redrawn bar turns into thousands of
`\\r`-joined fragments, so it prints whole lines instead: one at the start, then one whenever both `interval` seconds
(default 30, $GEN_LIGHTNING_PROGRESS_INTERVAL) and a tenth of the total have passed since the last, and one at the
end, each with the count, the percentage, the elapsed time, the ETA and the rate. Lines too while Lightning's Rich
progress bar holds the terminal (it prints them above itself). Only rank 0 prints.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

INTERVAL_ENV = "GEN_LIGHTNING_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0
LINE_FRACTION = 0.1  # a line at most every tenth of the total, so a long job's log stays about ten lines long
# Where launchers put the global rank (torchrun, SLURM, LSF), read in this order as Lightning's rank_zero_only does.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")

# unit is passed with a leading space ("images" -> " images"), so counts and rates read "64/64 images", "3.2 images/s".
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
LINE_FORMAT = (
    "{desc}: {n_fmt}/{total_fmt}{unit} ({percentage:.0f}%), {elapsed} elapsed, ETA {remaining}, "
    "{rate_noinv_fmt}{postfix}"
)
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt}{unit}, {elapsed} elapsed, {rate_noinv_fmt}{postfix}"


def env_rank() -> int:
    """This process's global rank as the launcher set it (0 when launched alone)."""
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def line_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


class _SkipBlankWrites:
    """tqdm ends a bar with a bare newline (and clears one with a bare `\\r`): in a log that is an empty line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


class LineProgress(tqdm):
    """tqdm printing whole lines: each display is a new line, never a redraw."""

    monitor_interval = 0  # tqdm's monitor thread forces a display after `maxinterval` s, more often than we want

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its bar: nothing to clear in a log
            return True
        if getattr(self, "_shown_n", None) == self.n:  # close() repeating the line already printed at this count
            return True
        self._shown_n = self.n
        self.fp.write(f"{self.__str__() if msg is None else msg}\n")
        self.fp.flush()
        return True


def under_live_display(stream: IO[str]) -> bool:
    """True while a Rich live display (Lightning's RichProgressBar during fit) owns the terminal: it swaps sys.stderr
    for a proxy that prints whole lines above the display, and a redrawn bar written there comes out as blank lines."""
    file_proxy = sys.modules.get("rich.file_proxy")  # never imported here: only when something already uses Rich
    return file_proxy is not None and isinstance(stream, file_proxy.FileProxy)


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "items",
    rank: int | None = None,
    file: IO[str] | None = None,
    leave: bool = True,
    disable: bool = False,
) -> tqdm:
    """A tqdm over `iterable` (or to `.update(n)` by hand) for a job of `total` `unit`s (None: len(iterable), if it
    has one). A bar on a terminal; periodic plain lines elsewhere, or under a live display (module docstring).
    Silent unless `rank` (default: the launcher's, see env_rank) is 0 and `disable` is False. Progress goes to
    stderr, so a command's stdout stays its result. `leave=False` clears a terminal bar when it closes."""
    stream = sys.stderr if file is None else file
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    common: dict[str, Any] = {
        "total": total,
        "desc": desc,
        "unit": f" {unit}",
        # never None: to tqdm that means "off when not a terminal"
        "disable": disable or (env_rank() if rank is None else rank) != 0,
    }
    if getattr(stream, "isatty", lambda: False)() and not under_live_display(stream):
        bar_format = BAR_FORMAT if total else None
        return tqdm(iterable, file=stream, bar_format=bar_format, dynamic_ncols=True, leave=leave, **common)
    return LineProgress(
        iterable,
        file=_SkipBlankWrites(stream),
        bar_format=LINE_FORMAT if total else LINE_FORMAT_NO_TOTAL,
        ascii=True,
        mininterval=line_interval(),
        # tqdm prints when both the count (miniters) and the time (mininterval) have moved on far enough
        miniters=max(1, math.ceil(total * LINE_FRACTION)) if total else 1,
        smoothing=0,  # the rate (and ETA) over the whole job: lines are too far apart for a moving average
        **common,
    )
