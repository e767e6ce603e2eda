"""The one progress bar (rich, on stderr; silent with --quiet): training's step, loss and tokens/s, and
lm-eval's requests done of requests asked.

`Bar` draws `label  ━━━━  done/total  [columns]  elapsed  [eta]`. A bar cannot redraw where stderr is not a
terminal (a log file, CI); for a long count that would say nothing until it ends, `Bar(..., lines=True)`
then prints a plain line instead, `label: done/total unit (pct%), N min`, every `LINE_EVERY_S` seconds.
Without `lines` rich's own behaviour holds there (the training bar: the bar as it ended, once).
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_B = TypeVar("_B", bound="Bar")


class Bar:
    """One bar over one count: `total` may grow as work is asked for (`add_total`); `advance` and
    `set_completed` move it. Used as a context manager, or with `start` and `stop`."""

    LINE_EVERY_S = 60.0

    def __init__(
        self,
        label: str,
        *columns: ProgressColumn,
        total: int = 0,
        unit: str = "",
        eta: bool = False,
        lines: bool = False,
        quiet: bool = False,
        console: Console | None = None,
        **fields: Any,
    ):
        self.quiet, self.unit = quiet, unit
        self.console = console or Console(stderr=True)
        self.lines = lines and not quiet and not self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            *([TextColumn(unit)] if unit else []),
            *columns,
            TimeElapsedColumn(),
            *([TextColumn("eta"), TimeRemainingColumn()] if eta else []),
            console=self.console,
            disable=quiet or self.lines,
            transient=False,
        )
        self.label = label
        self.task = self.progress.add_task(label, total=total, **fields)
        self.started = self.last_line = time.monotonic()

    def start(self) -> None:
        self.progress.start()
        self.started = self.last_line = time.monotonic()

    def stop(self) -> None:
        self.progress.stop()

    def __enter__(self: _B) -> _B:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_total(self, n: int) -> None:
        """`n` more units asked for."""
        self.progress.update(self.task, total=(self._task().total or 0) + n)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)
        self._maybe_line()

    def set_completed(self, completed: int, **fields: Any) -> None:
        """The count done so far, and new values of the bar's own fields."""
        self.progress.update(self.task, completed=completed, **fields)
        self._maybe_line()

    def note(self, text: str) -> None:
        if not self.quiet:
            self.progress.console.print(text)

    def _task(self):
        return next(t for t in self.progress.tasks if t.id == self.task)

    def _maybe_line(self) -> None:
        now = time.monotonic()
        if not self.lines or now - self.last_line < self.LINE_EVERY_S:
            return
        self.last_line = now
        task = self._task()
        done, total = int(task.completed), int(task.total or 0)
        share = f" ({100 * done / total:.0f}%)" if total else ""
        unit = f" {self.unit}" if self.unit else ""
        minutes = (now - self.started) / 60
        print(
            f"{self.label}: {done}/{total}{unit}{share}, {minutes:.0f} min",
            file=self.console.file,
            flush=True,
        )


class Reporter(Bar):
    """The training bar: step of steps, loss, tokens/s, elapsed and eta."""

    def __init__(self, total: int, quiet: bool = False, console: Console | None = None):
        super().__init__(
            "train",
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("{task.fields[extra]}"),
            total=total,
            eta=True,
            quiet=quiet,
            console=console,
            loss="-",
            tps="-",
            extra="",
        )

    def update(self, step: int, loss: float, tokens_per_second: float, extra: str = "") -> None:
        """`extra`: what the objective adds (GRPO: the mean reward)."""
        self.set_completed(step, loss=f"{loss:.4f}", tps=f"{tokens_per_second:.0f}", extra=extra)
