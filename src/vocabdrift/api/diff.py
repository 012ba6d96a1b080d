"""`diff`, `vocab`, `neighbors`: the drift between two checkpoints, and the tables that explain it.

I/O at the edges (checkpoints, tokenizers, the run folder); the numbers come from `analyses.drift`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..analyses import drift as D
from ..analyses import tokens as T
from ..analyses.vocab import LANGUAGE_NAMES, arrow_numbers
from ..device import best_device, cpu_threads
from ..errors import VocabdriftError
from ..outputs import run as R
from ..outputs.location import check_out
from ..outputs.run import Timer, open_run
from ..sources.checkpoint import DEFAULT_BLOCK_BYTES, Checkpoint, Kind, open_checkpoint
from ..sources.spec import parse_model_spec
from ..sources.tokenizer import load_tokenizer
from ..sources.vocabulary import _VocabChild, _VocabThread, first_vocab_table, vocab_table

__all__ = ["Measurement", "diff", "first_vocab_table", "measure", "neighbor_table", "neighbors", "resolve_token",
           "vocab", "vocab_table"]

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
        missing = self.info.get("missing_rows") or []
        if missing:  # tokens the tokenizer emits that have no row to compare: a gate fails on them
            s["missing_rows"] = {"count": len(missing), "ids": missing[:1000]}
        if self.info.get("nonfinite_norm"):  # a final norm of NaN/Inf: every logit of that model is NaN
            s["nonfinite_norm"] = list(self.info["nonfinite_norm"])
        if self.info.get("nonfinite_weights"):  # POST's layers holding NaN/Inf: every logit is NaN
            s["nonfinite_weights"] = list(self.info["nonfinite_weights"])[:100]
        s["tied"] = {"base": self.info["base"]["tied"], "post": self.info["post"]["tied"]}
        # one naming of categories: the keys (latin, cyrillic...) and, as labels, the names shown on screen
        s["category_names"] = {c: LANGUAGE_NAMES.get(c, c) for c in s["categories"]}
        # the options that change what a cosine means: shown by the console and the report, not only stored
        s["options"] = {"fold_norm": bool(self.info.get("fold_norm")), "center": bool(self.info.get("center"))}
        centred = [c for c in ("lm_head_cos_centered", "embed_cos_centered") if c in self.drift.column_names]
        if len(centred) == 2:  # the same summary over the mean-centred cosines
            t = self.drift.drop_columns(["lm_head_cos", "embed_cos"])
            t = t.append_column("lm_head_cos", t["lm_head_cos_centered"]).append_column("embed_cos",
                                                                                     t["embed_cos_centered"])
            c = D.summarize(t, self.vocab, threshold=threshold)
            s["centered"] = {k: c[k] for k in ("overall", "reachable", "categories")}
        return s


# ---- the vocabulary table -------------------------------------------------------------------------------------

def _tokenizer_spec(ck: Checkpoint) -> Path | str:
    """Where a checkpoint's tokenizer is: its folder, or the .gguf file itself (`sources.spec`)."""
    return parse_model_spec(ck.path).tokenizer_source()


def vocab(model: PathLike, *, out: PathLike | None = None, trust_remote_code: bool = False) -> pa.Table:
    """Build the vocabulary table; with `out`, write RUN/vocab.parquet.

    Example:
        >>> t = vocab("HuggingFaceTB/SmolLM2-135M-Instruct", out="runs/smol")
        >>> t.num_rows
        49152
    """
    if out is not None:
        check_out(out, models=[model])  # before the table's seconds
        R.refuse_foreign(out, model)
    table = vocab_table(model, trust_remote_code=trust_remote_code)
    if out is not None:
        with open_run(out) as run:
            run.write_table(R.VOCAB, table)
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


def _check_tokenizers(base: Checkpoint, post: Checkpoint) -> None:
    """BASE and POST must give each shared id the same token: rows of different tokens are not a drift. Compared
    from their tokenizer.json files (the same bytes pass at once; a re-saved, identical vocabulary passes; added
    tokens past BASE's are POST's own); GGUF and hub checkpoints are taken as they are."""
    from ..sources.tokenizer import pieces_by_id, tokenizer_json

    files = [tokenizer_json(ck.path) for ck in (base, post)]
    if files[0] is None or files[1] is None or files[0].read_bytes() == files[1].read_bytes():
        return
    a, b = (pieces_by_id(f) for f in files)
    if a is None or b is None:
        return
    differ = [i for i, t in a.items() if i in b and b[i] != t]
    if differ:
        i = differ[0]
        raise VocabdriftError(f"BASE and POST have different tokenizers: {len(differ):,} shared ids name other tokens "
                              f"(id {i}: {a[i]!r} in {files[0]}, {b[i]!r} in {files[1]}); their rows are not the "
                              "same tokens — compare checkpoints of one model")


def _progress(enabled: bool):  # -> rich Progress or a no-op
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=enabled is not True, transient=True)  # a bar on a terminal only


# From this many rows on, the vocabulary table is built in a process of its own (`sources.vocabulary._VocabChild`).
_CHILD_ROWS = 32_768


def _vocab_candidates(b: Checkpoint, p: Checkpoint, tokenizer: PathLike | None) -> list[tuple[str, int]]:
    """(tokenizer, rows) to build the table from, in order: POST's tokenizer first (it knows added tokens), else
    BASE's; padded to the model's row count."""
    pairs = [(tokenizer, p)] if tokenizer is not None else [(_tokenizer_spec(p), p), (_tokenizer_spec(b), b)]
    return [(str(spec), max(ck.rows_of("lm_head"), ck.rows_of("embed"))) for spec, ck in pairs]


def _check_tokens_early(b: Checkpoint, p: Checkpoint, tokenizer: PathLike | None, specs: Sequence[str | int]) -> None:
    """Resolve `--neighbors-of` before the drift pass, so a mistyped token costs seconds, not the pass. Ids need only
    the row count; a text or piece needs the vocabulary table (built here through the cache, which the pass's own
    build then reads back)."""
    n = min(min(b.rows_of(k), p.rows_of(k)) for k in ("lm_head", "embed"))
    if all(T.is_id(s) for s in specs):
        T.resolve_tokens(list(specs), T.TokenIndex(n, {}, {}))
        return
    table = first_vocab_table(_vocab_candidates(b, p, tokenizer)).slice(0, n)
    tok = load_tokenizer(tokenizer or _tokenizer_spec(p))
    T.resolve_tokens(list(specs), T.TokenIndex.from_table(table, encode=T.encoder_of(tok)))


def _start_vocab(b: Checkpoint, p: Checkpoint, tokenizer: PathLike | None) -> _VocabThread | _VocabChild:
    """Start building the table: POST's tokenizer first (it knows added tokens), else BASE's; padded to the
    model's row count. In a child process from _CHILD_ROWS rows on (cached or not), else on a thread."""
    candidates = _vocab_candidates(b, p, tokenizer)
    if max(size for _, size in candidates) < _CHILD_ROWS:
        return _VocabThread(candidates)
    # From the cache too: read on a thread beside the pass, the cache (its key hashes tokenizer.json and imports
    # tokenizers and pyarrow.parquet, holding the GIL) kept the pass's reads waiting: 4.5-4.7 s against 3.6-4.6 s
    # from the child (a cold `measure`, 152K rows).
    return _VocabChild(candidates)


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
        if tokenizer is None:  # a tokenizer named by the user is the user's word
            _check_tokenizers(b, p)
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
            broken = np.zeros(n, dtype=bool)  # this matrix's rows holding NaN/Inf: attributed to it, not the other
            task = bar.add_task(f"{kind} rows", total=n)
            sb = torch.zeros(b.hidden_size, dtype=torch.float64, device=dev)
            sp = torch.zeros_like(sb)
            if fused[kind]:
                for s, st_np in fused_stats(b, p, kind, n, fused_step):
                    e = s + len(st_np["cos"])
                    broken[s:e] |= ~(np.isfinite(st_np["norm_base"]) & np.isfinite(st_np["norm_post"]))
                    for k, v in st_np.items():
                        out[k][s:e] = v
                    bar.advance(task, e - s)
            else:
                for s, rb, rp in _paired_blocks(b, p, kind, n, step, dev, scale(kind)):
                    e = s + len(rb)
                    st = D.row_stats(rb, rp, scratch=scratch)
                    # A NaN or Inf in a row makes its norm non-finite; so does a finite row too large to square in
                    # float32 (values of 1e30): those rows are told apart by their values and measured in float64
                    odd = ~(torch.isfinite(st["norm_base"]) & torch.isfinite(st["norm_post"]))
                    if bool(odd.any()):
                        i = odd.nonzero().squeeze(1)
                        bad_i = ~(torch.isfinite(rb[i]).all(1) & torch.isfinite(rp[i]).all(1))
                        big = i[~bad_i]
                        if len(big):
                            st64 = D.row_stats(rb[big].double(), rp[big].double())
                            for k, v in st64.items():
                                st[k][big] = v.float()
                        bad = np.zeros(len(rb), dtype=bool)
                        bad[i[bad_i].cpu().numpy()] = True
                        if bad.any():  # reported, and zeroed so they cannot poison the sums
                            broken[s:e] |= bad
                            torch.nan_to_num(rb, nan=0.0, posinf=0.0, neginf=0.0, out=rb)
                            torch.nan_to_num(rp, nan=0.0, posinf=0.0, neginf=0.0, out=rp)
                    for k, v in st.items():
                        out[k][s:e] = v.cpu().numpy()
                    if center:
                        sb += rb.sum(0, dtype=torch.float64)
                        sp += rp.sum(0, dtype=torch.float64)
                    bar.advance(task, len(rb))
            out["cos"][broken] = np.nan
            nonfinite |= broken
            cols.update({f"{kind}_{k}": v for k, v in out.items()})
            cols[f"{kind}_nonfinite"] = broken
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
                cc[cols[f"{kind}_nonfinite"]] = np.nan
                cols[f"{kind}_cos_centered"] = cc

    with timer("vocab (not overlapped)"):
        full = job.result()
        vt = full.slice(0, n)
    with timer("weights"):
        health = _health(b, p, full, n, added)
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
        log.warning("%d rows hold NaN or Inf (first: %s); they count as drifted, below every threshold",
                    int(nonfinite.sum()), np.flatnonzero(nonfinite)[:5].tolist())
    info = {"base": b.describe(), "post": p.describe(), "common_rows": n, "added_tokens": added, **health,
            "fold_norm": fold_norm, "center": center, "device": str(dev),
            "block_rows": {k: fused_step if fused[k] else step for k in kinds}}
    return Measurement(vocab=vt, drift=table, info=info, timings=timer.timings)


def _health(b: Checkpoint, p: Checkpoint, vocab: pa.Table, n: int, added: Sequence[int]) -> dict[str, list[Any]]:
    """What makes the pair's verdict fail whatever the cosines (`gate.model_problems` reads it back from the
    summary): tokens the tokenizer can emit past the rows both models have (a POST with no lm_head rows, or 390 for
    a 400-token tokenizer, must fail a gate, not pass it), a NaN/Inf final norm, and a NaN/Inf in any other weight
    of POST (every logit would be NaN). Each is said in a warning too."""
    special = vocab.column("is_special").to_numpy(zero_copy_only=False).astype(bool)
    past = np.flatnonzero(~special[n:]) + n
    missing = past[~np.isin(past, np.asarray(added, dtype=np.int64))].tolist()
    broken_norm = [name for name, ck in (("base", b), ("post", p))
                   if (w := ck.final_norm()) is not None and not np.isfinite(w).all()]
    judged = {t.name for t in p.tensors.values()}  # the vocabulary rows and the norm are judged on their own
    broken_weights = [t for t in p.nonfinite_tensors() if t not in judged]
    if missing:
        log.warning("%d tokens of the tokenizer have no row in both models (first id %d): they fail every gate",
                    len(missing), missing[0])
    if broken_norm:
        log.warning("the final norm of %s holds NaN or Inf: every logit of that model is NaN",
                    " and ".join(broken_norm))
    if broken_weights:
        log.warning("POST's weights hold NaN or Inf in %d tensors (first: %s): every logit is NaN",
                    len(broken_weights), broken_weights[0])
    return {"missing_rows": missing, "nonfinite_norm": broken_norm, "nonfinite_weights": broken_weights}


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

    dev = best_device(device)
    found = []
    for name, ck in checkpoints.items():
        nid, ncos = _neighbor_rows(ck, space, list(ids), k, dev, stop, (norms or {}).get(name))
        found += [(name, tid, nid[qi], ncos[qi]) for qi, tid in enumerate(ids)]
    return _neighbors_as_table(found, space)


def _neighbors_as_table(found: Sequence[tuple[str, int, np.ndarray, np.ndarray]], space: Kind) -> pa.Table:
    """neighbors.parquet rows from (model, token id, neighbour ids, their cosines) best first: ranks from 1, and
    no padding of a top-k (id -1) or row without direction (cosine below -1) ever listed as a neighbour."""
    import pyarrow as pa

    cols: dict[str, list[Any]] = {"token_id": [], "space": [], "model": [], "rank": [], "neighbor_id": [], "cos": []}
    for name, tid, nid, ncos in found:
        for r, (i, c) in enumerate(zip(nid.tolist(), ncos.tolist(), strict=True)):
            if i < 0 or not c >= -1.0:
                continue
            for key, v in (("token_id", int(tid)), ("space", space), ("model", name), ("rank", r + 1),
                           ("neighbor_id", int(i)), ("cos", float(c))):
                cols[key].append(v)
    return pa.table({"token_id": pa.array(cols["token_id"], pa.int64()), "space": pa.array(cols["space"], pa.string()),
                     "model": pa.array(cols["model"], pa.string()), "rank": pa.array(cols["rank"], pa.int32()),
                     "neighbor_id": pa.array(cols["neighbor_id"], pa.int64()),
                     "cos": pa.array(cols["cos"], pa.float32())})


def _lazy_encoder(spec: PathLike) -> Callable[[str], list[int]]:
    """The tokenizer's encoder, loaded on first use: most token specs resolve against the vocabulary table alone,
    and loading a tokenizer costs the seconds of importing transformers."""
    loaded: list[Callable[[str], list[int]]] = []

    def encode(text: str) -> list[int]:
        if not loaded:
            loaded.append(T.encoder_of(load_tokenizer(spec)))
        return loaded[0](text)

    return encode


def _neighbor_table_np(cks: dict[str, Checkpoint], tid: int, *, space: Kind, k: int, stop: int) -> pa.Table:
    """`neighbor_table` of one token, in numpy (`drift.topk_cosine_np`)."""
    found = []
    for name, ck in cks.items():
        step = max(1, DEFAULT_BLOCK_BYTES // (4 * ck.hidden_size))
        blocks = ((s, ck.rows_np(space, s, min(stop, s + step))) for s in range(0, stop, step))
        ids, cos = D.topk_cosine_np(ck.rows_np(space, tid, tid + 1), blocks, k, exclude=tid)
        if len(ids) == 0:
            log.warning("%s: the %s row of token %d holds NaN/Inf or is zero: it has no direction, so no "
                        "neighbours", ck.path, space, tid)
        found.append((name, tid, ids, cos))
    return _neighbors_as_table(found, space)


def resolve_token(token: str | int, vocab: pa.Table, tokenizer: Any | None = None) -> int:
    """A token named by the one rule (`analyses.tokens.TOKEN_RULE`) against a vocabulary table (and a tokenizer's
    encoder, when given)."""
    return T.resolve_token(token, T.TokenIndex.from_table(vocab, encode=T.encoder_of(tokenizer)
                                                          if tokenizer is not None else None))


def neighbors(model: PathLike, token: str | int, *, base: PathLike | None = None, space: Kind = "lm_head",
              k: int = 10, tokenizer: PathLike | None = None, device: str | None = None,
              allow_pickle: bool = False) -> pa.Table:
    """The k nearest neighbours of a token by cosine in `space`; with `base`, before and after.

    Returns a table: model, rank, neighbor_id, text, is_special, category, cos.
    """
    import pyarrow as pa

    if k < 1:
        raise VocabdriftError(f"-k {k}: ask for at least one neighbour")
    post = open_checkpoint(model, allow_pickle=allow_pickle)
    cks = {"post": post} if base is None else {"base": open_checkpoint(base, allow_pickle=allow_pickle), "post": post}
    if base is not None:
        _check_pair(cks["base"], post)
    spec = tokenizer or _tokenizer_spec(post)
    vt = vocab_table(spec, size=post.rows_of(space))  # cached per tokenizer: no tokenizer is loaded to read it
    tid = T.resolve_token(token, T.TokenIndex.from_table(vt, encode=_lazy_encoder(spec)))  # before any row is read
    stop = min(ck.rows_of(space) for ck in cks.values())
    if tid >= stop:
        raise VocabdriftError(f"token {tid} has no {space} row (the matrix has {stop} rows)")
    if device is not None:  # asked for a device: the streaming pass of `diff`
        nt = neighbor_table(cks, [tid], space=space, k=min(k, stop - 1), device=device, stop=stop)
    else:  # one row against all: a matrix-vector product, bound by reading; numpy spares torch's start-up
        nt = _neighbor_table_np(cks, tid, space=space, k=k, stop=stop)
    ids = nt.column("neighbor_id").to_numpy()
    texts = vt.column("text").to_numpy(zero_copy_only=False)
    special = vt.column("is_special").to_numpy(zero_copy_only=False)
    cats = vt.column("category").combine_chunks().cast("string").to_numpy(zero_copy_only=False)
    return nt.append_column("text", pa.array(texts[ids].tolist(), pa.string())) \
             .append_column("is_special", pa.array(special[ids])) \
             .append_column("category", pa.array(cats[ids].tolist(), pa.string()))


# ---- collapsed rows -------------------------------------------------------------------------------------------

def _collapse(b: Checkpoint, p: Checkpoint, m: Measurement) -> tuple[pa.Table, dict[str, Any]]:
    """Groups of near-identical lm_head rows in BASE and in POST (`analyses.collapse`): the drift table with
    `lm_head_group_{base,post}` and `lm_head_group_size_{base,post}` added, and summary["collapse"] (per model, and
    the rows that collapsed during post-training against those that already were, per category)."""
    import pyarrow as pa

    from ..analyses.collapse import collapse_change, collapse_summary, collapsed_groups
    from ..analyses.vocab import token_label

    n = m.info["common_rows"]
    cats = m.vocab.column("category").combine_chunks().cast("string").to_numpy(zero_copy_only=False)[:n]
    found = {}
    for name, ck in (("base", b), ("post", p)):
        kind: Kind = "embed" if ck.tied else "lm_head"
        found[name] = collapsed_groups(lambda ck=ck, kind=kind: ((s, t.numpy()) for s, t in
                                                                  ck.iter_blocks(kind, stop=n)))
    drift = m.drift
    for name, c in found.items():
        drift = drift.append_column(f"lm_head_group_{name}", pa.array(c.group, pa.int64())) \
                     .append_column(f"lm_head_group_size_{name}", pa.array(c.size, pa.int32()))
    change = collapse_change(found["base"], found["post"])
    by_cat: dict[str, dict[str, int]] = {}
    for key in ("new", "already", "released"):
        for cat in np.unique(cats[change[key]]).tolist():
            by_cat.setdefault(cat, {"new": 0, "already": 0, "released": 0})[key] = int((cats[change[key]] == cat).sum())
    texts = m.vocab.column("text").to_numpy(zero_copy_only=False)
    examples = {f"{key}_tokens": [token_label(str(texts[i]), int(i)) for i in np.flatnonzero(change[key])[:12]]
                for key in ("new", "already")}  # a few, as the console and the report show them
    summary = {"lm_head": {"base": collapse_summary(found["base"], cats), "post": collapse_summary(found["post"], cats),
                           **{key: int(v.sum()) for key, v in change.items()},
                           "new_ids": np.flatnonzero(change["new"]).tolist()[:1000],
                           "already_ids": np.flatnonzero(change["already"]).tolist()[:1000], **examples,
                           "categories": by_cat}}
    return drift, summary


# ---- diff: everything above, into a run folder ----------------------------------------------------------------

def diff(base: PathLike, post: PathLike, *, out: PathLike, tokenizer: PathLike | None = None,
         threshold: float = 0.95, fold_norm: bool = False, center: bool = False, neighbors_top: int = 20,
         neighbors_of: Sequence[str | int] = (), k: int = 10, device: str | None = None,
         block_rows: int | None = None, allow_pickle: bool = False, progress: bool = False,
         force: bool = False, collapse: bool = True) -> Path:
    """Measure drift from BASE to POST and write the run folder `out`.

    Writes vocab.parquet, drift.parquet, neighbors.parquet (lm_head neighbours, before and after, of the
    `neighbors_top` most drifted tokens and of `neighbors_of`), summary.json and manifest.json.

    With `collapse` (the default; about 2 s per model for the 151,936 x 896 lm_head of Qwen2.5-0.5B), groups of
    near-identical lm_head rows in BASE and in POST: summary["collapse"] says which tokens collapsed during
    post-training and which already were collapsed in BASE, and drift.parquet gets each row's group in both.

    A run folder holds one BASE/POST pair: writing another pair into a folder that holds results of a previous
    one removes those results (coverage joins, probe, cases, confusion, check, report) and says so. The same
    diff again (same pair, same options) is not recomputed unless `force`.

    Example:
        >>> run = diff("Qwen/Qwen2.5-7B", "my-sft/", out="runs/sft1")
    """
    if not -1.0 <= threshold <= 1.0:  # NaN fails this too
        raise VocabdriftError(f"--threshold {threshold}: a cosine threshold lies in [-1, 1] (0.95, say)")
    check_out(out, models=[base, post, tokenizer])  # before anything is read: never into a model folder
    arguments = {"base": str(base), "post": str(post), "tokenizer": str(tokenizer or ""), "threshold": threshold,
                 "fold_norm": fold_norm, "center": center, "neighbors_top": neighbors_top,
                 "neighbors_of": [str(t) for t in neighbors_of], "k": k, **({"collapse": True} if collapse else {})}
    if not force and Path(out).is_dir():
        done = R.Run(out)
        pair = done.pair() or {}
        if pair.get("key") == R.pair_key(R.model_identity(base), R.model_identity(post)) \
                and done.holds(R.DRIFT, command="diff", arguments=arguments):
            log.warning("%s already holds this diff (same BASE, POST and options); nothing recomputed "
                        "(--force recomputes it)", out)
            return Path(out)
    base_ck = open_checkpoint(base, allow_pickle=allow_pickle)
    post_ck = open_checkpoint(post, allow_pickle=allow_pickle)
    if neighbors_of:
        _check_tokens_early(base_ck, post_ck, tokenizer, neighbors_of)
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
    if nt is not None:  # neighbour intrusion: special, markup and byte rows among the neighbours, before and after
        summary["neighbors"] = D.summarize_intrusion(D.neighbor_intrusion(nt, m.vocab), m.vocab, k=k)
    if collapse:
        with timer("collapse"):
            m.drift, summary["collapse"] = _collapse(base_ck, post_ck, m)
    with open_run(out) as run:
        removed = run.set_pair(base, post)  # another pair's results go before this pair's are written
        if removed:
            log.warning("%s held results of another BASE/POST pair: removed %s; rerun those commands for this "
                        "pair", out, ", ".join(removed))
        run.write_table(R.VOCAB, m.vocab)
        run.write_table(R.DRIFT, m.drift)
        if nt is not None:
            run.write_table(R.NEIGHBORS, nt)
        run.update_summary(**summary)
        run.record("diff", arguments=arguments,
                   inputs={"base": str(base), "post": str(post), "checkpoints": {"base": m.info["base"],
                                                                                  "post": m.info["post"]}},
                   timings=timer.timings)
    return Path(out)
