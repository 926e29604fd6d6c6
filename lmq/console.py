"""The one rich Console (stderr) and the progress bars lmq shows for long work.

Results (tables, chat text, --json) go to stdout through `out`; logs, progress and errors go to
stderr through `console`.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def _results_width() -> int | None:
    """Results piped to a file or a log keep every column: rich's default off a terminal is 80 columns, which cut
    `lmq bench`'s tables to "qk…" cells. A terminal, or COLUMNS, sets the width as usual."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return None
    return 240


out = Console(width=_results_width())


def progress(transient: bool = False) -> Progress:
    """A progress bar with `i/N`, elapsed time, ETA and a free-form `info` field."""
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),  # a path in it is not markup
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        console=console,
        transient=transient,
    )


def log(msg: str) -> None:
    """One line to stderr, printed as it is: paths and values in it like `model[v2]` are not rich markup."""
    console.print(msg, highlight=False, markup=False)


def warn(msg: str) -> None:
    """`warning: msg` in yellow, `msg` printed as it is."""
    console.print(f"[yellow]warning: {escape(msg)}[/]", highlight=False)


def error(msg: str) -> None:
    """`error: msg`, with `msg` printed as it is: paths and values in it like `model[v2]` are not rich markup."""
    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
