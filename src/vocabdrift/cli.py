"""The command line: one thin handler per command, each calling one function of the Python API.

Heavy imports (torch, transformers, pyarrow) happen inside handlers so that `vocabdrift --help` is instant.
A `VocabdriftError` becomes one line on stderr and exit code 2; anything unexpected is a bug: one line, exit
code 70, and its traceback with VOCABDRIFT_DEBUG=1 (see `main`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .analyses.tokens import TOKEN_RULE
from .errors import EXTRA_OF, VocabdriftError, missing_extra
from .progress import cli_mode


def _flag_type(self: typer.core.TyperOption, ctx: typer.Context) -> str | None:
    """`--json` is a flag, not a `<bool>` to be typed: help shows flags bare, values with their type."""
    return None if self.is_flag else _value_type(self, ctx)


_value_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]

app = typer.Typer(
    name="vocabdrift",
    help="Measure, explain, predict, prove, repair and guard against lm_head vocabulary drift after SFT/RL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

# ---- every path vocabdrift writes goes through one gate (outputs.location.check_out), run as the option is parsed:
# a run folder to create or add to (-o), a file (synth, mix, --csv), the lab's folder, an existing run folder
# (--run, --compare). Every other path option is an input, named in PATH_INPUTS; a test walks every command's
# options and fails on a path option that is neither, so a new option cannot skip the gate.
PATH_INPUTS = frozenset({"cases_file", "prompts", "tokens_file", "data", "inputs", "heldout", "replay"})


def _gate_out(value: Path | None) -> Path | None:
    from .outputs.location import check_out

    return None if value is None else check_out(value)


def _gate_file(value: Path | None) -> Path | None:
    from .outputs.location import check_out

    return None if value is None else check_out(value, file=True)


def _gate_lab(value: Path | None) -> Path | None:
    from .outputs.location import check_out

    return None if value is None else check_out(value, lab=True)


def _gate_run(value: Path | None) -> Path | None:
    from .outputs.run import existing_run

    return None if value is None else existing_run(value)


GATES = (_gate_out, _gate_file, _gate_lab, _gate_run)

Out = Annotated[Path, typer.Option("-o", "--out", callback=_gate_out,
                                   help="Run folder to write (created atomically; an existing "
                                        "run folder gets new files beside the old).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON alone on stdout (for scripts); "
                                                     "messages go to stderr.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print no tables, only errors.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Accept pickle weights (.bin/.pt, loaded with "
                                                                  "weights_only=True); refused otherwise.")]
# One way to name a run folder (docs/ARCHITECTURE.md, "The run folder"): `-o/--out RUN` where a command creates or
# writes one, `--run RUN` where it reads (or adds to) an existing one.
RunIn = Annotated[Path | None, typer.Option("--run", callback=_gate_run,
                                            help="An existing run folder (from `diff`) to read and add "
                                                 "to.")]
OutOpt = Annotated[Path | None, typer.Option("-o", "--out", callback=_gate_out,
                                             help="Run folder to write (created when missing); "
                                                  "or --run for an existing one.")]
# Rows of a table printed to the console: one default for every command (`--top`); the report's tables are a
# document's and take their own (`report --top`, 50).
TOP = 20


def _echo(msg: str) -> None:
    typer.echo(msg)


def _err(msg: str) -> None:
    """A progress line on stderr (stdout stays for results)."""
    typer.echo(msg, err=True)


def _echo_json(obj: object) -> None:
    """`--json`: the result as JSON, alone on stdout (everything else goes to stderr or nowhere)."""
    import json

    from .outputs.run import _json_default

    def finite(o: object) -> object:  # JSON has no NaN: a number that is not one is null (a bare NaN breaks jq)
        if isinstance(o, float):
            return o if o == o and o not in (float("inf"), float("-inf")) else None
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [finite(v) for v in o]
        return o

    plain = json.loads(json.dumps(obj, default=_json_default))  # numpy and paths as JSON would have them
    typer.echo(json.dumps(finite(plain), indent=2, ensure_ascii=False, allow_nan=False))


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"vocabdrift {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Measure, explain, predict, prove, repair and guard against lm_head vocabulary drift after SFT/RL."""


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
    top: Annotated[int, typer.Option(help="How many of the most drifted tokens to print.")] = TOP,
    fold_norm: Annotated[bool, typer.Option("--fold-norm", help="Fold the final norm weight g into lm_head "
                                                                "rows first (logits are W·(g⊙x̂)).")] = False,
    center: Annotated[bool, typer.Option("--center", help="Also give mean-centred cosines (one more pass).")] = False,
    collapse: Annotated[bool, typer.Option("--collapse/--no-collapse", help="Find groups of near-identical lm_head "
                                                                           "rows in BASE and POST (three more passes "
                                                                           "each): which tokens collapsed during "
                                                                           "post-training.")] = True,
    neighbors_of: Annotated[list[str] | None, typer.Option("--neighbors-of", help="Also store lm_head neighbours "
                                                           "of this token; repeatable. " + TOKEN_RULE)] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: best present).")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept pickle .bin/.pt checkpoints "
                                                                      "(loaded with weights_only=True).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Recompute even when RUN already holds this diff (same "
                                                        "BASE, POST and options).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json alone on stdout (for "
                                                         "scripts).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print no tables, only errors.")] = False,
) -> None:
    """Measure how far every lm_head and embedding row moved from BASE to POST.

    A run folder holds one BASE/POST pair: diffing another pair into a folder that holds another pair's results
    removes those results (coverage joins, probe, cases, confusion, check, report) and says so on stderr.

    Writes RUN/vocab.parquet, drift.parquet, neighbors.parquet, summary.json and manifest.json, then prints
    the per-language table and the most drifted tokens. The vocabulary table is cached per tokenizer in
    ~/.cache/vocabdrift (VOCABDRIFT_CACHE=DIR moves it, VOCABDRIFT_CACHE=off turns it off). On Linux, rows not in
    the page cache are read around it (O_DIRECT); VOCABDRIFT_DIRECT_IO=0 reads everything through it.
    """
    from rich.console import Console

    from .analyses.drift import most_drifted
    from .api.diff import diff as run_diff
    from .outputs import run as R
    from .outputs.console import drift_summary_table, drifted_tokens_table
    from .outputs.run import Run

    def stamp() -> int | None:  # summary.json's change time: a rerun that recomputed nothing leaves it
        with contextlib.suppress(OSError):
            return (Path(out) / R.SUMMARY).stat().st_mtime_ns
        return None

    before = stamp()
    path = run_diff(base, post, out=out, tokenizer=tokenizer, threshold=threshold, fold_norm=fold_norm,
                    center=center, neighbors_of=neighbors_of or (), device=device, allow_pickle=allow_pickle,
                    progress=sys.stderr.isatty() and not (as_json or quiet), force=force, collapse=collapse)
    wrote = before is None or stamp() != before
    run = Run(path)
    from .outputs.shapes import SUMMARY, check_shape

    summary = check_shape(run.read_json(R.SUMMARY), SUMMARY, path / R.SUMMARY,  # a damaged file: one line
                          fix=f"rerun `vocabdrift diff {base} {post} -o {out} --force`")
    if not isinstance(summary, dict) or "overall" not in summary:
        raise VocabdriftError(f"{path / R.SUMMARY}: holds no drift summary; rerun `vocabdrift diff {base} {post} "
                              f"-o {out} --force`")
    if as_json or quiet:
        if as_json:
            _echo_json(summary)
        return
    con = Console()
    con.print(drift_summary_table(summary))
    if summary.get("centered"):
        con.print(drift_summary_table(summary, centered=True))
    con.print(drifted_tokens_table(most_drifted(run.read_table(R.DRIFT), run.read_table(R.VOCAB), top)))
    if summary.get("added_tokens"):
        con.print(f"{len(summary['added_tokens'])} tokens exist only in POST (ids {summary['added_tokens'][0]}..).")
    if summary.get("neighbors"):
        from .outputs.console import intrusion_line

        con.print(intrusion_line(summary["neighbors"]))
    if summary.get("collapse"):
        from .outputs.console import collapse_line

        con.print(collapse_line(summary["collapse"]), markup=False, highlight=False)  # token texts: never markup
    if wrote:  # else the warning above said it: nothing recomputed, nothing written
        _echo(f"wrote {path}/ (vocab.parquet, drift.parquet, neighbors.parquet, summary.json, manifest.json)")


@app.command(epilog="Examples:\n\n    vocabdrift vocab ./my-model -o runs/m\n\n"
                    "    vocabdrift vocab SmolLM2-135M-Instruct.Q4_1.gguf -o runs/smol")
def vocab(
    model: Annotated[str, typer.Argument(help="Model folder, tokenizer folder, tokenizer.json, .gguf or hub id.")],
    out: Out,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Write the vocabulary table (RUN/vocab.parquet): piece, decoded text, category, special, reachable.

    Cached per tokenizer in ~/.cache/vocabdrift (VOCABDRIFT_CACHE=DIR moves it, VOCABDRIFT_CACHE=off turns it off).
    """
    from rich.console import Console

    from .api.diff import vocab as run_vocab
    from .outputs.console import vocab_categories_table

    table = run_vocab(model, out=out)
    if as_json:
        import pyarrow.compute as pc

        counts = pc.value_counts(table["category"].cast("string")).to_pylist()
        _echo_json({"tokens": table.num_rows, "categories": {c["values"]: c["counts"] for c in counts},
                    "path": str(out)})
        return
    if not quiet:
        Console().print(vocab_categories_table(table))
        _echo(f"wrote {out}/vocab.parquet")


@app.command(epilog="Examples:\n\n    vocabdrift neighbors ./post 嘉祺 --base ./base\n\n"
                    "    vocabdrift neighbors ./post 12345 --space embed -k 20")
def neighbors(
    model: Annotated[str, typer.Argument(help="The checkpoint to look in (POST when --base is given).")],
    token: Annotated[str, typer.Argument(help="The token. " + TOKEN_RULE)],
    base: Annotated[str | None, typer.Option(help="Also look in BASE, side by side.")] = None,
    space: Annotated[str, typer.Option(help="lm_head (what the model says) or embed (what it reads).")] = "lm_head",
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 10,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer (default: MODEL's).")] = None,
    allow_pickle: AllowPickle = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """The nearest neighbours of a token by cosine; special tokens among them are marked ★."""
    from rich.console import Console

    from .api.diff import neighbors as run_neighbors
    from .outputs.console import neighbors_console_table

    if space not in ("lm_head", "embed"):
        raise VocabdriftError(f"--space must be lm_head or embed, not {space!r}")
    nt = run_neighbors(model, token, base=base, space=space, k=k, tokenizer=tokenizer,  # type: ignore[arg-type]
                       allow_pickle=allow_pickle)
    if as_json:
        _echo_json(nt.to_pylist())
        return
    if quiet:  # the exit code says the token and the model were found
        return
    from .analyses.vocab import token_label

    Console().print(neighbors_console_table(nt, title=f"{space} neighbours of {token_label(token)}"))

# ---- commands from other modules are added below this line, one section per module -------------------------

# ---- repair and guard: check, repair ------------------------------------------------------------------------

@app.command(epilog="Examples:\n\n    vocabdrift check ./base ./sft --min-cos 0.9 --max-below 0.95:1%\n\n"
                    "    vocabdrift check ./base ./sft --category japanese:0.95:5% --category russian:0.9\n\n"
                    "    vocabdrift check --run runs/sft1 --max-below 0.9:0\n\n"
                    "Exit codes: 0 pass, 1 fail, 2 bad input.")
def check(
    base: Annotated[str | None, typer.Argument(help="The pre-trained checkpoint (folder, .safetensors, .gguf, "
                                                    "hub id).")] = None,
    post: Annotated[str | None, typer.Argument(help="The post-trained checkpoint to judge.")] = None,
    min_cos: Annotated[float | None, typer.Option("--min-cos", help="Fail if any token's cosine is below "
                                                                     "this.")] = None,
    max_below: Annotated[list[str] | None, typer.Option("--max-below", help="COS:LIMIT — fail if more than LIMIT "
                                                        "(1%, 0.01, or a count) of tokens are below COS. Default "
                                                        "0.95:1% when no rule is given.")] = None,
    category: Annotated[list[str] | None, typer.Option("--category", help="NAME:COS:LIMIT (japanese:0.95:5%) or "
                                                       "NAME:MIN_COS (japanese:0.9), per category; repeatable.")]
    = None,
    space: Annotated[str, typer.Option(help="lm_head (what the model says) or embed (what it reads).")] = "lm_head",
    all_tokens: Annotated[bool, typer.Option("--all-tokens", help="Judge every non-special token, unreachable "
                                                                  "ones (partial UTF-8 pieces) too.")] = False,
    run: Annotated[Path | None, typer.Option("--run", callback=_gate_run,
                                             help="Judge a run folder `diff` wrote instead of two "
                                                  "checkpoints.")] = None,
    max_lost: Annotated[list[str] | None, typer.Option("--max-lost", help="With --run holding a say-ability map "
                                                       "(saymap --base) or a probe with BASE: the most tokens "
                                                       "that may be LOST (sayable in BASE, not in POST): a count "
                                                       "or a share (2%: of what BASE could say, in a map); "
                                                       "CATEGORY:LIMIT (japanese:1%) per category of a map; "
                                                       "repeatable; 'none' turns it off. Default 0.")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", callback=_gate_out,
                                             help="Also write the run folder (diff's tables and "
                                                  "summary.json's \"check\" key).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer (default: POST's, else BASE's).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: best present).")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept pickle .bin/.pt checkpoints.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result as JSON alone on stdout (the "
                                                         "verdict is in it); for scripts.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; the exit code is the "
                                                              "verdict.")] = False,
    write: Annotated[bool, typer.Option("--write", help="With --run: record the result in the run folder "
                                                        "(summary.json's \"check\" key); off by default, a gate "
                                                        "only reads.")] = False,
) -> None:
    """A CI gate: exit 0 if POST's vocabulary rows stayed within the limits, 1 if not, with a one-line verdict.

    Rules are judged over reachable, non-special tokens (special and padding rows are often untrained, and
    unreachable pieces are never a generation target).
    """
    import json

    from .api.check import check as run_check

    if write and run is None:
        raise VocabdriftError("--write records the result in the folder given by --run; with BASE and POST, "
                              "-o writes the run folder and the result")
    result = run_check(base, post, run=run, min_cos=min_cos, max_below=max_below or None,
                       categories=category or (), space=space, all_tokens=all_tokens,
                       out=out, tokenizer=tokenizer, device=device, allow_pickle=allow_pickle,
                       progress=sys.stderr.isatty() and not (as_json or quiet), write=write,
                       max_lost=None if any(x.lower() == "none" for x in max_lost or ()) else
                       (max_lost or "0"))
    from .outputs.run import DRIFT

    rec = None
    folder = run if run is not None else out
    if folder is not None and (Path(folder) / DRIFT).exists():
        from .api.recommend import recommendation

        rec = recommendation(folder)
    if as_json:
        _echo(json.dumps({"verdict": result.verdict, **result.to_json(),
                          **({"recommendation": rec.to_json()} if rec is not None else {})},
                         indent=2, ensure_ascii=False))
    elif not quiet:
        _echo(result.verdict)
        if rec is not None and (not result.passed or rec.status == "repair"):
            for line in rec.lines:
                _echo("  " + line)
    if not result.passed:
        raise typer.Exit(1)


@app.command(epilog="Examples:\n\n"
                    "    vocabdrift repair ./base sft.jsonl --heal ./post --run runs/sft1 -o runs/healed "
                    "--heldout heldout.jsonl   (the recommended repair: heal POST)\n\n"
                    "    vocabdrift repair ./base sft.jsonl --run runs/sft1 -o runs/retrained   (retrain from BASE "
                    "with RUN's tokens at risk covered)\n\n"
                    "    vocabdrift repair ./base sft.jsonl -o runs/anchor --coverage none --anchor 0.01 --gate\n\n"
                    "    torchrun --nproc_per_node 8 -m vocabdrift.cli repair ./base sft.jsonl -o runs/fix  "
                    "(several GPUs; `accelerate launch` works too)")
def repair(
    base: Annotated[str, typer.Argument(help="The pre-trained model: a Hugging Face folder (only read); every "
                                             "drift figure is against it, and without --heal training starts "
                                             "from it.")],
    data: Annotated[list[str], typer.Argument(help="SFT data: JSONL, JSON, Parquet files or folders, saved data "
                                                   "sets (messages, conversations, prompt/completion, text).")],
    out: Out,
    heal: Annotated[str | None, typer.Option("--heal", help="POST: heal it (a short run on coverage samples of "
                                                             "RUN's tokens at risk plus a replay of DATA, lr 5e-4) "
                                                             "instead of retraining from BASE. Needs --run.")]
    = None,
    run: Annotated[Path | None, typer.Option("--run", callback=_gate_run,
                                             help="The run folder of `diff BASE POST` (with `probe` and "
                                                  "`coverage`): the tokens at risk, LOST first.")] = None,
    heldout: Annotated[list[str] | None, typer.Option("--heldout", help="Held-out chats of your task: the "
                                                                        "verdict's task loss (with --heal).")]
    = None,
    max_tokens: Annotated[int, typer.Option(help="With --run: the most tokens at risk to cover (LOST first).")]
    = 512,
    replay_sft: Annotated[float, typer.Option(help="With --heal: DATA samples replayed per coverage sample.")]
    = 1.0,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="With --heal: judge the result (evaluate) "
                                                                      "after training.")] = True,
    coverage: Annotated[str, typer.Option(help="'auto' (write the coverage set with synth: RUN's tokens at risk "
                                               "with --run, else the whole vocabulary), a coverage JSONL, or "
                                               "'none'.")] = "auto",
    min_per_token: Annotated[int, typer.Option(help="With --coverage auto: target placements per token.")] = 2,
    tokens_per_sample: Annotated[int, typer.Option(help="With --coverage auto: tokens per coverage sample.")] = 8,
    coverage_weight: Annotated[float, typer.Option(help="Loss weight of coverage samples (0.5: each coverage "
                                                        "target kept with probability 0.5, seeded).")] = 1.0,
    replay: Annotated[str | None, typer.Option(help="Plain pre-training text to blend in (language-modelling "
                                                    "loss).")] = None,
    replay_ratio: Annotated[float, typer.Option(help="Share of training samples drawn from --replay.")] = 0.05,
    anchor: Annotated[float, typer.Option(help="λ of an L2-SP anchor pulling lm_head rows to BASE (0: off).")]
    = 0.0,
    anchor_rarity: Annotated[bool, typer.Option("--anchor-rarity", help="Weight the anchor toward tokens rarely "
                                                                        "seen as targets.")] = False,
    gate: Annotated[bool, typer.Option("--gate", help="Rare-row gradient gating: rows of tokens absent from a "
                                                      "batch's targets get no gradient.")] = False,
    freeze: Annotated[list[str] | None, typer.Option(help="Freeze lm_head and/or embed; repeatable.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: one pass over the heal set with "
                                                   "--heal, else 200).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: 5e-4 with --heal, else 2e-4).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per step (default: 4 with --heal, else 8).")]
    = None,
    max_length: Annotated[int, typer.Option(help="Tokens per sample (longer ones are cut).")] = 256,
    seed: Annotated[int, typer.Option(help="Seed for data order, coverage set and initialisation.")] = 0,
    every: Annotated[int | None, typer.Option(help="Measure drift every N steps (default: steps/20).")] = None,
    stop_below: Annotated[float | None, typer.Option(help="Stop training if the minimum lm_head cosine falls "
                                                          "below this.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: best present).")] = None,
    untie: Annotated[bool, typer.Option("--untie", help="Give a tied BASE its own lm_head (a copy of the "
                                                        "embedding) before training, as the published model had; "
                                                        "without it a tied model's embedding moves with every "
                                                        "lm_head row.")] = False,
    coverage_share: Annotated[float | None, typer.Option(help="Retraining: share of training samples drawn from "
                                                              "the coverage set (a seeded subset or repeats); "
                                                              "default: 0.05 of the whole-vocabulary set, or a "
                                                              "--coverage file or RUN's set whole.")] = None,
    log_every: Annotated[int | None, typer.Option(help="A log line every N steps (step, loss, lm_head cosines, "
                                                       "time left); default steps/20 when stderr is not a "
                                                       "terminal, 0 turns it off.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json's \"repair\" and \"evaluate\" as JSON "
                                                         "alone on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print no tables and no plan or step lines, only "
                                                              "errors (the exit code says the verdict).")] = False,
) -> None:
    """Repair drift: heal POST (--heal POST --run RUN, recommended) or retrain from BASE with coverage data and
    other remedies; then diff against BASE and, when healing, judge the result (evaluate).

    The loss falls on what `coverage` counts as targets, token for token: the assistant's turns of each chat
    (found through the model's own chat template, with or without {% generation %} markers) and all of plain
    text. Before training it logs what the run will see.

    Writes OUT/model (the trained checkpoint), the coverage set it used, diff's tables and, when healing, the
    verdict (evaluate.parquet, summary.json's "evaluate"), with what the repair drew in extra training tokens in
    summary.json's "repair" key. Exit code 1 when the verdict is not REPAIRED.
    """
    import json

    from rich.console import Console

    from .composites.repair import repair as run_repair

    if not quiet:
        logging.getLogger("vocabdrift.composites").setLevel(logging.INFO)  # the plan and the step lines
    from .device import process_rank
    from .outputs.console import drift_summary_table, evaluation_table
    from .outputs.run import Run

    path = run_repair(base, data, out=out, coverage=None if coverage.lower() == "none" else coverage,
                      min_per_token=min_per_token, replay=replay, replay_ratio=replay_ratio, anchor=anchor,
                      anchor_rarity=anchor_rarity, gate=gate, freeze=freeze or (), steps=steps, lr=lr,
                      batch_size=batch_size, max_length=max_length, seed=seed, every=every, stop_below=stop_below,
                      device=device, progress=sys.stderr.isatty() and not (as_json or quiet), untie=untie,
                      coverage_share=coverage_share, log_every=log_every, heal=heal, run=run,
                      max_tokens=max_tokens, replay_sft=replay_sft, heldout=heldout or None, verify=verify,
                      tokens_per_sample=tokens_per_sample, coverage_weight=coverage_weight)
    if process_rank() != 0:  # under torchrun / `accelerate launch`, the main process reports
        return
    summary = Run(path).read_json("summary.json")
    from .composites.evaluate import read_evaluation

    ev = read_evaluation(path)
    if as_json:
        _echo(json.dumps({"repair": summary["repair"], "evaluate": summary.get("evaluate")}, indent=2,
                         ensure_ascii=False))
    elif not quiet:
        Console().print(drift_summary_table(summary))
        rep = summary["repair"]
        if rep["training"]["stopped"]:
            _echo(rep["training"]["stopped"])
        cost = rep["cost"]
        d = cost.get("drawn_tokens") or {}
        parts = [f"coverage {d.get('coverage', 0):,}"] + ([f"replayed SFT {d.get('sft', 0):,}"]
                                                          if rep.get("mode") == "heal" else []) \
            + ([f"replay {d.get('replay', 0):,}"] if d.get("replay") else [])
        _echo(f"extra target tokens drawn: {cost['extra_tokens']:,} ({', '.join(parts)}; "
              f"{100 * cost['extra_token_share']:.1f}% of one pass over the SFT data's {cost['sft_tokens']:,} "
              "target tokens, as `coverage` counts them)")
        if ev is not None:
            Console().print(evaluation_table(ev))
            for c in ev.candidates:
                _echo(c.sentence)
        _echo(f"wrote {path}/ (model/, vocab.parquet, drift.parquet, neighbors.parquet, summary.json, "
              "manifest.json" + (", evaluate.parquet)" if ev is not None else ")"))
        if ev is None and heal is None and run is not None:
            _echo(f"next: vocabdrift evaluate {path}/model --base {base} --post POST --run {run} --heldout HELDOUT")
        elif ev is not None:
            _echo(f"next: vocabdrift report --run {path}  (the verdict's page)")
    if ev is not None and not ev.passed:
        raise typer.Exit(1)


@app.command(epilog="Examples:\n\n"
                    "    vocabdrift evaluate runs/healed/model --base ./base --post ./post --run runs/sft1 "
                    "--heldout heldout.jsonl\n\n"
                    "    vocabdrift evaluate ./mine-a ./mine-b.gguf --base ./base --post ./post --run runs/sft1\n\n"
                    "Exit codes: 0 every candidate REPAIRED, 1 not, 2 bad input.")
def evaluate(
    candidates: Annotated[list[str], typer.Argument(help="Repaired models: repair's OUT/model, or your own "
                                                         "(folder, .safetensors, .gguf, hub id).")],
    base: Annotated[str, typer.Option("--base", help="The pre-trained model.")],
    post: Annotated[str, typer.Option("--post", help="The post-trained model whose drift is being repaired.")],
    run: Annotated[Path, typer.Option("--run", callback=_gate_run,
                                      help="The run folder of `diff BASE POST` (its most drifted and "
                                           "control tokens; its probe's rows are reused).")],
    heldout: Annotated[list[str] | None, typer.Option("--heldout", help="Held-out chats of your task (the SFT "
                                                                        "data's format): the task loss.")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", callback=_gate_out,
                                             help="Write the verdict here instead of into "
                                                  "--run.")] = None,
    name: Annotated[list[str] | None, typer.Option("--name", help="A name per candidate, in order.")] = None,
    drifted: Annotated[int | None, typer.Option(help="Most drifted tokens asked beside POST's LOST ones (default: "
                                                     "the tokens of RUN's probe, else 200).")] = None,
    control: Annotated[int | None, typer.Option(help="Undrifted control tokens (default: RUN's probe's, else "
                                                     "100).")] = None,
    min_back: Annotated[float, typer.Option(help="REPAIRED needs this share of POST's LOST tokens sayable "
                                                 "again.")] = 0.9,
    max_loss_rise: Annotated[float, typer.Option(help="REPAIRED needs the held-out loss at most this much above "
                                                      "POST's (0.02: 2%).")] = 0.02,
    confusion: Annotated[int, typer.Option(help="Also sample N answers per language-confusion prompt (Japanese, "
                                                "Korean; T=1.0) from every model; a candidate whose foreign-script "
                                                "rate rose significantly above POST's is not REPAIRED. 0: off.")]
    = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: best present).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 64,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept pickle .bin/.pt checkpoints.")]
    = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the models' own code.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON alone on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; the exit code is the verdict.")]
    = False,
) -> None:
    """The before/after verdict: can each candidate say POST's LOST tokens again, beyond what undrifted control
    tokens did, without costing the task?

    Every model (BASE, POST, candidates) is asked the same tokens with the same templates; a template on which a
    model lost every token, controls included, is a template failure, not lost tokens. With --heldout, the loss on
    exactly the targets `coverage` counts. One line per candidate: REPAIRED, PARTIAL, NOT REPAIRED or COSTS THE
    TASK, with McNemar's and Mann-Whitney's p-values. Writes evaluate.parquet and summary.json's "evaluate".
    """
    import json

    from rich.console import Console

    from .composites.evaluate import evaluate as run_evaluate
    from .outputs.console import evaluation_table

    quiet_log = as_json or quiet
    r = run_evaluate(candidates, base=base, post=post, run=run, out=out, heldout=heldout or None, names=name,
                     drifted=drifted, control=control, min_back=min_back, max_loss_rise=max_loss_rise,
                     device=device, batch_size=batch_size, allow_pickle=allow_pickle, confusion=confusion,
                     trust_remote_code=trust_remote_code, report=None if quiet_log else _err)
    if as_json:
        _echo(json.dumps(r.to_json(), indent=2, ensure_ascii=False))
    elif not quiet:
        Console().print(evaluation_table(r.evaluation))
        for c in r.evaluation.candidates:
            _echo(c.sentence)
        _echo(f"wrote {r.path}/evaluate.parquet and summary.json (\"evaluate\"); next: vocabdrift report --run "
              f"{r.path}")
    if not r.passed:
        raise typer.Exit(1)


# ---- predict and fill the floor: coverage, synth, mix, prune-suggest ----------------------------------------

@app.command(epilog="Examples:\n\n    vocabdrift coverage sft.jsonl --tokenizer Qwen/Qwen2.5-7B -o runs/sft1\n\n"
                    "    vocabdrift coverage data/ more.parquet --tokenizer ./base -o runs/sft1 --floor 10\n\n"
                    "    vocabdrift coverage saved_ds/ --tokenizer ./base -o runs/c --field text --targets all\n\n"
                    "    vocabdrift coverage s3://bucket/sft/ --tokenizer ./base -o runs/big --engine ray")
def coverage(
    data: Annotated[list[str], typer.Argument(help="JSONL/JSON/Parquet files, folders of them, or saved HF data "
                                                   "sets.")],
    tokenizer: Annotated[str, typer.Option(help="The BASE model's tokenizer: model folder, tokenizer.json, .gguf "
                                                "or hub id.")],
    out: OutOpt = None,
    run: RunIn = None,
    targets: Annotated[str, typer.Option(help="assistant (assistant turns, completions, plain text) or all.")]
    = "assistant",
    floor: Annotated[int, typer.Option(help="Occurrences a token needs to count as covered.")] = 5,
    field: Annotated[str | None, typer.Option(help="Read this record field (text, or a list of messages) "
                                                   "instead of detecting the shape.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first malformed record.")] = False,
    top: Annotated[int, typer.Option(help="How many below-floor tokens to print.")] = TOP,
    engine: Annotated[str, typer.Option(help="local (streaming, this process) or ray (Ray Data; connects to "
                                             "RAY_ADDRESS, else starts a local Ray).")] = "local",
    num_cpus: Annotated[int | None, typer.Option(help="CPUs for a local Ray (--engine ray).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Count again even when RUN already holds this coverage "
                                                        "(same data, tokenizer and options).")] = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Count each token as a generation target in SFT data: which tokens and languages the data leaves uncovered.

    Writes RUN/coverage.parquet (token_id, count, samples) and summary["coverage"]; when RUN holds drift.parquet
    (from `diff`), also the Spearman correlation of log(count+1) with lm_head cosine and coverage_drift.parquet.
    """
    from rich.console import Console

    from .analyses.advice import advice_lines
    from .api.coverage import coverage as run_coverage
    from .outputs.console import below_floor_table, coverage_categories_table
    from .outputs.run import run_target

    where = run_target(out, run)
    r = run_coverage(data, tokenizer=tokenizer, out=out, run=run, targets=targets, floor=floor, field=field,  # type: ignore[arg-type]
                     strict=strict, progress=cli_mode(quiet=as_json or quiet), engine=engine,
                     num_cpus=num_cpus, force=force)
    from .outputs.run import DRIFT

    s, con = r.summary, Console()
    rec = None
    if (Path(where) / DRIFT).exists():
        from .api.recommend import recommendation

        rec = recommendation(where)
    if as_json or quiet:
        if as_json:
            _echo_json({**s, "recommendation": rec.to_json()} if rec is not None else s)
        if s["malformed"]:
            typer.echo(f"{s['malformed']} malformed records skipped", err=True)
        return
    con.print(coverage_categories_table(s, r.under_covered, floor=floor, verdicts=None if rec is None else
                                        {a.category: a.verdict for a in rec.categories}))
    if "correlation" in s:
        o = s["correlation"]["overall"]
        rho = "n/a" if o["spearman_rho"] is None else f"{o['spearman_rho']:+.3f} (p={o['p_value']:.2g})"
        if o["spearman_rho"] is not None and not o.get("informative", True):
            rho += (f"; not informative: {o['tied_share']:.0%} of the tokens share one count (never a target), so "
                    "the ranks cannot tell the drifted rows apart")
        con.print(f"Spearman rho, log(count+1) vs lm_head cosine over {o['n']:,} tokens: {rho}", highlight=False)
    if r.below_floor.num_rows:
        con.print(below_floor_table(r.below_floor, top=top))
    if rec is not None:  # a diff run: the folder's one recommendation, as report and check show it
        for line in rec.lines:
            con.print(line, highlight=False)
    else:
        for line in advice_lines(s["advice"]) if s.get("advice") else []:
            con.print(line, highlight=False)
        if any(x["verdict"] in ("needs data", "rare") for x in s.get("advice", {}).get("languages", [])):
            con.print(f"Fill them with `vocabdrift synth {tokenizer} --run {where} -o synth.jsonl`, then "
                      "`vocabdrift mix` at the share above.", highlight=False)
    if s["malformed"]:
        shown = "; ".join(f"{m.source}: {m.reason}" for m in r.malformed[:5])
        typer.echo(f"{s['malformed']} malformed records skipped: {shown}{' ...' if s['malformed'] > 5 else ''}",
                   err=True)
    _echo(f"wrote {where}/coverage.parquet and summary.json" + (" and coverage_drift.parquet" if r.scatter else ""))


@app.command(epilog="Examples:\n\n    vocabdrift synth Qwen/Qwen2.5-7B -o coverage.jsonl\n\n"
                    "    vocabdrift synth ./base -o fill.jsonl --run runs/sft1\n\n"
                    "    vocabdrift synth ./base -o cov.jsonl --min-per-token 3 --format sharegpt")
def synth(
    model: Annotated[str, typer.Argument(help="Model folder, tokenizer.json, .gguf or hub id.")],
    out: Annotated[Path, typer.Option("-o", "--out", callback=_gate_file,
                                      help="The JSONL file to write (NAME.stats.json goes "
                                           "beside it).")],
    min_per_token: Annotated[int, typer.Option(help="Verified occurrences of each token as a target.")] = 2,
    tokens_per_sample: Annotated[int, typer.Option(help="Tokens per conversation.")] = 8,
    run: Annotated[Path | None, typer.Option("--run", callback=_gate_run,
                                             help="A run folder holding a coverage count: cover only the "
                                                  "tokens it found below its floor, up to the floor.")]
    = None,
    format: Annotated[str, typer.Option(help="messages, sharegpt, alpaca or prompt-completion.")] = "messages",
    seed: Annotated[int, typer.Option(help="Seed for phrasings and order.")] = 0,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Write the full-vocabulary coverage set: "repeat this word" tasks making every reachable token a target.

    Every answer is re-tokenized: each target id must come back as that id. Tokens that cannot be placed are
    listed in NAME.stats.json with the reason.
    """
    from .analyses.vocab import token_label
    from .api.coverage import synth as run_synth

    r = run_synth(model, out=out, min_per_token=min_per_token, tokens_per_sample=tokens_per_sample,
                  run=run, format=format, seed=seed,
                  progress=sys.stderr.isatty() and not (quiet or as_json))
    st = r.stats
    if as_json:
        _echo_json({"path": r.path, "stats_path": r.stats_path, "samples": st["samples"], "targets": st["targets"],
                    "covered": st["covered"], "occurrences": st["occurrences"],
                    "unreachable": st["unreachable"]["count"], "special": st["special"],
                    "skipped": [{"token_id": sk["token_id"], "text": sk["text"], "reason": sk["reason"]}
                                for sk in st["skipped"]]})
        return
    if quiet:
        return
    _echo(f"covered {st['covered']:,} of {st['targets']:,} tokens (min {st['occurrences']['min']} occurrences) "
          f"in {st['samples']:,} samples; {st['unreachable']['count']:,} unreachable and {st['special']:,} special "
          "tokens not targeted")
    for sk in st["skipped"][:10]:
        typer.echo(f"  skipped {token_label(sk['text'], sk['token_id'])}: {sk['reason']}", err=True)
    if len(st["skipped"]) > 10:
        typer.echo(f"  ... {len(st['skipped']) - 10} more skipped, see {r.stats_path}", err=True)
    _echo(f"wrote {r.path} and {r.stats_path}")


@app.command(epilog="Examples:\n\n    vocabdrift mix sft.jsonl coverage.jsonl -o mixed.jsonl --ratio 0.05\n\n"
                    "    vocabdrift mix sft/ more.parquet fill.jsonl -o mixed.jsonl --count 20000 --seed 1")
def mix(
    inputs: Annotated[list[str], typer.Argument(help="SFT... SYNTH: the SFT files or folders, then the synthetic "
                                                     "set (last).")],
    out: Annotated[Path, typer.Option("-o", "--out", callback=_gate_file, help="The mixed JSONL file to write.")],
    ratio: Annotated[float | None, typer.Option(help="Synthetic share of the result (0.05 = 5%); default: SYNTH "
                                                     "whole, once (the recommended set of `synth --run RUN`).")]
    = None,
    count: Annotated[int | None, typer.Option(help="Number of synthetic records instead of a ratio.")] = None,
    seed: Annotated[int, typer.Option(help="Shuffle seed (same seed, same output).")] = 0,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first malformed SFT record.")] = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Mix the synthetic set into SFT data: a deterministic, seeded shuffle that streams through disk."""
    from .api.coverage import mix as run_mix

    if len(inputs) < 2:
        raise VocabdriftError("give at least one SFT input and the synthetic set: vocabdrift mix SFT... SYNTH -o OUT")
    r = run_mix(inputs[:-1], inputs[-1], out=out, ratio=ratio, count=count, seed=seed, strict=strict)
    if as_json:
        _echo_json({"path": r.path, "sft": r.sft, "synth": r.synth, "malformed": r.n_malformed,
                    "malformed_first": [{"source": m.source, "reason": m.reason} for m in r.malformed[:5]]})
        return
    if r.n_malformed:  # each skipped record named (the first five here), none copied into the mix
        shown = "; ".join(f"{m.source}: {m.reason}" for m in r.malformed[:5])
        typer.echo(f"{r.n_malformed} malformed SFT records skipped (not copied): {shown}"
                   f"{' ...' if r.n_malformed > 5 else ''}", err=True)
    if quiet:
        return
    _echo(f"wrote {r.path}: {r.sft:,} SFT + {r.synth:,} synthetic records "
          f"({r.synth / max(1, r.sft + r.synth):.1%} synthetic)")


@app.command("prune-suggest",
             epilog="Examples:\n\n    vocabdrift prune-suggest --run runs/sft1\n\n"
                    "    vocabdrift prune-suggest --run runs/sft1 --threshold 0.9 --csv prune.csv")
def prune_suggest(
    run: Annotated[Path, typer.Option("--run", callback=_gate_run,
                                      help="A run folder holding drift.parquet (diff) and coverage.parquet "
                                           "(coverage).")],
    floor: Annotated[int | None, typer.Option(help="Count below which a token is rare (default: the coverage "
                                                   "run's floor).")] = None,
    threshold: Annotated[float, typer.Option(help="lm_head cosine below which a token counts as drifted.")] = 0.95,
    top: Annotated[int, typer.Option(help="How many candidates to print.")] = TOP,
    csv: Annotated[Path | None, typer.Option(callback=_gate_file,
                                             help="Also write the full candidate list to this CSV file.")] = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Suggest tokens to prune from the next tokenizer: rare in the downstream data and drifted. Reports only."""
    from rich.console import Console

    from .api.coverage import prune_suggest as run_prune
    from .outputs.console import prune_candidates_table, prune_categories_table

    r = run_prune(run, floor=floor, threshold=threshold, csv=csv)
    if as_json or quiet:
        if as_json:
            _echo_json({"floor": r.floor, "threshold": r.threshold, "categories": r.categories,
                        "common_words_kept": r.common_words_kept, "candidates": r.table.to_pylist()})
        return
    con = Console()
    con.print(prune_categories_table(r.categories, floor=r.floor, threshold=r.threshold))
    if r.common_words_kept:
        con.print(f"{r.common_words_kept:,} rare, drifted tokens are common words of ordinary text and are not "
                  "proposed" + ("" if r.word_list else " (wordfreq is not installed: every word-like token was "
                                "kept; `pip install wordfreq` for a finer list)"), highlight=False)
    if r.table.num_rows:
        con.print(prune_candidates_table(r.table, top=top))
    if csv is not None:
        _echo(f"wrote {csv}")


# ---- prove it with the model: probe, cases, undertrained, confusion ----------------------------------------

@app.command(epilog="Examples:\n\n    vocabdrift probe ./sft --base ./base --run runs/sft1 --drifted 500\n\n"
                    "    vocabdrift probe ./sft --token 嘉祺 --token 地税 --token 12345 -o runs/p\n\n"
                    "    vocabdrift probe ./sft --base ./base --tokens-file names.txt --run runs/sft1 --json\n\n"
                    "    vocabdrift probe SmolLM2-135M-Instruct.Q4_1.gguf --all-tokens -o runs/smol --batch-size 128")
def probe(
    model: Annotated[str, typer.Argument(help="The (post-trained) model: folder, .gguf or hub id.")],
    out: Annotated[Path | None, typer.Option("-o", "--out", callback=_gate_out,
                                             help="Run folder to write (default: --run).")] = None,
    base: Annotated[str | None, typer.Option(help="Also probe BASE and list LOST tokens (sayable in BASE, "
                                                  "not in MODEL).")] = None,
    token: Annotated[list[str] | None, typer.Option("--token", help="A token to probe; repeatable. "
                                                                    + TOKEN_RULE)] = None,
    run: Annotated[Path | None, typer.Option("--run", callback=_gate_run,
                                             help="A diff's run folder: probe its most drifted tokens "
                                                  "(unless --token or --all-tokens), draw the control "
                                                  "tokens from it, and write the probe into it (unless "
                                                  "-o).")] = None,
    drifted: Annotated[int, typer.Option(help="How many of RUN's most drifted tokens to probe.")] = 200,
    all_tokens: Annotated[bool, typer.Option("--all-tokens", help="Probe every non-special token.")] = False,
    template: Annotated[list[str] | None, typer.Option("--template", help="Prompt family (repeat_en, quoted_en, "
                                                       "repeat_zh, repeat_ja, fewshot_en, fewshot_zh); "
                                                       "repeatable. Default: chat families, or few-shot for "
                                                       "a model without a chat template.")] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus for 'sayable': kept by top-p sampling at this p "
                                              "(0: greedy, the first choice only).")] = 0.95,
    endpoint: Annotated[str | None, typer.Option(help="Probe MODEL through an OpenAI-compatible server that "
                                                      "returns logprobs (vLLM, SGLang, llama.cpp).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="The tokenizer (needed with --endpoint).")] = None,
    engine: Annotated[str, typer.Option(help="hf (local transformers) or vllm (in-process).")] = "hf",
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 64,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: best present).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model's own code.")
                                 ] = False,
    allow_pickle: AllowPickle = False,
    tokens_file: Annotated[Path | None, typer.Option("--tokens-file", help="A file of tokens to probe, one a line "
                                                     "(blank lines and # comments skipped); with --tokens, "
                                                     "both.")] = None,
    control: Annotated[int, typer.Option(help="With --base: also probe this many undrifted control tokens, "
                                              "drawn (seeded) from the most stable rows of RUN's diff, to "
                                              "compare against (0: none).")] = 40,
    force: Annotated[bool, typer.Option("--force", help="Replace the probe RUN holds even when this one is "
                                                        "narrower or made another way.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary[\"probe\"] (and per-token rows) as JSON "
                                                         "alone on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print no tables, only errors.")] = False,
) -> None:
    """Ask the model to say each token ("Repeat this word three times: X"); write RUN/probe.parquet.

    Records the token's probability and rank as the first answer token and whether top-p 0.95 keeps it. With
    --base the headline is the change BASE -> POST in top-1 answers (the model's first choice is the token) and
    in the token's probability, beside the same figures for undrifted control tokens: a fall on the probed
    tokens far beyond the control's is the drift's effect. Resumable: rerun the same command after an
    interruption and it continues where it stopped; a rerun of a finished probe says so and recomputes nothing.
    """
    from rich.console import Console

    from .analyses.probe import headline_lines, per_token
    from .api.probe import probe as run_probe
    from .outputs.console import probe_headline_table, probe_outcomes_table, probe_tokens_table

    r = run_probe(model, out=out, tokens=token or None, base=base, run=run, drifted=drifted,
                  all_tokens=all_tokens, templates=template or None, top_p=top_p, endpoint=endpoint,
                  tokenizer=tokenizer, engine=engine, batch_size=batch_size, device=device,
                  trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                  progress=cli_mode(quiet=as_json or quiet), tokens_file=tokens_file,
                  control=control, force=force)
    s = r.summary
    asked = token or tokens_file
    rows: list[dict] = []
    loaded: list[Any] = []

    def text_of(i: int) -> str:  # the tokenizer only when a token is shown ("" for an endpoint without one)
        if not loaded:
            from .sources.tokenizer import load_tokenizer

            loaded.append(load_tokenizer(tokenizer or model, trust_remote_code=trust_remote_code)
                          if not endpoint or tokenizer else None)
        return loaded[0].decode([i]) if loaded[0] is not None else ""

    if asked:
        import pyarrow.compute as pc

        tab = r.table.filter(pc.invert(r.table["control"])) if "control" in r.table.column_names else r.table
        rows = per_token(tab, tab["token_id"].unique().to_pylist())
        for row in rows:
            row["text"] = text_of(row["token_id"])
    if as_json or quiet:
        if as_json:  # the LOST tokens with their texts too, not bare ids
            named = {f"{k}_tokens": [{"token_id": int(i), "text": text_of(int(i))} for i in s[k]]
                     for k in ("lost", "control_lost") if s.get(k)}
            _echo_json({**s, **named, **({"per_token": rows} if asked else {})})
        return
    con = Console()
    for line in headline_lines(s.get("headline") or {}):
        con.print(line, highlight=False)
    if s.get("headline"):
        con.print(probe_headline_table(s["headline"]))
    if rows:
        con.print(probe_tokens_table(rows))
    con.print(probe_outcomes_table(s, top_p=top_p))
    if base is not None:
        ctrl = (f"; of {s['controls']:,} undrifted control tokens, {len(s['control_lost']):,}"
                if s.get("controls") else "")
        con.print(f"LOST (sayable in base, not in post): {len(s['lost']):,} tokens{ctrl}", highlight=False)
        if s.get("template_failures"):
            con.print(f"Template failure in POST (every token, controls included, collapsed; left out of LOST): "
                      f"{', '.join(s['template_failures'])}", highlight=False)
        if s["lost"]:
            from .analyses.vocab import token_label

            con.print("  " + ", ".join(token_label(text_of(i), i) for i in s["lost"][:30]),
                      highlight=False)  # tokens shown as everywhere else: ␣ for a space, the id beside
    _echo(f"wrote {r.path}/probe.parquet")


@app.command(epilog="Examples:\n\n    vocabdrift saymap ./sft --base ./base --run runs/sft1\n\n"
                    "    vocabdrift saymap ./sft --base ./base -o runs/map --tokens-file names.txt\n\n"
                    "    vocabdrift check --run runs/sft1 --max-lost 1% --max-lost japanese:2%")
def saymap(
    model: Annotated[str, typer.Argument(help="The (post-trained) model: folder, .gguf or hub id.")],
    base: Annotated[str | None, typer.Option(help="The pre-trained model: map it too, and name LOST (sayable in "
                                                  "BASE, not in MODEL), GAINED and never-sayable tokens.")] = None,
    run: Annotated[Path | None, typer.Option("--run", callback=_gate_run,
                                             help="An existing run folder (a diff's): the map is written "
                                                  "into it and joined with its drift, coverage and "
                                                  "collapsed rows.")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", callback=_gate_out,
                                             help="Run folder to write (default: --run).")] = None,
    token: Annotated[list[str] | None, typer.Option("--token", help="Map only this token; repeatable (default: "
                                                                    "every non-special token). " + TOKEN_RULE)]
    = None,
    tokens_file: Annotated[Path | None, typer.Option("--tokens-file", help="Map only the tokens of this file, one "
                                                     "a line.")] = None,
    template: Annotated[list[str] | None, typer.Option("--template", help="Prompt family, as probe's, asked of "
                                                       "both models; repeatable. Default: chat families, or "
                                                       "few-shot for a model without a chat template.")] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus for 'sayable': kept by top-p sampling at this p.")] = 0.95,
    fast: Annotated[str, typer.Option(help="The fast pass that settles verdicts far from the cut: auto "
                                           "(bfloat16 on a CPU that runs it natively), bfloat16, or none (the "
                                           "exact pass only).")] = "auto",
    endpoint: Annotated[str | None, typer.Option(help="Ask MODEL through an OpenAI-compatible server that returns "
                                                      "logprobs (exact pass only).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="The tokenizer (needed with --endpoint).")] = None,
    engine: Annotated[str, typer.Option(help="hf (local transformers) or vllm (in-process; exact pass only).")]
    = "hf",
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 256,
    sample: Annotated[int, typer.Option(help="Tokens per model (seeded) that choose its template order and "
                                             "measure the fast pass's margin.")] = 128,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: best present).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model's own code.")
                                 ] = False,
    allow_pickle: AllowPickle = False,
    force: Annotated[bool, typer.Option("--force", help="Map again even when RUN holds this very map.")] = False,
    top: Annotated[int, typer.Option(help="LOST tokens to list.")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary[\"saymap\"] (LOST tokens with their texts) "
                                                         "as JSON alone on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print no tables, only errors.")] = False,
) -> None:
    """Map which tokens of the whole vocabulary MODEL (and BASE) can say; write RUN/saymap.parquet.

    A token is sayable when some probe template gets it kept by top-p sampling, as in `probe`; the map asks
    each token only what decides that: templates in the order that settles most tokens per unit of work,
    a stop at the first template that keeps the token, and a fast bfloat16 pass whose verdicts are taken only
    far from the top-p cut (the rest are asked again exactly). With --base: LOST, GAINED and never-sayable
    tokens per category, and how LOST relates to drift, coverage and collapsed rows. `check --max-lost` gates
    on it; `report` draws it. Resumable: rerun the same command after an interruption.
    """
    from rich.console import Console

    from .analyses.saymap import headline
    from .analyses.vocab import token_label
    from .api.saymap import saymap as run_saymap
    from .outputs.console import saymap_relations_table, saymap_table

    r = run_saymap(model, base=base, run=run, out=out, tokens=token or None, tokens_file=tokens_file,
                   templates=template or None, base_templates=template or None, top_p=top_p, fast=fast,
                   endpoint=endpoint, tokenizer=tokenizer,
                   engine=engine, batch_size=batch_size, sample=sample, device=device,
                   trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                   progress=cli_mode(quiet=as_json or quiet), force=force)
    s = r.summary
    texts = {}
    ids = s.get("lost", [])[: max(top, 0)] if not as_json else s.get("lost", [])
    if ids:
        from .sources.vocabulary import vocab_table

        v = vocab_table(tokenizer or model, trust_remote_code=trust_remote_code)
        all_text = v["text"].to_pylist()
        texts = {i: all_text[i] if i < len(all_text) else "" for i in ids}
    if as_json or quiet:
        if as_json:
            _echo_json({**s, "lost_tokens": [{"token_id": i, "text": texts.get(i, "")} for i in s.get("lost", [])]})
        return
    con = Console()
    for line in headline(s):
        con.print(line, highlight=False)
    con.print(saymap_table(s))
    if s.get("relations"):
        con.print(saymap_relations_table(s["relations"]))
    if ids:
        con.print("LOST, the most confident first: " + ", ".join(token_label(texts.get(i, ""), i) for i in ids),
                  highlight=False)
    asked = ", ".join(f"{m} {s['asked'][m] / max(s['tokens'], 1):.2f}" for m in s["asked"])
    con.print(f"Templates asked per token: {asked}; verdicts asked again exactly (near the cut): "
              + ", ".join(f"{m} {s['exact'][m]:,}" for m in s["exact"]), highlight=False, style="dim")
    _echo(f"wrote {r.path}/saymap.parquet")


@app.command(epilog="Examples:\n\n    vocabdrift cases ./sft                      # the published cases\n\n"
                    "    vocabdrift cases ./sft my_cases.jsonl -o runs/sft1\n\n"
                    "    vocabdrift cases my-model my_cases.jsonl --endpoint http://127.0.0.1:8000\n\n"
                    "A case is one JSON line: {\"prompt\": ..., \"expected\": ..., \"forbidden\": [...]}.")
def cases(
    model: Annotated[str, typer.Argument(help="Model folder, .gguf, hub id (or the served name with --endpoint).")],
    cases_file: Annotated[Path | None, typer.Argument(help="Cases JSONL (default: the published cases).")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", callback=_gate_out,
                                             help="Also write RUN/cases.json.")] = None,
    run: Annotated[Path | None, typer.Option("--run", callback=_gate_run,
                                             help="Also write cases.json into this existing run "
                                                  "folder.")] = None,
    endpoint: Annotated[str | None, typer.Option(help="An OpenAI-compatible server to ask instead.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 64,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: best present).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    allow_pickle: AllowPickle = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Run user-written cases greedily and print a pass/fail table. Exit 1 when any case fails."""
    from rich.console import Console

    from .api.probe import cases as run_cases
    from .outputs.console import cases_table

    r = run_cases(model, cases_file, out=out, run=run, endpoint=endpoint, max_tokens=max_tokens, device=device,
                  trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                  progress=cli_mode(quiet=as_json or quiet))
    if as_json:
        _echo_json(r.to_json())
    elif not quiet:
        Console().print(cases_table(r.model, r.cases, passed=r.passed, total=r.total))
        if (out or run) is not None:
            _echo(f"wrote {run or out}/cases.json")
    if r.passed < r.total:
        raise typer.Exit(1)


@app.command(epilog="Examples:\n\n    vocabdrift undertrained ./base -o runs/base\n\n"
                    "    vocabdrift undertrained ./sft --token 嘉祺 --no-verify -o runs/sft1")
def undertrained(
    model: Annotated[str, typer.Argument(help="Model folder or .gguf (the matrices are read; the model is loaded "
                                              "only to verify).")],
    out: OutOpt = None,
    run: RunIn = None,
    token: Annotated[list[str] | None, typer.Option("--token", help="Answer 'was this token trained at all?': "
                                                    "its embedding-norm percentile; repeatable. " + TOKEN_RULE)]
    = None,
    share: Annotated[float, typer.Option(help="Share of the vocabulary to verify (most suspicious first).")] = 0.02,
    unused: Annotated[list[str] | None, typer.Option("--unused", help="A token known to be unused, added to the "
                                                     "reference rows (reserved names, GGUF UNUSED, padding); "
                                                     "repeatable. " + TOKEN_RULE)] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Probe the candidates (verified when the "
                                                                      "best p < 0.01).")] = True,
    collapse: Annotated[bool, typer.Option("--collapse/--no-collapse", help="Find groups of near-identical rows "
                                                                          "(tokens that cannot be told apart).")]
    = True,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: best present).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    allow_pickle: AllowPickle = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Magikarp-style indicators of under-trained tokens; writes RUN/undertrained.parquet."""
    from rich.console import Console

    from .api.probe import undertrained as run_ut
    from .outputs.console import undertrained_tokens_table
    from .outputs.run import run_target

    run_target(out, run)  # one of the two is needed here (the Python API may write nothing)
    r = run_ut(model, out=out, run=run, tokens=token or (), share=share, unused=unused or (), verify=verify,
               collapse=collapse, device=device,
               trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=cli_mode())
    s = r.summary
    if as_json or quiet:  # --json: summary["undertrained"] alone on stdout
        if as_json:
            _echo_json(s)
        return
    con = Console()
    con.print(f"{s['candidates']:,} candidates ({share * 100:g}% most suspicious); {s['verified']:,} of "
              f"{s['probed']:,} probed verified under-trained; reference rows: {s['reference']}")
    if s.get("collapse"):
        from .outputs.console import collapse_line

        con.print(collapse_line(s["collapse"]))
    if s["tokens"]:
        con.print(undertrained_tokens_table(s["tokens"]))
    _echo(f"wrote {run or out}/undertrained.parquet")


@app.command(epilog="Examples:\n\n    vocabdrift confusion ./sft --prompt 富士山とは？ --language ja -n 100\n\n"
                    "    vocabdrift confusion ./sft --base ./base -o runs/sft1      # the published prompts\n\n"
                    "    vocabdrift confusion my-model --endpoint http://127.0.0.1:8000 --prompts p.jsonl")
def confusion(
    model: Annotated[str, typer.Argument(help="Model folder, .gguf, hub id (or the served name with --endpoint).")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt; repeatable (needs "
                                                                      "--language).")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="JSONL of {prompt, language} (default: the "
                                                                   "published prompts).")] = None,
    language: Annotated[str | None, typer.Option(help="The prompts' language: ja, ko, zh, ru, en ...")] = None,
    n: Annotated[int, typer.Option("-n", help="Samples per prompt.")] = 100,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Sampling top-p.")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed (same seed, same samples).")] = 0,
    base: Annotated[str | None, typer.Option(help="Also sample BASE and test the difference (Fisher).")] = None,
    endpoint: Annotated[str | None, typer.Option(help="Ask MODEL through an OpenAI-compatible server.")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", callback=_gate_out,
                                             help="Also write RUN/confusion.json and every "
                                                  "sampled answer to RUN/confusion.jsonl.")] = None,
    run: Annotated[Path | None, typer.Option("--run", callback=_gate_run,
                                             help="Also write confusion.json into this existing run "
                                                  "folder.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: best present).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    allow_pickle: AllowPickle = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Sample answers and count those with letters of a script foreign to the language (Wilson 95% interval)."""
    from rich.console import Console

    from .api.probe import confusion as run_confusion
    from .outputs.console import confusion_table

    if prompt and prompts:
        raise VocabdriftError("give --prompt or --prompts, not both")
    doc = run_confusion(model, prompts=prompt or prompts, language=language, n=n, temperature=temperature,
                        top_p=top_p, max_tokens=max_tokens, seed=seed, base=base, endpoint=endpoint, out=out, run=run,
                        device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                        progress=cli_mode(quiet=as_json or quiet))
    if as_json or quiet:
        if as_json:
            _echo_json(doc)
        return
    con = Console()
    con.print(confusion_table(doc["results"]))
    for x in doc["tests"]:
        con.print(f"Fisher exact test, {x['prompt'][:30]!r}: odds ratio {x['odds_ratio']:.3g}, "
                  f"p = {x['p_value']:.3g}")
    if (out or run) is not None:
        _echo(f"wrote {run or out}/confusion.json and confusion.jsonl")


# ---- the report -----------------------------------------------------------------------------------------------

@app.command(epilog="Examples:\n\n    vocabdrift report --run runs/sft1\n\n"
                    "    vocabdrift report --run runs/sft1 --token 嘉祺 --token 12345 --top 100\n\n"
                    "    vocabdrift report --run runs/sft1 --compare runs/fixed --names baseline,repaired")
def report(
    run: Annotated[Path, typer.Option("--run", callback=_gate_run,
                                      help="The run folder (from `diff`, with any of coverage, probe, cases, "
                                           "confusion); the report is written into it.")],
    compare: Annotated[Path | None, typer.Option("--compare", callback=_gate_run,
                                                 help="A second run folder to put side by side with "
                                                      "RUN (written beside RUN's own report).")] = None,
    names: Annotated[str | None, typer.Option(help="Names of RUN and RUN_B in the comparison, e.g. "
                                                   "baseline,repaired (default: the folder names).")] = None,
    token: Annotated[list[str] | None, typer.Option("--token", help="Mark this token and show its neighbours; "
                                                                    "repeatable. " + TOKEN_RULE)] = None,
    top: Annotated[int, typer.Option(help="Rows in the report's tables of most drifted and lost tokens (a "
                                          "document's tables: more than the console's 20).")] = 50,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Write RUN/report.html (self-contained, interactive) and RUN/report.md (with PNG plots in
    RUN/report_files/), read from the run folder alone.
    """
    from .outputs.report import report as run_report

    html_path, md_path = run_report(run, compare=compare, names=names, tokens=token or (), top=top)
    if as_json:
        _echo_json({"html": str(html_path), "md": str(md_path)})
    elif not quiet:
        _echo(f"wrote {html_path} and {md_path}")


# ---- the lab ---------------------------------------------------------------------------------------------------

@app.command(epilog="Examples:\n\n    vocabdrift lab -o runs/lab\n\n    vocabdrift lab -o runs/lab-quick --quick\n\n"
                    "    vocabdrift report --run runs/lab/baseline --compare runs/lab/repaired --names "
                    "baseline,repaired")
def lab(
    out: Annotated[Path, typer.Option("-o", "--out", callback=_gate_lab,
                                      help="The lab folder to write (created; a rerun resumes it).")],
    quick: Annotated[bool, typer.Option("--quick", help="The same models, fewer probes, no remedies (for tests; "
                                                        "60-85 s on 2 cores).")] = False,
    large: Annotated[bool, typer.Option("--large", help="A 4,096-token, 3-layer model (about 11 minutes on 2 "
                                                        "cores; the planted name does not reproduce at seed 0).")]
    = False,
    seed: Annotated[int | None, typer.Option(help="Seed of the corpus, the initialisation and the data order "
                                                   "(default: the recipe's: 5, or 0 with --large).")] = None,
    remedies: Annotated[bool | None, typer.Option(
        "--remedies/--no-remedies", help="Also train +replay, +anchor, +gate and +coverage5 (the coverage set at "
        "5% of the samples) with `repair` and compare the six ways in OUT/remedies.md. Default: on, off with "
        "--quick.")] = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Reproduce the whole investigation offline on a CPU: pre-train a tiny Llama, SFT it with and without the
    coverage set, and measure, probe and compare both; then the training-side remedies beside them.

    Each stage is cached in OUT, so a rerun resumes. OUT/models holds the Hugging Face checkpoints, OUT/baseline
    and OUT/repaired are normal run folders (OUT/remedies/* too), OUT/lab.md and OUT/remedies.md the measured
    tables.
    """
    from .composites.lab import LARGE
    from .composites.lab import lab as run_lab

    if quick and large:
        raise VocabdriftError("--quick and --large exclude each other; pick one")
    from .outputs.run import comparison_files

    t0 = time.perf_counter()
    r = run_lab(out, quick=quick, seed=seed, remedies=remedies, recipe=LARGE if large else None,
                progress=cli_mode(quiet=quiet or as_json))
    page = r.runs["baseline"] / comparison_files("baseline", "repaired")[0]
    if as_json:
        _echo_json({"out": r.out, "verdict": r.verdict, "report": page if page.exists() else None,
                    "table": r.out / "lab.md", "runs": r.runs, "models": r.models, "results": r.results,
                    "remedies": r.remedies, "timings": r.timings})
        return
    if quiet:
        return
    _echo(r.table)
    if r.remedies_table:
        _echo(r.remedies_table)
    _echo(f"wrote {r.out}/ (models/, baseline/, repaired/, lab.json, lab.md"
          f"{', remedies/, remedies.md' if r.remedies_table else ''}) in {time.perf_counter() - t0:.0f} s "
          f"({sum(r.timings.values()):.0f} s of stages over all runs of this folder)")
    _echo(("\nVerdict:\n" + "".join(f"  {x}\n" for x in r.verdict) if r.verdict else "\n")
          + (f"Report: {page} (and its .md); the measured table: {r.out / 'lab.md'}" if page.exists()
             else f"The measured table: {r.out / 'lab.md'}"))


# Exit codes: 0 success (check: pass), 1 check failed (drift found) or cases failed, 2 bad input, 70 a bug in
# vocabdrift (EX_SOFTWARE), 130 interrupted (Ctrl-C), 141 the reader of stdout went away (`| head`), 143 terminated
# (SIGTERM).
EXIT_BAD_INPUT = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell shows for `cat` in the same place
EXIT_BUG = 70
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
_terminated = False
# The environment, not the input, is wrong: no space, no permission, a read-only file system. The user fixes those.
_ENVIRONMENT_ERRNOS = {"ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EMFILE", "ENFILE"}


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM is handled like Ctrl-C: the exception unwinds through every `finally`, so partial run folders,
    temporary files and the vocabulary child process are removed before the exit (143)."""
    global _terminated
    if os.getpid() != _MAIN_PID[0]:  # a forked worker inherited this handler: die as it would have
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if _terminated:  # a second SIGTERM during the clean-up: let the clean-up finish
        return
    _terminated = True
    raise KeyboardInterrupt


_MAIN_PID = [0]


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _bug(e: BaseException) -> None:
    """An exception vocabdrift did not expect is a bug: its own exit code (70, never 1, which `check` uses for
    "drift found"), one line, and the traceback on request."""
    import traceback

    if os.environ.get("VOCABDRIFT_DEBUG", "").strip() not in ("", "0"):
        traceback.print_exception(e)
        typer.echo(f"vocabdrift: internal error (a bug in vocabdrift): {type(e).__name__}", err=True)
    else:
        typer.echo(f"vocabdrift: internal error (a bug in vocabdrift): {type(e).__name__}: "
                   f"{_one_line(str(e))[:300]}; rerun with VOCABDRIFT_DEBUG=1 for the traceback and report it",
                   err=True)
    sys.exit(EXIT_BUG)


def _stdout_to_devnull() -> None:
    """After a broken pipe: the interpreter's last flush of stdout must not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _broken_pipe(self: object) -> None:
    """stdout's reader went away (`vocabdrift check ... | head`): rich would exit with 1, which `check` uses for
    "drift found". Unwind as an exception instead (every `finally` cleans up) and end with EXIT_BROKEN_PIPE."""
    _stdout_to_devnull()
    raise BrokenPipeError


def _refuse_empty_locations(argv: list[str]) -> None:
    """Before parsing: `-o ""` would reach us as Path("") == "." (the current folder), so an empty location is
    refused; and a number no count, size or id here can be (2**63 overflows numpy deep inside a command)."""
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
        digits = value.lstrip("+-")
        if digits.isdigit() and digits.isascii() and (len(digits) > 16 or int(digits) >= 2 ** 53):
            where = a.split("=", 1)[0] if "=" in a else argv[i - 1] if i and argv[i - 1].startswith("-") else "a value"
            raise VocabdriftError(f"{where} {value[:24]}{'…' if len(value) > 24 else ''}: a number too large for any "
                                  "count, size or id vocabdrift takes; give a smaller one")
        flag = a[:-1] if a.endswith("=") else argv[i - 1] if a == "" and i else None
        if flag in ("-o", "--out", "--run"):
            raise VocabdriftError(f"{flag} is empty; name the {'run folder' if flag == '--run' else 'output'} "
                                  "to use")


def main() -> None:
    """Entry point and the one error boundary: a VocabdriftError (bad input) becomes one line and exit code 2,
    a missing optional package one line naming the extra that installs it and 2, a full disk or a missing
    permission one line and 2, Ctrl-C 130 and SIGTERM 143 after cleaning up, and
    anything else one line saying it is a bug, exit code 70 (VOCABDRIFT_DEBUG=1 prints the traceback)."""
    import errno
    import signal

    for stream in (sys.stdout, sys.stderr):  # PYTHONIOENCODING=ascii or a C locale: a token that cannot be
        reconfigure = getattr(stream, "reconfigure", None)  # printed shows as \u escapes, never a crash
        if reconfigure is not None and (getattr(stream, "encoding", "") or "").lower().replace("-", "") != "utf8":
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not sys.stderr.isatty():  # a log file or CI: our bars are off there, and so are the libraries' own
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers reads it when imported
    if not sys.stdout.isatty():  # a pipe or a log: tables 120 columns wide (rich's 80 would wrap "latin
        os.environ.setdefault("COLUMNS", "120")  # (English/Latin)" and the numbers); COLUMNS set by the user wins
    from .outputs.console import quiet_third_party

    quiet_third_party(terminal=sys.stderr.isatty())  # before any library is imported: tqdm reads it then
    import rich.console

    rich.console.Console.on_broken_pipe = _broken_pipe  # type: ignore[method-assign] # ours and typer's tables
    _MAIN_PID[0] = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)
    # typer parses with its own copy of click; its exception classes are reached through the public BadParameter
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        _refuse_empty_locations(sys.argv[1:])
        rv = app(standalone_mode=False)  # usage errors come back here, to be one line like every other error
    except usage_error as e:  # a bad option value, a missing argument, an unknown command
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # `vocabdrift` alone, or a command without its arguments
            typer.echo(ctx.get_help() if ctx is not None else e.format_message())
            sys.exit(EXIT_BAD_INPUT)
        where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        typer.echo(f"vocabdrift: error: {_one_line(e.format_message()).rstrip('.')}{where}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except click_exception as e:  # a file option click could not open, and the like
        typer.echo(f"vocabdrift: error: {_one_line(e.format_message())}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except typer.Abort:  # an interrupted prompt
        typer.echo("vocabdrift: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except VocabdriftError as e:
        typer.echo(f"vocabdrift: error: {_one_line(str(e))}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        typer.echo("vocabdrift: terminated" if _terminated else "vocabdrift: interrupted", err=True)
        sys.exit(EXIT_TERMINATED if _terminated else EXIT_INTERRUPTED)
    except SystemExit as e:
        if e.code == EXIT_INTERRUPTED:  # typer turns Ctrl-C (and our SIGTERM) into a silent exit 130 itself
            typer.echo("vocabdrift: terminated" if _terminated else "vocabdrift: interrupted", err=True)
            sys.exit(EXIT_TERMINATED if _terminated else EXIT_INTERRUPTED)
        raise
    except BrokenPipeError:
        _stdout_to_devnull()
        sys.exit(EXIT_BROKEN_PIPE)
    except MemoryError:
        typer.echo("vocabdrift: error: out of memory; free memory, or give smaller inputs", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as e:
        if errno.errorcode.get(e.errno or -1) == "ENAMETOOLONG":  # a path given on the command line: bad input
            typer.echo(f"vocabdrift: error: {e.filename or 'a path'}: a name in it is too long for the file system; "
                       "give a shorter path", err=True)
            sys.exit(EXIT_BAD_INPUT)
        if errno.errorcode.get(e.errno or -1) in _ENVIRONMENT_ERRNOS:
            where = f"{e.filename}: " if e.filename else ""
            typer.echo(f"vocabdrift: error: {where}{e.strerror or e}; free space or fix the permissions, or pick "
                       "another location", err=True)
            sys.exit(EXIT_BAD_INPUT)
        _bug(e)
    except ModuleNotFoundError as e:  # an optional package imported without `need_extra`: one line and 2 too
        extra = EXTRA_OF.get((e.name or "").partition(".")[0])
        if extra is None:
            _bug(e)
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        line = missing_extra(f"`vocabdrift {command}`", extra, f"{e.name} is not installed")
        typer.echo(f"vocabdrift: error: {line}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except Exception as e:
        _bug(e)
    if rv == EXIT_INTERRUPTED:  # typer turns Ctrl-C (and our SIGTERM) into exit code 130 itself
        typer.echo("vocabdrift: terminated" if _terminated else "vocabdrift: interrupted", err=True)
        sys.exit(EXIT_TERMINATED if _terminated else EXIT_INTERRUPTED)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
