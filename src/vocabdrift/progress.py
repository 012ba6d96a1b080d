"""Progress of long work: a bar on a terminal, a line at a steady pace in a log file, or nothing (the Python API's
default). Why the lines: `vocabdrift probe ... > log` used to print nothing for minutes, and a user could not tell a
slow run from a hung one.

    with bar(mode, total=960, description="probing") as advance:
        advance(64)

`mode` is what commands take as `progress`: False (silent), True (a rich bar), or "lines" (a line on stderr every
`every` seconds: done/total, time so far, time left; and a last one when work that took that long ends). Work
shorter than `every` prints nothing, so a quick command's stderr holds only what it has to say.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

Mode = bool | str
LINE_EVERY = 30.0  # seconds between two progress lines in a log


def cli_mode(*, quiet: bool = False) -> Mode:
    """What the command line passes as `progress`: a bar on a terminal, lines off one, nothing when quiet."""
    if quiet:
        return False
    return True if sys.stderr.isatty() else "lines"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


_prefix = [""]  # what a forked worker of the lab is doing, before each of its lines


def set_prefix(text: str) -> None:
    """Put `text` before every progress line of this process: two workers writing to one log stay apart."""
    _prefix[0] = text


def say(line: str) -> None:
    """One progress line on stderr, in one write: lines of two processes sharing a log do not run together."""
    sys.stderr.write(f"{_prefix[0]}{line}\n")
    sys.stderr.flush()


def every_seconds() -> float:
    """Seconds between two progress lines: LINE_EVERY, or $VOCABDRIFT_PROGRESS_EVERY (tests set it low)."""
    try:
        return float(os.environ.get("VOCABDRIFT_PROGRESS_EVERY", LINE_EVERY))
    except ValueError:
        return LINE_EVERY


@contextlib.contextmanager
def bar(mode: Mode, total: int, description: str, *, every: float | None = None
        ) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; see the module's docstring for the modes. `every` defaults to LINE_EVERY seconds, or
    $VOCABDRIFT_PROGRESS_EVERY."""
    if every is None:
        every = every_seconds()
    if mode == "lines":
        start = last = time.perf_counter()
        done = [0]

        def line(final: bool = False) -> None:
            dt = max(time.perf_counter() - start, 1e-9)
            rate = done[0] / dt
            left = f", {_clock((total - done[0]) / rate)} left" if rate > 0 and not final and total else ""
            of = f"/{total:,}" if total else ""
            say(f"{description}: {done[0]:,}{of}{' done' if final else ''} ({_clock(dt)}{left})")

        said = [False]

        def advance(n: int = 1) -> None:
            nonlocal last
            done[0] += n
            now = time.perf_counter()
            if now - last >= every:
                last = now
                said[0] = True
                line()

        yield advance
        if said[0]:
            line(final=True)
        return
    if not mode:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)
