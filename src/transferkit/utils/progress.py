"""Progress display: a live bar (epoch, batch, loss, accuracy, time left) on a terminal; one plain
line per epoch otherwise (CI, logs, pipes)."""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .errors import Interrupted


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class Reporter:
    """Receives training events. `log` prints a line; the bar exists only when interactive."""

    def __init__(self, live: bool | None = None, quiet: bool = False, log: Callable[[str], None] | None = None):
        self.console = Console(stderr=True)
        self.live = interactive() if live is None else live
        self.quiet = quiet
        self._log = log
        self._progress: Progress | None = None
        self._task = None
        self.interrupt = threading.Event()  # set by a signal (runtime.stop_on_signals): work ends at its next step

    def log(self, message: str) -> None:
        if self._log:
            self._log(message)
        elif not self.quiet:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def start(self, description: str, total: int) -> None:
        if not self.live or self.quiet:
            return
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, stats="")

    def advance(self, stats: str = "") -> None:
        """One step done (a batch, a file); the point where a requested stop takes effect."""
        if self._progress is not None:
            self._progress.update(self._task, advance=1, stats=stats)
        self.check()

    def check(self) -> None:
        """Raise Interrupted if a stop was requested."""
        if self.interrupt.is_set():
            raise Interrupted(getattr(self.interrupt, "signum", 2))

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
