"""Data sets, read-only and streamed: JSONL, JSON, Parquet, folders of them, and saved Hugging Face data sets.

Records come out one at a time (Parquet and saved data sets a batch at a time underneath), so memory does not
grow with the data set. Each record is normalised to a `Sample`: a conversation (`messages`, or ShareGPT
`conversations` with `from`/`value`, or Alpaca `instruction`/`input`/`output`), a `prompt`/`completion` pair,
or plain `text`. A line that is not JSON or
has none of these shapes is a `Malformed` entry naming its file and line; `strict=True` stops at the first one.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any, Literal

from ..errors import VocabdriftError, need_extra

log = logging.getLogger(__name__)

Shape = Literal["messages", "conversations", "prompt_completion", "alpaca", "text"]
SHAPES: tuple[str, ...] = ("messages", "conversations", "prompt_completion", "alpaca", "text")
_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".ndjson")
# ShareGPT speaker names -> chat roles
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                   "system": "system", "tool": "tool", "function": "tool", "function_call": "assistant",
                   "observation": "tool"}
_BATCH = 1024
# The largest record read (bytes of one JSON line, or of one JSON-array element as text): larger ones are skipped
# and counted as malformed, each with its size. Why: tokenizing with offsets costs ~180 bytes of memory per byte of
# text, so one 50 MB line took 8.9 GB. 4 MiB is about a million tokens, far above any chat sample.
MAX_RECORD_BYTES = 4 << 20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Sample:
    """One training example, normalised.

    Exactly one of the shapes is filled: `messages` (a list of {"role", "content"} dicts with string content),
    or `prompt` + `completion` (strings), or `text`.
    """

    source: str  # "file:line" (or "file:#row" for Parquet and saved data sets)
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class Malformed:
    source: str  # "file:line"
    reason: str


@dataclass
class DataReader:
    """Streams `Sample`s from files, folders and saved data sets, collecting malformed records as it goes.

    Example:
        >>> r = DataReader(["sft.jsonl", "more/"])
        >>> for s in r: ...
        >>> r.malformed[:3]
    """

    paths: list[str | os.PathLike]
    field: str | None = None  # read this field instead of detecting the shape
    strict: bool = False
    malformed: list[Malformed] = _field(default_factory=list)
    n_malformed: int = 0
    keep_malformed: int = 1000  # how many to keep for the report (all are counted)
    in_memory: Iterable[Any] | None = None  # records already in memory (a list of dicts, a `datasets.Dataset`)

    def __post_init__(self) -> None:
        self.files = expand(self.paths)

    def __iter__(self) -> Iterator[Sample]:
        for src, rec in self.records():
            try:
                yield to_sample(rec, src, field=self.field)
            except BadRecord as e:
                self.report(src, str(e))

    def records(self) -> Iterator[tuple[str, Any]]:
        """(source, raw record) pairs, for commands (mix) that pass records through unchanged."""
        if self.in_memory is not None:
            for i, rec in enumerate(self.in_memory):
                yield f"<records>#{i}", rec
        for f in self.files:
            yield from _read(f, self.report)

    def valid_records(self) -> Iterator[tuple[str, Any]]:
        """(source, raw record) pairs of the records that have a usable shape (`to_sample` takes them); every
        other one is reported as malformed. What `mix` copies: a trainer must never see a record we skip."""
        for src, rec in self.records():
            try:
                to_sample(rec, src, field=self.field)
            except BadRecord as e:
                self.report(src, str(e))
                continue
            yield src, rec

    def report(self, source: str, reason: str) -> None:
        self.n_malformed += 1
        if self.strict:
            raise VocabdriftError(f"{source}: {reason} (--strict stops at the first malformed record; drop --strict "
                                  "to skip and count them)")
        if len(self.malformed) < self.keep_malformed:
            self.malformed.append(Malformed(source, reason))


class BadRecord(ValueError):
    """A record that parses but has no usable shape; counted as malformed, never raised to the user."""


# ---- finding files ----------------------------------------------------------------------------------------------

def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                           or (p / "dataset_dict.json").exists())


def _supported(p: Path) -> bool:
    return p.name.endswith(_SUFFIXES)


def expand(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files and saved data sets to read, in a stable order (folders are walked, sorted by name)."""
    out: list[Path] = []
    for spec in paths:
        p = Path(spec)
        if not p.exists():
            raise VocabdriftError(f"{p}: no such file or folder")
        if not p.is_file() and not p.is_dir():  # reading a pipe, socket or device could block forever
            raise VocabdriftError(f"{p}: not a regular file (a pipe, socket or device); give files or folders")
        if _is_saved_dataset(p) or p.is_file():
            if p.is_file() and not _supported(p):
                raise VocabdriftError(f"{p}: unknown data format; give .jsonl, .json, .parquet (or .gz of JSON "
                                      "lines), a folder of them, or a data set saved with `save_to_disk`")
            out.append(p)
            continue
        found: list[Path] = []
        for root, dirs, files in os.walk(p):
            dirs.sort()
            r = Path(root)
            keep = []
            for d in dirs:
                if _is_saved_dataset(r / d):
                    found.append(r / d)
                elif not d.startswith("."):
                    keep.append(d)
            dirs[:] = keep
            found.extend(r / f for f in sorted(files) if _supported(r / f) and not f.startswith(".")
                         and (r / f).is_file())  # a pipe among the files is not data: it would block
        if not found:
            raise VocabdriftError(f"{p}: no .jsonl, .json or .parquet files and no saved data set in this folder")
        out.extend(found)
    return out


# ---- reading records --------------------------------------------------------------------------------------------

def _open_text(p: Path) -> io.TextIOBase:
    # utf-8-sig: a byte-order mark (Windows editors write one) is read as nothing, not as part of record 1
    if p.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8-sig", errors="replace")
    return open(p, encoding="utf-8-sig", errors="replace")


@contextlib.contextmanager
def _readable(p: Path, where: Callable[[], str]) -> Iterator[None]:
    """A file that cannot be read on (a corrupt or cut .gz, an I/O error) is one clear error naming it and the
    line reached: the records before it may already be counted, so skipping the rest silently would lie."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as e:
        kind = "gzip file" if p.name.endswith(".gz") else "file"
        raise VocabdriftError(f"{p}: not a readable {kind} ({type(e).__name__}: {e}) {where()}; re-create or "
                              "re-download it") from e


def _lone_surrogate(line: str) -> bool:
    """Whether a JSON text may decode to a lone UTF-16 surrogate (\\ud800 without its pair), which no UTF-8 text
    holds and the tokenizer refuses: checked only on lines that escape one, so cheap."""
    return "\\u" in line and re.search(r"\\u[dD][89a-fA-F]", line) is not None


def _parse(line: str) -> tuple[Any, str | None]:
    """A JSON line's record, or (None, why not): invalid JSON, nested too deep, or a lone surrogate."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "JSON nested too deeply to read"
    except ValueError as e:  # e.g. an integer of more than 4,300 digits, which Python refuses to convert
        return None, f"not readable as JSON ({str(e).split(';')[0]})"
    if _lone_surrogate(line):
        try:
            json.dumps(rec, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, "holds a lone UTF-16 surrogate (an invalid \\ud800-\\udfff escape), which is not text"
        except RecursionError:
            return None, "JSON nested too deeply to read"
    return rec, None


def _lines(f: io.TextIOBase) -> Iterator[tuple[str | None, int]]:
    """(line, its length) for each line, reading at most MAX_RECORD_BYTES (in characters) of one line at a time:
    a longer line is skipped to its end in chunks and given as (None, its length), so memory stays bounded."""
    while True:
        line = f.readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        if len(line) <= MAX_RECORD_BYTES or line.endswith("\n"):
            yield line, len(line)
            continue
        n = len(line)
        while not line.endswith("\n"):
            line = f.readline(_CHUNK)
            if not line:
                break
            n += len(line)
        yield None, n


def _read(p: Path, bad) -> Iterator[tuple[str, Any]]:
    if p.is_dir():
        yield from _read_saved(p)
    elif p.name.endswith(".parquet"):
        yield from _read_parquet(p)
    elif p.name.endswith((".json", ".json.gz")) and _first_char(p) == "[":
        yield from _read_json_array(p)
    else:
        yield from _read_jsonl(p, bad)


def _first_char(p: Path) -> str:
    with _readable(p, lambda: "at its start"), _open_text(p) as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            s = chunk.lstrip()
            if s:
                return s[0]


def _read_jsonl(p: Path, bad) -> Iterator[tuple[str, Any]]:
    i = 0
    with _readable(p, lambda: f"after line {i}"), _open_text(p) as f:
        for i, (line, n) in enumerate(_lines(f), 1):  # noqa: B007 (i is read by the error message)
            if line is None:
                bad(f"{p}:{i}", f"a record of {n:,} characters, above the limit of {MAX_RECORD_BYTES:,} "
                                "(MAX_RECORD_BYTES); split it or drop it")
                continue
            if not line.strip():
                continue
            rec, why = _parse(line)
            if why is not None:
                bad(f"{p}:{i}", why)
                continue
            yield f"{p}:{i}", rec


def _read_json_array(p: Path) -> Iterator[tuple[str, Any]]:
    """A JSON file holding one array of records (read whole: JSON arrays cannot be streamed without a parser)."""
    try:
        with _readable(p, lambda: "while reading it whole"), _open_text(p) as f:
            text = f.read()
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise VocabdriftError(f"{p}:{e.lineno}: not valid JSON ({e.msg}); fix the file or convert it to JSONL") from e
    except RecursionError as e:
        raise VocabdriftError(f"{p}: JSON nested too deeply to read; fix the file or convert it to JSONL") from e
    if not isinstance(data, list):
        raise VocabdriftError(f"{p}: holds a JSON {type(data).__name__}, not an array of records")
    if _lone_surrogate(text):
        for i, rec in enumerate(data):
            _, why = _parse(json.dumps(rec))
            if why is not None:
                data[i] = _Bad(why)
    del text
    for i, rec in enumerate(data):
        yield f"{p}:#{i}", rec


@dataclass(frozen=True)
class _Bad:
    """A JSON-array element found unusable while reading; `to_sample` reports it with this reason."""

    reason: str


def _read_parquet(p: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError ...
        raise VocabdriftError(f"{p}: not a readable Parquet file ({e})") from e
    row = 0
    batches = pf.iter_batches(batch_size=_BATCH)
    while True:
        try:  # a file damaged past its footer fails mid-way: one clear error, not a crash
            batch = next(batches, None)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError ...
            raise VocabdriftError(f"{p}: not a readable Parquet file after row {row} ({e}); re-create it") from e
        if batch is None:
            return
        for rec in batch.to_pylist():
            yield f"{p}:#{row}", rec
            row += 1


def _read_saved(p: Path) -> Iterator[tuple[str, Any]]:
    need_extra("datasets", "train", f"{p}: reading a saved data set")
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as e:
        raise VocabdriftError(f"{p}: not a data set saved with `save_to_disk` ({e})") from e
    splits: list[tuple[str, Dataset]]
    if isinstance(ds, DatasetDict):
        splits = [("train", ds["train"])] if "train" in ds else sorted(ds.items())
    else:
        splits = [("", ds)]
    for name, d in splits:
        row = 0
        for batch in d.iter(batch_size=_BATCH):
            keys = list(batch)
            n = len(batch[keys[0]]) if keys else 0
            for j in range(n):
                yield f"{p}{'/' + name if name else ''}:#{row}", {k: batch[k][j] for k in keys}
                row += 1


# ---- record shapes ----------------------------------------------------------------------------------------------

def detect_shape(rec: dict[str, Any]) -> Shape | None:
    """The record's shape from its keys, or None."""
    if isinstance(rec.get("messages"), list):
        return "messages"
    if isinstance(rec.get("conversations"), list):
        return "conversations"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    if isinstance(rec.get("instruction"), str) and "output" in rec:
        return "alpaca"
    if isinstance(rec.get("text"), str):
        return "text"
    return None


def _content(c: Any, where: str) -> str:
    """Message content as text: a string, or the text parts of a list of content blocks."""
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for b in c:
            if isinstance(b, str):
                parts.append(b)
            elif isinstance(b, dict) and isinstance(b.get("text"), str):
                parts.append(b["text"])
        return "".join(parts)
    raise BadRecord(f"{where}: content is {type(c).__name__}, expected a string")


def _messages(msgs: list[Any], *, sharegpt: bool) -> list[dict[str, str]]:
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRecord(f"message {k} is {type(m).__name__}, expected an object")
        if sharegpt or ("from" in m and "role" not in m):
            who = m.get("from")
            role = _SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
            if role is None:
                raise BadRecord(f"message {k}: unknown speaker {who!r} (expected human/gpt/system/tool)")
            out.append({"role": role, "content": _content(m.get("value"), f"message {k}")})
        else:
            role = m.get("role")
            if not isinstance(role, str):
                raise BadRecord(f"message {k} has no 'role'")
            out.append({"role": role, "content": _content(m.get("content"), f"message {k}")})
    if not out:
        raise BadRecord("empty conversation")
    return out


def drop_none(rec: Any) -> Any:
    """Remove None values (and from message dicts): columnar readers give every row every column of the file."""
    if isinstance(rec, dict):
        return {k: drop_none(v) for k, v in rec.items() if v is not None}
    if isinstance(rec, list):
        return [drop_none(v) for v in rec]
    return rec


def to_sample(rec: Any, source: str, *, field: str | None = None) -> Sample:
    """Normalise one raw record; raises `BadRecord` (reported as malformed) when it has no usable shape."""
    if isinstance(rec, _Bad):
        raise BadRecord(rec.reason)
    if not isinstance(rec, dict):
        raise BadRecord(f"record is {type(rec).__name__}, expected a JSON object")
    if field is not None:
        if field not in rec:
            raise BadRecord(f"no field {field!r} (--field); its keys are {sorted(rec)[:8]}")
        v = rec[field]
        if isinstance(v, str):
            return Sample(source, text=v)
        if isinstance(v, list):
            return Sample(source, messages=_messages(v, sharegpt=False))
        raise BadRecord(f"field {field!r} is {type(v).__name__}; expected text or a list of messages")
    shape = detect_shape(rec)
    if shape == "messages":
        return Sample(source, messages=_messages(rec["messages"], sharegpt=False))
    if shape == "conversations":
        return Sample(source, messages=_messages(rec["conversations"], sharegpt=True))
    if shape == "prompt_completion":
        p, c = rec["prompt"], rec["completion"]
        if isinstance(p, list) and isinstance(c, list):  # TRL's conversational prompt-completion
            return Sample(source, messages=_messages(p + c, sharegpt=False))
        if isinstance(p, str) and isinstance(c, str):
            return Sample(source, prompt=p, completion=c)
        raise BadRecord("prompt/completion must both be strings or both be lists of messages")
    if shape == "alpaca":  # rendered as one user turn and one assistant turn, as LLaMA-Factory does
        user = rec["instruction"] + (f"\n{rec['input']}" if isinstance(rec.get("input"), str) and rec["input"] else "")
        if not isinstance(rec["output"], str):
            raise BadRecord("alpaca 'output' must be a string")
        return Sample(source, messages=[{"role": "user", "content": user},
                                        {"role": "assistant", "content": rec["output"]}])
    if shape == "text":
        return Sample(source, text=rec["text"])
    raise BadRecord("no known shape (messages, conversations, prompt/completion, instruction/output, text) in keys "
                     f"{sorted(rec)[:8]}; name the field with --field")
