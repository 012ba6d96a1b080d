"""The command line: one thin handler per command, each calling one function of the Python API.

Heavy imports (torch, transformers, pyarrow) happen inside handlers so that `vocabdrift --help` is instant.
A `VocabdriftError` becomes one line on stderr and exit code 2; anything else keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import VocabdriftError

app = typer.Typer(
    name="vocabdrift",
    help="Measure, explain, predict, prove, repair and guard against lm_head vocabulary drift after SFT/RL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

Out = Annotated[Path, typer.Option("-o", "--out", help="Run folder to write (created atomically; an existing "
                                                         "run folder gets new files beside the old).")]


def _echo(msg: str) -> None:
    typer.echo(msg)


# ---- measure -----------------------------------------------------------------------------------------------
# (diff, vocab, neighbors: see the section below, written with vocabdrift.api.diff)

# ---- commands from other modules are added below this line, one section per module -------------------------


def main() -> None:
    """Entry point: run the app, turning a VocabdriftError into one line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except VocabdriftError as e:
        typer.echo(f"vocabdrift: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("vocabdrift: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
