"""`diff`, `vocab`, `neighbors`: the drift between two checkpoints, and the tables that explain it.

I/O at the edges (checkpoints, tokenizers, the run folder); the numbers come from `analyses.drift`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..analyses import drift as D
from ..analyses.vocab import arrow_numbers, build_vocab_table
from ..device import best_device, cpu_threads
from ..errors import VocabdriftError
from ..outputs.run import Timer, open_run
from ..sources.checkpoint import DEFAULT_BLOCK_BYTES, Checkpoint, Kind, open_checkpoint
from ..sources.tokenizer import load_tokenizer, load_vocabulary_tokenizer, read_vocabulary

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


@dataclass
class Measurement:
    """What `measure` found: the vocabulary and drift tables and facts about the two checkpoints."""

    vocab: pa.Table
    drift: pa.Table
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self, *, threshold: float = 0.95) -> dict[str, Any]:
        s = D.summarize(self.drift, self.vocab, threshold=threshold)
        s["added_tokens"] = self.info.get("added_tokens", [])
        s["tied"] = {"base": self.info["base"]["tied"], "post": self.info["post"]["tied"]}
        return s


# ---- the vocabulary table -------------------------------------------------------------------------------------

def _tokenizer_spec(ck: Checkpoint) -> Path:
    return ck.path if ck.path.is_dir() or ck.format == "gguf" else ck.path.parent


CACHE_KEEP = 16  # vocabulary tables kept in the cache, the most recently used (a 152K table is ~3.6 MB)


def _cache_dir() -> Path | None:
    """Where finished vocabulary tables are kept: $VOCABDRIFT_CACHE, else $XDG_CACHE_HOME/vocabdrift, else
    ~/.cache/vocabdrift. VOCABDRIFT_CACHE=off turns the cache off."""
    env = os.environ.get("VOCABDRIFT_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "no", "false") else Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vocabdrift"


def _cache_key(model: PathLike, size: int | None) -> str | None:
    """A key for a table built from a `tokenizer.json` (a folder holding one, or the file): the file's bytes, the
    row count asked for, the source of the code that builds the table and the versions of `tokenizers` and Python,
    so that a changed tokenizer, classification or library never reads an old table. None for other sources
    (GGUF files, hub ids, tokenizers without a tokenizer.json)."""
    import hashlib

    p = Path(model)
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
    from ..sources import tokenizer as tokenizer_module

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
    import pyarrow.parquet as pq

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
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
    return build_vocab_table(v.pieces, v.texts, v.raw, v.is_special, v.reachable)


def vocab(model: PathLike, *, out: PathLike | None = None, trust_remote_code: bool = False) -> pa.Table:
    """Build the vocabulary table; with `out`, write RUN/vocab.parquet.

    Example:
        >>> t = vocab("HuggingFaceTB/SmolLM2-135M-Instruct", out="runs/smol")
        >>> t.num_rows
        49152
    """
    table = vocab_table(model, trust_remote_code=trust_remote_code)
    if out is not None:
        with open_run(out) as run:
            run.write_table("vocab.parquet", table)
            run.record("vocab", arguments={"model": str(model)}, inputs={"model": str(model)})
    return table


# ---- drift ----------------------------------------------------------------------------------------------------

def _prefetched(it: Iterator[Any]) -> Iterator[Any]:
    """Read the next block on a thread while this one is computed: disk and arithmetic overlap.

    The reading thread converts (bf16 to float32) with torch, the main thread computes with torch: each gets
    half of torch's threads while the stream is open, so neither waits on the other's cores.
    """
    import torch

    sentinel = object()
    with cpu_threads(torch.get_num_threads() // 2), ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(next, it, sentinel)
        while True:
            item = fut.result()
            if item is sentinel:
                return
            fut = pool.submit(next, it, sentinel)
            yield item


def _paired_blocks(base: Checkpoint, post: Checkpoint, kind: Kind, n: int, block_rows: int,
                   device: torch.device, scale: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start, base rows, post rows) float32 blocks, read ahead on a thread into two reused buffer pairs.

    A yielded block stays valid until the next one is requested. `scale` multiplies each side's columns
    (the final-norm fold), in place.
    """
    import torch

    bufs = [(torch.empty(block_rows, base.hidden_size, device=device),
             torch.empty(block_rows, post.hidden_size, device=device)) for _ in range(2)]

    def gen() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for i, s in enumerate(range(0, n, block_rows)):
            e = min(n, s + block_rows)
            ob, op = bufs[i % 2]
            rb, rp = base.rows(kind, s, e, out=ob), post.rows(kind, s, e, out=op)
            if scale is not None:
                rb.mul_(scale[0])
                rp.mul_(scale[1])
            yield s, rb, rp

    return _prefetched(gen())


# Rows x columns of one matrix from which the fused bf16 pass pays for numba's start (about a second per process):
# Qwen2.5-7B's 152K x 3,584 is 545 M; SmolLM2's 49K x 576 (28 M) takes the float32 path.
FUSED_MIN_ELEMENTS = 100_000_000


def _fused(base: Checkpoint, post: Checkpoint, kind: Kind, n: int, device: torch.device, transformed: bool) -> bool:
    """Whether `kind` takes the fused bf16 pass (`fused_stats`): on a CPU, both matrices bf16 in safetensors,
    large, and no fold or centring (those transform the float32 rows first)."""
    return (device.type == "cpu" and not transformed and base.bf16_bits(kind) and post.bf16_bits(kind)
            and n * base.hidden_size >= FUSED_MIN_ELEMENTS)


# bf16 bytes of one matrix per block of the fused pass: reads around the page cache get no readahead, so each is
# a large request (4 MiB reads took 2.5-5.2 s for the bench's 4.4 GB, 16 MiB ones 2.4-2.9 s).
FUSED_BLOCK_BYTES = 16 << 20


def fused_stats(base: Checkpoint, post: Checkpoint, kind: Kind, n: int, block_rows: int | None = None
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(start, `row_stats`-like float32 arrays) per block of the first `n` rows of two bf16 matrices: one pass
    over their bits (`drift.bf16_row_sums`), the next block read ahead on a thread into a second buffer pair
    (while the first block's call loads the compiled kernel, the second is read)."""
    step = block_rows or max(1, FUSED_BLOCK_BYTES // (2 * base.hidden_size))
    bufs = [(base.bits_buffer(step), post.bits_buffer(step)) for _ in range(2)]

    def gen() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for i, s in enumerate(range(0, n, step)):
            e = min(n, s + step)
            ob, op = bufs[i % 2]
            yield s, base.rows_bits(kind, s, e, ob), post.rows_bits(kind, s, e, op)

    for s, ub, up in _prefetched(gen()):
        yield s, D.stats_from_sums(D.bf16_row_sums(ub, up))


def _check_pair(base: Checkpoint, post: Checkpoint) -> None:
    if base.hidden_size != post.hidden_size:
        raise VocabdriftError(f"hidden sizes differ: {base.path} has {base.hidden_size}, {post.path} has "
                              f"{post.hidden_size}; diff compares two checkpoints of the same model")
    a, b = base.config.get("model_type"), post.config.get("model_type")
    if a and b and a != b:
        raise VocabdriftError(f"architectures differ: {base.path} is {a}, {post.path} is {b}; "
                              "diff compares two checkpoints of the same model")


def _progress(enabled: bool):  # -> rich Progress or a no-op
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=True)


# From this many rows on, the vocabulary table is built in a process of its own (see _vocab_in_child).
_CHILD_ROWS = 32_768


def _start_vocab(b: Checkpoint, p: Checkpoint, tokenizer: PathLike | None) -> _VocabThread | _VocabChild:
    """Start building the table: POST's tokenizer first (it knows added tokens), else BASE's; padded to the
    model's row count. In a child process from _CHILD_ROWS rows on (cached or not), else on a thread."""
    pairs = [(tokenizer, p)] if tokenizer is not None else [(_tokenizer_spec(p), p), (_tokenizer_spec(b), b)]
    candidates = [(str(spec), max(ck.rows_of("lm_head"), ck.rows_of("embed"))) for spec, ck in pairs]
    if max(size for _, size in candidates) < _CHILD_ROWS:
        return _VocabThread(candidates)
    # From the cache too: read on a thread beside the pass, the cache (its key hashes tokenizer.json and imports
    # tokenizers and pyarrow.parquet, holding the GIL) kept the pass's reads waiting: 4.5-4.7 s against 3.6-4.6 s
    # from the child (a cold `measure`, 152K rows).
    return _VocabChild(candidates)


def first_vocab_table(candidates: Sequence[tuple[str, int]]) -> pa.Table:
    """The table of the first (tokenizer, row count) that gives one; the last one's error otherwise."""
    err: VocabdriftError | None = None
    for spec, size in candidates:
        try:
            return vocab_table(spec, size=size)
        except VocabdriftError as e:
            err = e
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
    """`first_vocab_table` in a child process (`python -m vocabdrift.api._vocab_child`), cache included;
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

        self._dir = Path(tempfile.mkdtemp(prefix="vocabdrift-vocab-"))
        self._stderr = open(self._dir / "stderr", "w+")  # a file, not a pipe: nobody reads it until the end
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vocabdrift.api._vocab_child", str(self._dir / "vocab.arrow"),
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


def _vocab_in_child(candidates: Sequence[tuple[str, int]]) -> pa.Table:
    return _VocabChild(candidates).result()


def measure(base: PathLike | Checkpoint, post: PathLike | Checkpoint, *, tokenizer: PathLike | None = None,
            fold_norm: bool = False, center: bool = False, device: str | None = None,
            block_rows: int | None = None, allow_pickle: bool = False, progress: bool = False) -> Measurement:
    """Compute the drift of every lm_head and embedding row from BASE to POST, without writing anything.

    Args:
        base, post: checkpoints (anything `open_checkpoint` takes), or opened `Checkpoint`s.
        tokenizer: where to read the vocabulary (default: POST's, else BASE's).
        fold_norm: multiply lm_head columns by each model's final-norm weight g first (logits are W·(g⊙x̂)).
        center: also give cosines after subtracting each matrix's mean row (one more pass over the rows).
        device: "cpu", "cuda", ... (default: the best present).
        block_rows: rows per block (default: 8 MiB of float32 per matrix; in the fused bf16 pass, 16 MiB
            of bf16).

    Returns:
        A `Measurement` with the vocabulary table, the drift table (columns of `DRIFT_COLUMNS`, plus
        `nonfinite`, and `*_cos_centered` with `center`) and facts about the pair.
    """
    timer = Timer()
    with timer("open"):
        b = base if isinstance(base, Checkpoint) else open_checkpoint(base, allow_pickle=allow_pickle)
        p = post if isinstance(post, Checkpoint) else open_checkpoint(post, allow_pickle=allow_pickle)
        _check_pair(b, p)
    import torch  # noqa: F401  (first: see below)

    # The vocabulary table is built beside the pass (in a child process for large vocabularies). Not before torch
    # is imported: on a thread, the tokenizer's Rust calls hold the GIL for seconds, and the import would wait.
    job = _start_vocab(b, p, tokenizer)
    try:
        return _measure(b, p, job, timer, fold_norm=fold_norm, center=center, device=device,
                        block_rows=block_rows, progress=progress)
    finally:
        job.cancel()


def _measure(b: Checkpoint, p: Checkpoint, job: _VocabThread | _VocabChild, timer: Timer, *, fold_norm: bool,
             center: bool, device: str | None, block_rows: int | None, progress: bool) -> Measurement:
    import torch

    dev = best_device(device)
    rows = {k: (b.rows_of(k), p.rows_of(k)) for k in ("lm_head", "embed")}
    n = min(min(v) for v in rows.values())
    added = list(range(n, max(p.rows_of("lm_head"), p.rows_of("embed"))))
    if b.rows_of("embed") != p.rows_of("embed"):
        log.warning("vocabularies differ: BASE has %d rows, POST %d; comparing the first %d ids",
                    b.rows_of("embed"), p.rows_of("embed"), n)
    step = block_rows or max(256, DEFAULT_BLOCK_BYTES // (4 * b.hidden_size))

    g = {"base": None, "post": None}
    if fold_norm:
        for name, ck in (("base", b), ("post", p)):
            w = ck.final_norm()
            if w is None:
                raise VocabdriftError(f"{ck.path}: --fold-norm needs the final norm weight, and none was found")
            g[name] = torch.as_tensor(w, dtype=torch.float32, device=dev)

    cols: dict[str, np.ndarray] = {}
    nonfinite = np.zeros(n, dtype=bool)
    means: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scratch = torch.empty(step, b.hidden_size, device=dev)
    kinds: list[Kind] = ["lm_head", "embed"]

    def scale(kind: Kind) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (g["base"], g["post"]) if kind == "lm_head" and fold_norm else None

    # bf16 on a CPU: the fused pass, unless the rows are transformed first (fold, centring)
    fused = {k: _fused(b, p, k, n, dev, fold_norm or center) for k in kinds}
    fused_step = block_rows or max(1, FUSED_BLOCK_BYTES // (2 * b.hidden_size))
    with timer("drift"), _progress(progress) as bar:
        for kind in kinds:
            out = {k: np.empty(n, dtype=np.float32) for k in ("cos", "l2", "norm_base", "norm_post")}
            task = bar.add_task(f"{kind} rows", total=n)
            sb = torch.zeros(b.hidden_size, dtype=torch.float64, device=dev)
            sp = torch.zeros_like(sb)
            if fused[kind]:
                for s, st_np in fused_stats(b, p, kind, n, fused_step):
                    e = s + len(st_np["cos"])
                    nonfinite[s:e] |= ~(np.isfinite(st_np["norm_base"]) & np.isfinite(st_np["norm_post"]))
                    for k, v in st_np.items():
                        out[k][s:e] = v
                    bar.advance(task, e - s)
            else:
                for s, rb, rp in _paired_blocks(b, p, kind, n, step, dev, scale(kind)):
                    e = s + len(rb)
                    st = D.row_stats(rb, rp, scratch=scratch)
                    # A NaN or Inf anywhere in a row makes its norm non-finite: free detection of broken rows.
                    bad = ~(torch.isfinite(st["norm_base"]) & torch.isfinite(st["norm_post"])).cpu().numpy()
                    if bad.any():  # reported, and zeroed so they cannot poison the sums
                        nonfinite[s:e] |= bad
                        torch.nan_to_num(rb, nan=0.0, posinf=0.0, neginf=0.0, out=rb)
                        torch.nan_to_num(rp, nan=0.0, posinf=0.0, neginf=0.0, out=rp)
                    for k, v in st.items():
                        out[k][s:e] = v.cpu().numpy()
                    if center:
                        sb += rb.sum(0, dtype=torch.float64)
                        sp += rp.sum(0, dtype=torch.float64)
                    bar.advance(task, len(rb))
            out["cos"][nonfinite] = np.nan
            cols.update({f"{kind}_{k}": v for k, v in out.items()})
            means[kind] = ((sb / max(n, 1)).float(), (sp / max(n, 1)).float())
        if center:  # a second pass: the mean row is known only after the first
            for kind in kinds:
                mb, mp = means[kind]
                cc = np.empty(n, dtype=np.float32)
                task = bar.add_task(f"{kind} rows (centred)", total=n)
                for s, rb, rp in _paired_blocks(b, p, kind, n, step, dev, scale(kind)):
                    torch.nan_to_num(rb, nan=0.0, posinf=0.0, neginf=0.0, out=rb)
                    torch.nan_to_num(rp, nan=0.0, posinf=0.0, neginf=0.0, out=rp)
                    cc[s:s + len(rb)] = D.centered_cos(rb, rp, mb, mp).cpu().numpy()
                    bar.advance(task, len(rb))
                cc[nonfinite] = np.nan
                cols[f"{kind}_cos_centered"] = cc

    with timer("vocab (not overlapped)"):
        vt = job.result().slice(0, n)
    import pyarrow as pa  # (imported by now, by the table's `result`)

    bias_b, bias_p = b.lm_head_bias(), p.lm_head_bias()
    if bias_b is not None and bias_p is not None:
        cols["lm_head_bias_delta"] = (bias_p[:n] - bias_b[:n]).astype(np.float32)

    table = pa.table({c: arrow_numbers(v) for c, v in {  # not pa.table of numpy: that imports pandas (0.7 s)
        "token_id": np.arange(n, dtype=np.int64),
        **{c: cols[c] for c in D.DRIFT_COLUMNS},
        **{c: v for c, v in cols.items() if c not in D.DRIFT_COLUMNS},
        "nonfinite": nonfinite}.items()})
    if nonfinite.any():
        log.warning("%d rows hold NaN or Inf (first: %s); they are left out of the summary",
                    int(nonfinite.sum()), np.flatnonzero(nonfinite)[:5].tolist())
    info = {"base": b.describe(), "post": p.describe(), "common_rows": n, "added_tokens": added,
            "fold_norm": fold_norm, "center": center, "device": str(dev),
            "block_rows": {k: fused_step if fused[k] else step for k in kinds}}
    return Measurement(vocab=vt, drift=table, info=info, timings=timer.timings)


# ---- neighbours -----------------------------------------------------------------------------------------------

def _neighbor_rows(ck: Checkpoint, space: Kind, ids: Sequence[int], k: int, device: torch.device,
                   stop: int | None = None, norms: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    import torch

    q = torch.cat([ck.rows(space, i, i + 1, device=device) for i in ids]) if ids else \
        torch.zeros(0, ck.hidden_size, device=device)
    # read ahead on a thread, as the drift pass does: the next block is read and converted during this one's product
    return D.topk_cosine(q, _prefetched(ck.iter_blocks(space, stop=stop, device=device)), k,
                         exclude_self=list(ids), row_norms=norms)


def neighbor_table(checkpoints: dict[str, Checkpoint], ids: Sequence[int], *, space: Kind = "lm_head", k: int = 10,
                   device: str | None = None, stop: int | None = None,
                   norms: dict[str, np.ndarray] | None = None) -> pa.Table:
    """neighbors.parquet rows: for each model and query id, its k nearest rows by cosine (itself excluded).

    `norms` (model name -> every row's norm in `space`, e.g. from a drift table) spares the pass computing them."""
    import pyarrow as pa

    dev = best_device(device)
    cols: dict[str, list[Any]] = {"token_id": [], "space": [], "model": [], "rank": [], "neighbor_id": [], "cos": []}
    for name, ck in checkpoints.items():
        nid, ncos = _neighbor_rows(ck, space, list(ids), k, dev, stop, (norms or {}).get(name))
        for qi, tid in enumerate(ids):
            for r in range(nid.shape[1]):
                cols["token_id"].append(int(tid))
                cols["space"].append(space)
                cols["model"].append(name)
                cols["rank"].append(r + 1)
                cols["neighbor_id"].append(int(nid[qi, r]))
                cols["cos"].append(float(ncos[qi, r]))
    return pa.table({"token_id": pa.array(cols["token_id"], pa.int64()), "space": cols["space"],
                     "model": cols["model"], "rank": pa.array(cols["rank"], pa.int32()),
                     "neighbor_id": pa.array(cols["neighbor_id"], pa.int64()),
                     "cos": pa.array(cols["cos"], pa.float32())})


def resolve_token(token: str | int, vocab: pa.Table, tokenizer: Any | None = None) -> int:
    """A token given as an id ("1234"), as its exact text (" the", "嘉祺") or as its raw piece ("Ġthe")."""
    n = vocab.num_rows
    if isinstance(token, int) or (isinstance(token, str) and token.lstrip("-").isdigit()):
        i = int(token)
        if not 0 <= i < n:
            raise VocabdriftError(f"token id {i} is out of range: the vocabulary has {n} ids")
        return i
    for col in ("text", "piece"):
        vals = vocab.column(col).to_pylist()
        if token in vals:
            return vals.index(token)
    if tokenizer is not None:
        ids = tokenizer.backend_tokenizer.encode(token, add_special_tokens=False).ids
        if len(ids) == 1:
            return ids[0]
        raise VocabdriftError(f"{token!r} is not one token: it encodes to {len(ids)} ids {ids[:8]}; "
                              "name a single token (its text, raw piece or id)")
    raise VocabdriftError(f"{token!r} is not a token of this vocabulary; give its exact text, raw piece or id")


def neighbors(model: PathLike, token: str | int, *, base: PathLike | None = None, space: Kind = "lm_head",
              k: int = 10, tokenizer: PathLike | None = None, device: str | None = None) -> pa.Table:
    """The k nearest neighbours of a token by cosine in `space`; with `base`, before and after.

    Returns a table: model, rank, neighbor_id, text, is_special, cos.
    """
    import pyarrow as pa

    post = open_checkpoint(model)
    cks = {"post": post} if base is None else {"base": open_checkpoint(base), "post": post}
    if base is not None:
        _check_pair(cks["base"], post)
    tok = load_tokenizer(tokenizer or _tokenizer_spec(post))
    vt = vocab_table(tokenizer or _tokenizer_spec(post), size=post.rows_of(space))
    tid = resolve_token(token, vt, tok)
    stop = min(ck.rows_of(space) for ck in cks.values())
    nt = neighbor_table(cks, [tid], space=space, k=k, device=device, stop=stop)
    ids = nt.column("neighbor_id").to_numpy()
    texts = vt.column("text").to_numpy(zero_copy_only=False)
    special = vt.column("is_special").to_numpy(zero_copy_only=False)
    return nt.append_column("text", pa.array(texts[ids].tolist(), pa.string())) \
             .append_column("is_special", pa.array(special[ids]))


# ---- diff: everything above, into a run folder ----------------------------------------------------------------

def diff(base: PathLike, post: PathLike, *, out: PathLike, tokenizer: PathLike | None = None,
         threshold: float = 0.95, fold_norm: bool = False, center: bool = False, neighbors_top: int = 20,
         neighbors_of: Sequence[str | int] = (), k: int = 10, device: str | None = None,
         block_rows: int | None = None, allow_pickle: bool = False, progress: bool = False) -> Path:
    """Measure drift from BASE to POST and write the run folder `out`.

    Writes vocab.parquet, drift.parquet, neighbors.parquet (lm_head neighbours, before and after, of the
    `neighbors_top` most drifted tokens and of `neighbors_of`), summary.json and manifest.json.

    Example:
        >>> run = diff("Qwen/Qwen2.5-7B", "my-sft/", out="runs/sft1")
    """
    base_ck = open_checkpoint(base, allow_pickle=allow_pickle)
    post_ck = open_checkpoint(post, allow_pickle=allow_pickle)
    m = measure(base_ck, post_ck, tokenizer=tokenizer, fold_norm=fold_norm, center=center, device=device,
                block_rows=block_rows, progress=progress)
    timer = Timer()
    timer.timings.update(m.timings)
    summary = m.summary(threshold=threshold)
    tok = None
    if neighbors_of:
        tok = load_tokenizer(tokenizer or _tokenizer_spec(post_ck))
    query = [resolve_token(t, m.vocab, tok) for t in neighbors_of]
    top = D.most_drifted(m.drift, m.vocab, neighbors_top).column("token_id").to_pylist() if neighbors_top else []
    query = list(dict.fromkeys(query + top))
    with timer("neighbors"):
        # the drift table holds every lm_head row's norm (unless folded with g, which the neighbours are not)
        norms = None if fold_norm else {w: m.drift.column(f"lm_head_norm_{w}").to_numpy() for w in ("base", "post")}
        nt = neighbor_table({"base": base_ck, "post": post_ck}, query, k=k, device=device,
                            stop=m.info["common_rows"], norms=norms) if query else None
    with open_run(out) as run:
        run.write_table("vocab.parquet", m.vocab)
        run.write_table("drift.parquet", m.drift)
        if nt is not None:
            run.write_table("neighbors.parquet", nt)
        run.update_summary(**summary)
        run.record("diff", arguments={"base": str(base), "post": str(post), "tokenizer": str(tokenizer or ""),
                                      "threshold": threshold, "fold_norm": fold_norm, "center": center,
                                      "neighbors_top": neighbors_top, "neighbors_of": [str(t) for t in neighbors_of],
                                      "k": k},
                   inputs={"base": str(base), "post": str(post), "checkpoints": {"base": m.info["base"],
                                                                                  "post": m.info["post"]}},
                   timings=timer.timings)
    return Path(out)
