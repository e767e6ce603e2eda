"""A progress bar with step, loss and tokens/s (rich); silent with --quiet."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    def __init__(self, total: int, quiet: bool = False, console: Console | None = None):
        self.quiet = quiet
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=quiet,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total, loss="-", tps="-")

    def __enter__(self) -> Reporter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, step: int, loss: float, tokens_per_second: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", tps=f"{tokens_per_second:.0f}")

    def note(self, text: str) -> None:
        if not self.quiet:
            self.progress.console.print(text)
