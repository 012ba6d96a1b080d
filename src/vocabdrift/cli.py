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


# ---- measure: diff, vocab, neighbors ------------------------------------------------------------------------

@app.command(epilog="Examples:\n\n    vocabdrift diff Qwen/Qwen2.5-7B ./my-sft -o runs/sft1\n\n"
                    "    vocabdrift diff base.gguf post.gguf -o runs/q --threshold 0.9 --top 30")
def diff(
    base: Annotated[str, typer.Argument(help="The pre-trained checkpoint: folder, .safetensors, .gguf or hub id.")],
    post: Annotated[str, typer.Argument(help="The post-trained checkpoint of the same model.")],
    out: Out,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer to read the vocabulary from "
                                                        "(default: POST's, else BASE's).")] = None,
    threshold: Annotated[float, typer.Option(help="Cosine below which a row counts as drifted.")] = 0.95,
    top: Annotated[int, typer.Option(help="How many of the most drifted tokens to print.")] = 20,
    fold_norm: Annotated[bool, typer.Option("--fold-norm", help="Fold the final norm weight g into lm_head "
                                                                "rows first (logits are W·(g⊙x̂)).")] = False,
    center: Annotated[bool, typer.Option("--center", help="Also give mean-centred cosines (one more pass).")] = False,
    neighbors_of: Annotated[list[str] | None, typer.Option("--neighbors-of", help="Also store lm_head neighbours "
                                                           "of this token (text, piece or id); repeatable.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: best present).")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept pickle .bin/.pt checkpoints "
                                                                      "(loaded with weights_only=True).")] = False,
) -> None:
    """Measure how far every lm_head and embedding row moved from BASE to POST.

    Writes RUN/vocab.parquet, drift.parquet, neighbors.parquet, summary.json and manifest.json, then prints
    the per-language table and the most drifted tokens.
    """
    from rich.console import Console

    from .analyses.drift import most_drifted
    from .api.diff import diff as run_diff
    from .outputs.console import drift_summary_table, drifted_tokens_table
    from .outputs.run import Run

    path = run_diff(base, post, out=out, tokenizer=tokenizer, threshold=threshold, fold_norm=fold_norm,
                    center=center, neighbors_of=neighbors_of or (), device=device, allow_pickle=allow_pickle,
                    progress=sys.stderr.isatty())
    run = Run(path)
    summary = run.read_json("summary.json")
    con = Console()
    con.print(drift_summary_table(summary))
    con.print(drifted_tokens_table(most_drifted(run.read_table("drift.parquet"), run.read_table("vocab.parquet"), top)))
    if summary.get("added_tokens"):
        con.print(f"{len(summary['added_tokens'])} tokens exist only in POST (ids {summary['added_tokens'][0]}..).")
    _echo(f"wrote {path}/ (vocab.parquet, drift.parquet, neighbors.parquet, summary.json, manifest.json)")


@app.command(epilog="Examples:\n\n    vocabdrift vocab ./my-model -o runs/m\n\n"
                    "    vocabdrift vocab SmolLM2-135M-Instruct.Q4_1.gguf -o runs/smol")
def vocab(
    model: Annotated[str, typer.Argument(help="Model folder, tokenizer folder, tokenizer.json, .gguf or hub id.")],
    out: Out,
) -> None:
    """Write the vocabulary table (RUN/vocab.parquet): piece, decoded text, category, special, reachable."""
    from rich.console import Console
    from rich.table import Table

    from .analyses.vocab import category_counts
    from .api.diff import vocab as run_vocab

    table = run_vocab(model, out=out)
    t = Table(title=f"{table.num_rows:,} tokens by category", title_justify="left")
    t.add_column("category")
    t.add_column("tokens", justify="right")
    for cat, n in category_counts(table).items():
        t.add_row(cat, f"{n:,}")
    Console().print(t)
    _echo(f"wrote {out}/vocab.parquet")


@app.command(epilog="Examples:\n\n    vocabdrift neighbors ./post 嘉祺 --base ./base\n\n"
                    "    vocabdrift neighbors ./post 12345 --space embed -k 20")
def neighbors(
    model: Annotated[str, typer.Argument(help="The checkpoint to look in (POST when --base is given).")],
    token: Annotated[str, typer.Argument(help="The token: its exact text, raw piece (Ġthe) or id.")],
    base: Annotated[str | None, typer.Option(help="Also look in BASE, side by side.")] = None,
    space: Annotated[str, typer.Option(help="lm_head (what the model says) or embed (what it reads).")] = "lm_head",
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 10,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer (default: MODEL's).")] = None,
) -> None:
    """The nearest neighbours of a token by cosine; special tokens among them are marked ★."""
    from rich.console import Console

    from .api.diff import neighbors as run_neighbors
    from .outputs.console import neighbors_console_table

    if space not in ("lm_head", "embed"):
        raise VocabdriftError(f"--space must be lm_head or embed, not {space!r}")
    nt = run_neighbors(model, token, base=base, space=space, k=k, tokenizer=tokenizer)  # type: ignore[arg-type]
    Console().print(neighbors_console_table(nt, title=f"{space} neighbours of {token!r}"))

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
