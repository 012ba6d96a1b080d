"""Collapsed rows: groups of (nearly) identical rows over the whole vocabulary, without a V x V matrix.

Rows of tokens that are never a target receive only the shared "push-down" gradient and weight decay, so they
converge to one common direction, and several become (nearly) the same vector: none of those tokens can then be
said apart from the others. This finds them in two passes over blocks of rows:

1. each row, normalised and centred on the mean unit row, is hashed by the signs of its projections on `bits`
   random directions, in `tables` independent tables (near-identical rows share a code in at least one table with
   probability 1 - (1 - (1 - θ/π)^bits)^tables; at cosine 0.9999 and the defaults, a pair is missed about once in
   10^5 or less, and a group is missed only if every one of its pairs is);
2. the rows of buckets holding two rows or more are read again, and every pair in a bucket is confirmed by its
   cosine (buckets too large to compare pairwise are split by further hashing first);

groups are the connected components of the confirmed pairs. Rows that are exactly zero are one group of their own
(they are the same vector). Pure: blocks of rows in, arrays out (tests/test_collapse.py compares it with a brute
force computation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

Blocks = Callable[[], Iterable[tuple[int, np.ndarray]]]  # each call: a fresh pass of (start, float32 rows) blocks

MIN_COS = 0.9999  # "near-identical": bf16 rounding alone leaves identical rows above this
_MAX_BUCKET = 4096  # rows compared pairwise at most; a larger bucket is split by more hashing first


@dataclass(frozen=True)
class Collapse:
    """Per row: `group`, the smallest id of its group (-1 when it is in none), and `size`, the group's size (0 when
    in none). `min_cos` is the cosine a pair needed."""

    group: np.ndarray
    size: np.ndarray
    min_cos: float

    @property
    def collapsed(self) -> np.ndarray:
        """Bool (V,): the row belongs to a group of two or more."""
        return self.size >= 2

    def groups(self) -> int:
        return int(len(np.unique(self.group[self.group >= 0])))


def _unit(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(b, dtype=np.float32)
    if not np.isfinite(b).all():  # one pass; nan_to_num alone makes several
        b = np.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0)
    norm = np.linalg.norm(b, axis=1)
    zero = norm == 0
    return b / np.where(zero, 1.0, norm)[:, None], zero


def _codes(x: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """uint64 sign codes of rows `x` (n, H) on `planes` (tables, H, bits): (n, tables). One product for all the
    tables."""
    t, h, nb = planes.shape
    flat = planes.transpose(1, 0, 2).reshape(h, t * nb)
    bits = ((x @ flat) > 0).reshape(len(x), t, nb)
    weights = (np.uint64(1) << np.arange(nb, dtype=np.uint64))
    return (bits.astype(np.uint64) * weights).sum(axis=2, dtype=np.uint64)


def _buckets(codes: np.ndarray) -> list[np.ndarray]:
    """Positions sharing a code, for codes held by two positions or more (only those are cut out: most codes
    are held by one position)."""
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    cut = np.flatnonzero(np.diff(sc)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(sc)]])
    return [order[a:b] for a, b in zip(starts[ends - starts >= 2].tolist(), ends[ends - starts >= 2].tolist(),
                                       strict=True)]


def collapsed_groups(blocks: Blocks, *, min_cos: float = MIN_COS, bits: int | None = None, tables: int = 6,
                     seed: int = 0) -> Collapse:
    """Groups of rows whose pairwise cosine reaches `min_cos` (connected components), over blocks of rows.

    Memory: the codes (V x tables x 8 bytes) and the rows of shared buckets, never V x V or a second V x H copy.
    `bits` defaults to log2(V) + 6 (16 to 32): chance collisions of unrelated rows then stay near V / 128 pairs per
    table, so the rows read back for confirmation are a few percent of the vocabulary.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if bits is not None and not 0 < bits <= 64:
        raise ValueError("bits must be in 1..64")
    # pass 1: the mean unit row (the hashes are centred on it: rows that share a direction spread apart)
    total, n, h = None, 0, 0
    for _, b in blocks():
        u, _ = _unit(b)
        s = u.sum(axis=0, dtype=np.float64)
        total = s if total is None else total + s
        n += len(u)
        h = u.shape[1]
    if n == 0:
        return Collapse(np.zeros(0, np.int64), np.zeros(0, np.int32), min_cos)
    mean = (total / n).astype(np.float32)
    if bits is None:
        bits = min(32, max(16, int(np.ceil(np.log2(max(n, 2)))) + 6))
    rng = np.random.default_rng(seed)
    planes = rng.standard_normal((tables, h, bits)).astype(np.float32)
    codes = np.empty((n, tables), dtype=np.uint64)
    zero = np.zeros(n, dtype=bool)
    for s, b in blocks():
        u, z = _unit(b)
        codes[s:s + len(u)] = _codes(u - mean, planes)
        zero[s:s + len(u)] = z
    # candidates: rows in a shared bucket of any table (zero rows are grouped apart)
    buckets = [g[~zero[g]] for t in range(tables) for g in _buckets(codes[:, t])]
    buckets = [g for g in buckets if len(g) >= 2]
    cand = np.unique(np.concatenate(buckets)) if buckets else np.zeros(0, np.int64)
    # pass 2: the candidates' unit rows
    pos = np.full(n, -1, dtype=np.int64)
    pos[cand] = np.arange(len(cand))
    rows = np.empty((len(cand), h), dtype=np.float32)
    for s, b in blocks():
        sel = cand[(cand >= s) & (cand < s + len(b))]
        if len(sel):
            rows[pos[sel]] = _unit(np.asarray(b)[sel - s])[0]
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    extra = np.random.default_rng(seed + 1)

    def confirm(ids: np.ndarray, depth: int = 0) -> None:
        if len(ids) > _MAX_BUCKET and depth < 8:  # split by more hashing first
            p = extra.standard_normal((1, h, 16)).astype(np.float32)
            sub = _codes(rows[pos[ids]] - mean, p)[:, 0]
            for g in _buckets(sub):
                confirm(ids[g], depth + 1)
            return
        x = rows[pos[ids]]
        for a in range(0, len(ids), 1024):
            c = x[a:a + 1024] @ x.T  # (chunk, m)
            i, j = np.nonzero(c >= min_cos)
            keep = ids[a + i] < ids[j]
            src.append(ids[a + i][keep])
            dst.append(ids[j][keep])

    seen: set[bytes] = set()
    for g in buckets:
        key = np.sort(g).tobytes()
        if key not in seen:  # the same bucket in several tables is confirmed once
            seen.add(key)
            confirm(np.sort(g))
    z = np.flatnonzero(zero)
    if len(z) >= 2:
        src.append(np.full(len(z) - 1, z[0]))
        dst.append(z[1:])
    if src:
        a, b = np.concatenate(src), np.concatenate(dst)
        graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
        _, label = connected_components(graph, directed=False)
    else:
        label = np.arange(n)
    counts = np.bincount(label, minlength=n)
    size = counts[label].astype(np.int32)
    first = np.full(n, n, dtype=np.int64)
    np.minimum.at(first, label, np.arange(n))
    group = np.where(size >= 2, first[label], -1).astype(np.int64)
    return Collapse(group, np.where(size >= 2, size, 0).astype(np.int32), min_cos)


def collapse_summary(c: Collapse, categories: np.ndarray, *, top: int = 10) -> dict[str, object]:
    """summary.json's block: rows in groups, groups, the largest groups' sizes, and per category the tokens in a
    group. `categories` is the category name per row (V,)."""
    cats = np.asarray(categories, dtype=object)[:len(c.size)]
    col = c.collapsed
    sizes = sorted(((int(c.size[g]), int(g)) for g in np.unique(c.group[col])), reverse=True)
    per = {}
    for cat in dict.fromkeys(cats.tolist()):
        m = cats == cat
        if (m & col).any():
            per[str(cat)] = {"tokens": int(m.sum()), "collapsed": int((m & col).sum())}
    return {"min_cos": c.min_cos, "rows": int(col.sum()), "groups": len(sizes),
            "largest": [{"group": g, "size": s} for s, g in sizes[:top]], "categories": per}


def collapse_change(base: Collapse, post: Collapse) -> dict[str, np.ndarray]:
    """Which rows collapsed during post-training (in no group in BASE, in one in POST), which already were (in a
    group in both) and which came apart (in BASE, not in POST): bool (V,) each."""
    n = min(len(base.size), len(post.size))
    b, p = base.collapsed[:n], post.collapsed[:n]
    return {"new": ~b & p, "already": b & p, "released": b & ~p}
