"""THE vocabulary table: building it, caching it (the key, the child process, the cleanup) and reading it.

Every command that needs the table comes here (`diff`, `vocab`, `neighbors`, `coverage`, `synth`, `probe`,
`undertrained`, the training callback): a table built from a `tokenizer.json` is kept in the user's cache folder
(see `_cache_dir`) and read back the next time, so the 150K-token table's seconds (decoding, classifying,
re-encoding every token) are paid once per tokenizer. `measure` builds it beside the drift pass, in a child process
for large vocabularies (`_VocabChild`).

The one source module that uses an analysis: the table is the tokenizer's vocabulary (read here) classified by
`analyses.vocab` (pure), and the cache key hashes both modules' code.

    python -m vocabdrift.sources.vocabulary OUT.arrow '[["tokenizer spec", rows], ...]'

runs the child: it writes the table of the first candidate that gives one; on bad input, one line on stderr and
exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..analyses.vocab import build_vocab_table
from ..atomic import write_bytes_atomic, write_parquet_atomic
from ..errors import VocabdriftError
from .spec import parse_model_spec
from .tokenizer import gguf_of, gguf_token_types, load_vocabulary_tokenizer, read_vocabulary

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


CACHE_KEEP = 16  # vocabulary tables kept in the cache, the most recently used (a 152K table is ~3.6 MB)


def _cache_dir() -> Path | None:
    """Where finished vocabulary tables are kept: $VOCABDRIFT_CACHE, else $XDG_CACHE_HOME/vocabdrift, else
    ~/.cache/vocabdrift. VOCABDRIFT_CACHE=off turns the cache off."""
    env = os.environ.get("VOCABDRIFT_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "no", "false") else Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vocabdrift"


def read_cached_json(name: str) -> dict[str, Any] | None:
    """A JSON object kept in the cache folder (`_cache_dir`) under `name`, or None (no cache, no file, damaged)."""
    folder = _cache_dir()
    if folder is None:
        return None
    try:
        got = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) else None


def write_cached_json(name: str, obj: dict[str, Any]) -> None:
    """Keep `obj` in the cache folder under `name` (atomically); a read-only or full cache folder only costs the
    next run the work again."""
    folder = _cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(folder / name, json.dumps(obj, ensure_ascii=False).encode("utf-8"))
    except OSError as e:
        log.info("cache file %s not written (%s)", name, e)


def _cache_key(model: PathLike, size: int | None) -> str | None:
    """A key for a table built from a `tokenizer.json` (a folder holding one, or the file): the file's bytes, the
    row count asked for, the source of the code that builds the table and the versions of `tokenizers` and Python,
    so that a changed tokenizer, classification or library never reads an old table. None for other sources
    (GGUF files, hub ids, tokenizers without a tokenizer.json)."""
    import hashlib

    try:
        ms = parse_model_spec(model)
    except VocabdriftError:
        return None  # the build names the problem
    if not ms.local:
        return None
    p = Path(ms.tokenizer_source())
    f = p / "tokenizer.json" if p.is_dir() else p
    if not (f.is_file() and f.name.endswith(".json")):
        return None
    h = hashlib.sha256(f.read_bytes())
    h.update(f"{size} {_table_code_digest()}".encode())
    return h.hexdigest()[:32]


@functools.cache
def _table_code_digest() -> str:
    """The source of the code that builds a vocabulary table, and the versions of `tokenizers` and Python
    (unicodedata follows Python's): read once per process."""
    import hashlib
    import sys

    import tokenizers

    from ..analyses import vocab as vocab_module
    from . import tokenizer as tokenizer_module

    h = hashlib.sha256(f"{tokenizers.__version__} {sys.version}".encode())
    for module in (vocab_module, tokenizer_module):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def vocab_table(model: PathLike, *, size: int | None = None, trust_remote_code: bool = False,
                cache: bool = True) -> pa.Table:
    """The vocabulary table of a model folder, tokenizer folder, `tokenizer.json`, GGUF file or hub id.

    With `cache` (the default), a table built from a `tokenizer.json` is kept in the user's cache folder (see
    `_cache_dir`) and read back the next time: every diff against the same base pays the 150K-token table's
    seconds (decoding, classifying, re-encoding every token) once.
    """
    hit = _cache_path(model, size) if cache else None
    if hit is not None and (table := _read_cache(hit)) is not None:
        return table
    table = _build_vocab_table(model, size=size, trust_remote_code=trust_remote_code)
    if hit is not None:
        _write_cache(hit, table)
    return table


def _cache_path(model: PathLike, size: int | None) -> Path | None:
    folder, key = _cache_dir(), _cache_key(model, size)
    return folder / f"vocab-{key}.parquet" if folder is not None and key is not None else None


def _read_cache(path: Path) -> pa.Table | None:
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # a damaged cache file is rebuilt, never trusted
        log.warning("vocabulary cache %s unreadable (%s); rebuilding it", path, e)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # used now: the pruning keeps the most recently used tables
    return table


def _write_cache(path: Path, table: pa.Table) -> None:
    """Through a temporary file and a rename, so a reader never sees half a table; a read-only or full cache
    folder only costs the next run its seconds."""
    try:
        write_parquet_atomic(path, table, compression=None)
    except OSError as e:
        log.info("vocabulary cache not written (%s)", e)
        return
    _prune_cache(path.parent)


def _prune_cache(folder: Path) -> None:
    """Delete all but the CACHE_KEEP most recently used tables: the cache never grows past a few dozen MB."""

    def used(f: Path) -> float:
        try:
            return f.stat().st_mtime
        except OSError:  # deleted meanwhile by another process
            return 0.0

    for f in sorted(folder.glob("vocab-*.parquet"), key=used, reverse=True)[CACHE_KEEP:]:
        with contextlib.suppress(OSError):
            f.unlink()


def _build_vocab_table(model: PathLike, *, size: int | None, trust_remote_code: bool) -> pa.Table:
    tok = load_vocabulary_tokenizer(model, trust_remote_code=trust_remote_code)
    n_tok = tok.get_vocab_size(with_added_tokens=True) if hasattr(tok, "get_vocab_size") else len(tok)
    if size is not None and n_tok > size:
        raise VocabdriftError(f"{model}: the tokenizer has {n_tok} tokens but the model has only {size} rows; "
                              "this tokenizer belongs to another model — pass the right one with --tokenizer")
    v = read_vocabulary(tok, size=size)
    gg = gguf_of(model)
    types = gguf_token_types(gg) if gg is not None else None
    return build_vocab_table(v.pieces, v.texts, v.raw, v.is_special, v.reachable, tokens=v.tokens, token_type=types)


def first_vocab_table(candidates: Sequence[tuple[str, int]]) -> pa.Table:
    """The table of the first (tokenizer, row count) that gives one; the last one's error otherwise.

    A candidate with no tokenizer (POST saved with its weights only) is passed over in silence; one whose
    tokenizer is there but unreadable is passed over with a warning, since the next one may not know POST's
    added tokens."""
    err: VocabdriftError | None = None
    for i, (spec, size) in enumerate(candidates):
        try:
            return vocab_table(spec, size=size)
        except VocabdriftError as e:
            err = e
            if i + 1 < len(candidates) and "no tokenizer here" not in str(e):
                log.warning("%s; reading the vocabulary from %s instead", e, candidates[i + 1][0])
    assert err is not None
    raise err


class _VocabThread:
    """A table built on a thread beside the drift pass (small vocabularies): `result()` waits for it."""

    def __init__(self, candidates: Sequence[tuple[str, int]]) -> None:
        pool = ThreadPoolExecutor(max_workers=1)
        self._future = pool.submit(first_vocab_table, candidates)
        pool.shutdown(wait=False)

    def result(self) -> pa.Table:
        return self._future.result()

    def cancel(self) -> None:  # a thread cannot be stopped; it ends with its table, which nobody reads
        pass


class _VocabChild:
    """`first_vocab_table` in a child process (`python -m vocabdrift.sources.vocabulary`), cache included;
    `result()` waits for it, `cancel()` ends it.

    Why: `tokenizers` parses a tokenizer.json holding the GIL (1.5 s for Qwen's), and the drift pass's reading
    thread needs the GIL between reads: built on a thread, the table cost a cold diff of a 152K vocabulary about
    5 s; in its own process it runs beside the pass (bench/diff_bench.py, the `ours_measure` row). No thread of
    ours waits on it either: the table is read back (and pyarrow imported) in `result()`, after the pass.
    """

    def __init__(self, candidates: Sequence[tuple[str, int]]) -> None:
        import json
        import subprocess
        import sys
        import tempfile

        _sweep_orphans()
        self._dir = Path(tempfile.mkdtemp(prefix=f"vocabdrift-vocab-{os.getpid()}-"))
        self._stderr = open(self._dir / "stderr", "w+")  # a file, not a pipe: nobody reads it until the end
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vocabdrift.sources.vocabulary", str(self._dir / "vocab.arrow"),
             json.dumps(candidates)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr)

    def result(self) -> pa.Table:
        import pyarrow as pa

        try:
            code = self._proc.wait()
            if code != 0:
                self._stderr.seek(0)
                lines = self._stderr.read().strip().splitlines()
                raise VocabdriftError(lines[-1] if lines else f"building the vocabulary table failed ({code})")
            with pa.OSFile(str(self._dir / "vocab.arrow")) as f:
                return pa.ipc.open_file(f).read_all()
        finally:
            self._close()

    def cancel(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close()

    def _close(self) -> None:
        import shutil

        self._stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _sweep_orphans() -> None:
    """Remove the temporary folders of `_VocabChild`s whose process is gone (killed with SIGKILL after its child
    had finished, so neither could clean up). The folder's name carries the owner's pid."""
    import re
    import shutil
    import tempfile

    for d in Path(tempfile.gettempdir()).glob("vocabdrift-vocab-*-*"):
        m = re.fullmatch(r"vocabdrift-vocab-(\d+)-\w+", d.name)
        try:
            if m is None or d.is_symlink() or d.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:  # the owner is dead
            shutil.rmtree(d, ignore_errors=True)
        except OSError:  # alive (PermissionError: another user's process)
            pass


def _vocab_in_child(candidates: Sequence[tuple[str, int]]) -> pa.Table:
    return _VocabChild(candidates).result()


def table_of_tokenizer(tok: Any, *, size: int | None = None, gguf: PathLike | None = None) -> pa.Table:
    """The table of a tokenizer object (a `transformers` tokenizer or a raw `tokenizers.Tokenizer`), not cached:
    an object has no file to key the cache on. Padded to `size` rows when given; `gguf`, the file the tokenizer
    was read from, gives the tokens' types."""
    v = read_vocabulary(tok, size=size)
    types = gguf_token_types(gguf) if gguf is not None else None
    return build_vocab_table(v.pieces, v.texts, v.raw, v.is_special, v.reachable, tokens=v.tokens, token_type=types)


def _die_with_parent(folder: str) -> None:
    """When the parent dies (even by SIGKILL), end this child and remove the parent's temporary folder: nobody
    else is left to. Linux only (PR_SET_PDEATHSIG); elsewhere the parent's own clean-up is all there is."""
    import re
    import shutil
    import signal

    # the parent's pid is in the folder's name (`_VocabChild`): a parent killed before this line ran is noticed too
    m = re.fullmatch(r"vocabdrift-vocab-(\d+)-\w+", os.path.basename(folder.rstrip("/")))
    parent = int(m.group(1)) if m else os.getppid()

    def on_term(signum: int, frame: object) -> None:
        if os.getppid() == parent:  # the parent lives (it ends this child with SIGKILL itself, in cancel())
            return
        if os.path.basename(folder.rstrip("/")).startswith("vocabdrift-vocab-"):
            shutil.rmtree(folder, ignore_errors=True)
        os._exit(143)

    signal.signal(signal.SIGTERM, on_term)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent ends
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the prctl took effect
        on_term(signal.SIGTERM, None)


def main(argv: list[str]) -> int:
    """The child process of `_VocabChild`: write the first candidate's table as Arrow IPC (no encoding either way)."""
    _die_with_parent(os.path.dirname(os.path.abspath(argv[0])))
    import pyarrow as pa

    out, candidates = argv[0], [(str(spec), int(size)) for spec, size in json.loads(argv[1])]
    try:
        table = first_vocab_table(candidates)
    except VocabdriftError as e:
        print(str(e), file=sys.stderr)
        return 2
    with pa.OSFile(out, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
