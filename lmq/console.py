"""The one rich Console (stderr) and the progress bars lmq shows for long work.

Results (tables, chat text, --json) go to stdout through `out`; logs, progress and errors go to
stderr through `console`.
"""

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

console = Console(stderr=True)
out = Console()


def progress(transient: bool = False) -> Progress:
    """A progress bar with `i/N`, elapsed time, ETA and a free-form `info` field."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=transient,
    )


def log(msg: str) -> None:
    console.print(msg, highlight=False)


def error(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
