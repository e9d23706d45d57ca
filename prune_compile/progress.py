"""Progress of long steps (tuning, sensitivity analysis): a bar on a terminal, nothing when not a TTY.

A progress callback is `progress(line, final=False, fraction=None)`: `line` says what runs now, `final` ends the
step (the line stays on screen), `fraction` in [0, 1] is how much of the step is done when that is known.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable

Progress = Callable[..., None]
BAR_WIDTH = 24


def render(line: str, fraction: float | None, columns: int = 100) -> str:
    """`[#########---------------]  37% line`, cut to the terminal width."""
    if fraction is None:
        text = line
    else:
        f = min(max(fraction, 0.0), 1.0)
        filled = round(f * BAR_WIDTH)
        text = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {f * 100:3.0f}% {line}"
    return text[: max(columns - 1, 20)]


def terminal_progress(stream=None) -> Progress | None:
    """A one-line bar on `stream` (stderr) when it is a terminal; None otherwise, so pipes and logs stay clean."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return None

    def show(line: str, final: bool = False, fraction: float | None = None) -> None:
        columns = shutil.get_terminal_size((100, 20)).columns
        stream.write("\r\033[K" + render(line, 1.0 if final and fraction is None else fraction, columns)
                     + ("\n" if final else ""))
        stream.flush()

    return show
