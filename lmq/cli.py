"""The `lmq` command line: parse options, call ONE library function, render the result.

Heavy imports (torch, transformers) happen inside the commands so `lmq --help` is instant.
Results go to stdout; logs, progress and errors go to stderr (lmq.console).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from lmq.console import error

app = typer.Typer(
    name="lmq",
    help="Quantize LLMs to 4 bits (AWQ), pack them for your GPU, run and measure them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
eval_app = typer.Typer(help="Measure what quantization cost in quality.", no_args_is_help=True)
bench_app = typer.Typer(help="Measure kernel and end-to-end speed against peers.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")


@contextmanager
def guard():
    """Every command body runs inside this: LmqError -> one `error: ...` line and exit 1.

    Anything else is a bug and keeps its traceback. Ctrl-C exits 130; writers clean up their
    temporary folders themselves, so nothing half-written is left behind.
    """
    from lmq.errors import LmqError

    try:
        yield
    except LmqError as e:
        error(str(e))
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        error("interrupted; nothing partial was left behind")
        raise typer.Exit(130)


# ---------------------------------------------------------------------------------------------
# quantize / inspect / eval (stage 1: the portable checkpoint)
# ---------------------------------------------------------------------------------------------
# (commands added below by the quantizer)


# ---------------------------------------------------------------------------------------------
# pack (stage 2: the packed checkpoint) and bench gemm
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# attention: bench attention
# ---------------------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
