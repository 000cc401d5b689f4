"""What a person at a terminal sees: one rich Console on stderr, shared by the log lines
(logs.py) and the progress bars here, so a log line printed while a bar runs goes above the bar
instead of through it.

Bars are drawn only when stderr is a terminal: piped to a file or a log collector (CI, systemd,
a container), long work shows its usual log lines and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import rich.console
    import rich.progress

_console: rich.console.Console | None = None


def is_terminal() -> bool:
    """stderr is an interactive terminal (not a pipe, a file or a log collector)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def can_redraw() -> bool:
    """A terminal that can redraw a line, as a bar needs (TERM=dumb cannot)."""
    return is_terminal() and os.environ.get("TERM") != "dumb"


def console() -> rich.console.Console:
    """The Console on stderr. rich decides colour from the terminal and honours NO_COLOR."""
    global _console
    if _console is None:
        from rich.console import Console

        # highlight off: a log message is not code, and numbers in it need no colour.
        _console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _console


class Progress:
    """One bar on the terminal, reused stage after stage (parse, embed, write, ...); a spinner
    with the elapsed time when the total is unknown. Without a terminal every call does nothing,
    so the work code calls it unconditionally."""

    def __init__(self, bar: rich.progress.Progress | None = None) -> None:
        self._bar = bar
        self._task: rich.progress.TaskID | None = None

    def stage(self, description: str, total: int | None = None) -> None:
        """Start a stage: the bar restarts at 0 of `total`."""
        if self._bar is None:
            return
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task(description, total=total)

    def describe(self, description: str) -> None:
        """Change what the current stage says (e.g. the step a spinner is at)."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=description)

    def advance(self, count: int = 1) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, count)


NO_PROGRESS = Progress()


def _columns() -> tuple[rich.progress.ProgressColumn, ...]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Known(ProgressColumn):
        """Another column, shown only when the stage has a total (a spinner has none)."""

        def __init__(self, column: ProgressColumn) -> None:
            super().__init__()
            self.column = column

        def render(self, task: rich.progress.Task) -> rich.console.RenderableType:
            return self.column.render(task) if task.total is not None else Text("")

    return (
        SpinnerColumn(), TextColumn("{task.description}"), Known(BarColumn()),
        Known(MofNCompleteColumn()), TimeElapsedColumn(), Known(TimeRemainingColumn()),
    )


@contextlib.contextmanager
def progress(description: str | None = None, total: int | None = None) -> Iterator[Progress]:
    """A Progress shown while the block runs and cleared after it (the command's own result
    lines follow); a do-nothing one when stderr is not a terminal."""
    if not can_redraw():
        yield NO_PROGRESS
        return
    import rich.progress

    with rich.progress.Progress(
        *_columns(), console=console(), transient=True,
        # print() while the bar runs goes above it, but only when stdout is this terminal too:
        # redirected stdout (`kb query | jq`) must not be turned into stderr.
        redirect_stdout=sys.stdout.isatty(), redirect_stderr=True,
    ) as bar:
        shown = Progress(bar)
        if description is not None:
            shown.stage(description, total)
        yield shown
