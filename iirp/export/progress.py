"""Terminal progress for long export steps (rich), or nothing at all when disabled."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

__all__ = ["Steps"]


class Steps:
    """One line per step with its elapsed time, on stderr; a no-op when ``enabled`` is False.

    On a terminal each running step shows a spinner; elsewhere (a pipe, a log file, a test
    runner) a plain line is printed as each step finishes, so long runs still show progress.

    Usage::

        with Steps(enabled=True) as steps:
            with steps.step("export feature_extractor"):
                ...
            steps.print(table)  # on stdout
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._err: Any = None
        self._out: Any = None

    def __enter__(self) -> "Steps":
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._out = Console()
            if not self._out.is_terminal:  # a pipe or a test runner: room for the whole table
                self._out.width = max(self._out.width, 132)
            self._err = Console(stderr=True)
            if self._err.is_terminal:
                self._progress = Progress(
                    SpinnerColumn(finished_text="[green]✓"),
                    TextColumn("{task.description}"),
                    TimeElapsedColumn(),
                    console=self._err,
                    transient=False,
                )
                self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._err = self._out = None

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        """Show ``description`` while the block runs; mark it done (or failed) with its time after."""
        if self._err is None:
            yield
            return
        task = self._progress.add_task(description, total=1) if self._progress is not None else None
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            if task is not None:
                self._progress.update(task, description=f"[red]{description} (failed)")
                self._progress.stop_task(task)
            else:
                self._err.print(f"✗ {description} (failed after {time.perf_counter() - t0:.1f} s)")
            raise
        done = f"{description} [dim]({time.perf_counter() - t0:.1f} s)"
        if task is not None:
            self._progress.update(task, completed=1, description=done)
        else:
            self._err.print(f"✓ {done}")

    def print(self, renderable: Any) -> None:
        """Print a rich renderable (a table, a line) on stdout, if enabled."""
        if self._out is not None:
            if self._progress is not None:
                self._progress.refresh()
            self._out.print(renderable)

    def log(self, message: str) -> None:
        """A one-line note under the progress lines (stderr), if enabled."""
        if self._err is not None:
            self._err.print(message)
