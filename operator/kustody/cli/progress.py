"""A progress bar on stderr (rich), plain lines when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Bar:
    """``with Bar("re-wrapping") as bar: bar.update(done, total)``.

    On a terminal: a live bar with counts and elapsed time. Elsewhere (CI logs, pipes): a line
    each time the count changes, so a log shows the same progress without control codes.
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self._console = Console(stderr=True)
        self._live = self._console.is_terminal
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self._console,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=None)
        self._last: tuple[int, int] | None = None
        self._started = time.monotonic()

    def __enter__(self) -> Bar:
        if self._live:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live:
            self._progress.stop()

    def describe(self, description: str) -> None:
        self.description = description
        self._progress.update(self._task, description=description)

    def update(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)
        if not self._live and self._last != (done, total):
            elapsed = time.monotonic() - self._started
            print(f"{self.description}: {done}/{total} ({elapsed:.0f}s)", file=sys.stderr)
        self._last = (done, total)
