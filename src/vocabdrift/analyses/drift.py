"""Drift of vocabulary rows between two checkpoints: pure functions over tensors and tables.

The row of token t in lm_head is the direction the model pushes its hidden state toward to say t. Its cosine to
the pre-trained row is the headline (as in the published investigation); L2 and both norms say whether it shrank
(weight decay) or turned (push-down gradients). A mean-centred cosine removes the shared direction that rows of
never-targeted tokens drift toward together (docs/ARCHITECTURE.md, "Why a never-targeted row drifts").
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

DRIFT_COLUMNS = ("lm_head_cos", "lm_head_l2", "lm_head_norm_base", "lm_head_norm_post",
                 "embed_cos", "embed_l2", "embed_norm_base", "embed_norm_post")
_EPS = 1e-12
_COSINE_LAW_MAX = 4.0  # (|b|^2 + |p|^2 + |p-b|^2) / 2|b||p| above which row_stats takes the direct dot


def row_stats(base: torch.Tensor, post: torch.Tensor, *, scratch: torch.Tensor | None = None
              ) -> dict[str, torch.Tensor]:
    """Per-row cosine, L2 distance and norms of two blocks of rows.

    Args:
        base, post: float32 (n, H) on any device; not modified.
        scratch: optional float32 buffer of at least (n, H) for the two elementwise temporaries (reused across
            blocks it saves two allocations per block, the largest cost on a CPU).
    Returns:
        {"cos", "l2", "norm_base", "norm_post"}: float32 (n,) on the same device. A row with a zero norm has
        cosine NaN (undefined), not 0, so it is never mistaken for a drifted row.
    """
    import torch

    tmp = scratch[: base.shape[0]] if scratch is not None else None
    nb = torch.linalg.vector_norm(base, dim=1)
    npo = torch.linalg.vector_norm(post, dim=1)
    l2 = torch.linalg.vector_norm(torch.sub(post, base, out=tmp), dim=1)
    # The dot product by the law of cosines, from the three norms: one pass over the rows fewer than a product
    # and its sum (the costliest part of a CPU diff). Its error is about eps * (|b|^2 + |p|^2 + |p-b|^2) / 2|b||p|
    # in cosine, under 1e-6 while the two norms are within ~3x of each other; rows past that (a row that grew
    # or shrank by more) get the direct dot product.
    b2, p2, d2 = (x.double() ** 2 for x in (nb, npo, l2))
    denom = nb.double() * npo.double()
    dot = (b2 + p2 - d2) * 0.5
    far = (b2 + p2 + d2) > _COSINE_LAW_MAX * 2 * denom
    if bool(far.any()):
        i = far.nonzero().squeeze(1)
        dot[i] = torch.mul(base[i], post[i]).sum(dim=1, dtype=torch.float64)
    cos = torch.where(denom > _EPS, dot / denom.clamp_min(_EPS), torch.full_like(dot, float("nan"))).float()
    return {"cos": cos.clamp(-1.0, 1.0), "l2": l2, "norm_base": nb, "norm_post": npo}


# ---- the fused bf16 pass (CPU) -------------------------------------------------------------------------------

def bf16_row_sums(base: np.ndarray, post: np.ndarray) -> np.ndarray:
    """Per-row |b|², |p|², |p-b|² and b·p of two blocks of bf16 rows given as their raw bits, in float64.

    Why: on a CPU, `row_stats` makes seven passes over float32 copies of the rows (two conversions, a difference,
    three norms), and at a 152K x 3,584 vocabulary that arithmetic, not the disk, bounded a diff. This reads each
    pair of rows once, widening the bf16 bits to float32 (exact) and summing in float64, compiled by numba:
    ~5x less CPU (bench/diff_bench.py). The direct product b·p also makes the cosine exact where `row_stats`
    derives it from the three norms.

    Args:
        base, post: uint16 (n, H), the bf16 bit patterns (a bf16 tensor viewed as 16-bit integers).
    Returns:
        float64 (n, 4): columns |b|², |p|², |p-b|², b·p.
    """
    if base.shape != post.shape or base.dtype != np.uint16 or post.dtype != np.uint16:
        raise ValueError("bf16_row_sums takes two uint16 arrays of one shape (bf16 bits)")
    out = np.empty((base.shape[0], 4), dtype=np.float64)
    _bf16_kernel()(np.ascontiguousarray(base), np.ascontiguousarray(post), out)
    return out


def stats_from_sums(sums: np.ndarray) -> dict[str, np.ndarray]:
    """`row_stats`'s outputs (float32 numpy) from `bf16_row_sums`'s; a zero-norm row has cosine NaN."""
    sb, sp, sd, dot = sums.T
    denom = np.sqrt(sb * sp)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > _EPS, dot / np.maximum(denom, _EPS), np.nan)
    return {"cos": np.clip(cos, -1.0, 1.0).astype(np.float32), "l2": np.sqrt(sd).astype(np.float32),
            "norm_base": np.sqrt(sb).astype(np.float32), "norm_post": np.sqrt(sp).astype(np.float32)}


def _bf16_sums(b: np.ndarray, p: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover (compiled by numba)
    n, h = b.shape
    wb = np.empty(h, np.uint32)
    wp = np.empty(h, np.uint32)
    fb = wb.view(np.float32)
    fp = wp.view(np.float32)
    for i in range(n):
        for j in range(h):  # bf16 is the top half of a float32
            wb[j] = np.uint32(b[i, j]) << 16
            wp[j] = np.uint32(p[i, j]) << 16
        sb = sp = sd = dot = 0.0
        for j in range(h):
            x = np.float64(fb[j])
            y = np.float64(fp[j])
            d = y - x
            sb += x * x
            sp += y * y
            sd += d * d
            dot += x * y
        out[i, 0] = sb
        out[i, 1] = sp
        out[i, 2] = sd
        out[i, 3] = dot


@functools.cache
def _bf16_kernel() -> Any:
    """`_bf16_sums` compiled (fastmath: the sums vectorise; nogil: the reading thread runs beside it). Cached on
    disk by numba, so only the first process pays the compilation (~2 s)."""
    import numba

    return numba.njit(nogil=True, fastmath=True, cache=True)(_bf16_sums)


def centered_cos(base: torch.Tensor, post: torch.Tensor, mean_base: torch.Tensor,
                 mean_post: torch.Tensor) -> torch.Tensor:
    """Cosine of the rows after subtracting each matrix's mean row (H,): float32 (n,)."""
    return row_stats(base - mean_base, post - mean_post)["cos"]


def topk_cosine(queries: torch.Tensor, blocks: Iterable[tuple[int, torch.Tensor]], k: int,
                *, exclude_self: Sequence[int] | None = None, row_norms: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest rows by cosine, streaming over a matrix in blocks.

    Args:
        queries: float32 (q, H). blocks: (start, rows (n, H)) covering the matrix.
        exclude_self: for each query, its own row id, left out of its neighbours.
        row_norms: every row's L2 norm, when already known (a drift pass computed them): saves a pass per block.
    Returns:
        ids int64 (q, k) and cosines float32 (q, k), best first.
    """
    import torch

    qn = queries / torch.linalg.vector_norm(queries, dim=1, keepdim=True).clamp_min(_EPS)
    best_v = torch.full((queries.shape[0], k), -2.0, device=queries.device)
    best_i = torch.full((queries.shape[0], k), -1, dtype=torch.long, device=queries.device)
    self_ids = None if exclude_self is None else torch.as_tensor(list(exclude_self), device=queries.device)
    known = None if row_norms is None else torch.tensor(row_norms, dtype=torch.float32, device=queries.device)
    for start, rows in blocks:
        # divide the (q, n) products by the row norms rather than normalise the (n, H) block: one pass less over it
        norms = (torch.linalg.vector_norm(rows, dim=1) if known is None else
                 known[start:start + rows.shape[0]]).clamp_min(_EPS)
        sims = torch.nan_to_num((qn @ rows.T).div_(norms), nan=-2.0)  # (q, n)
        ids = torch.arange(start, start + rows.shape[0], device=queries.device)
        if self_ids is not None:
            sims = sims.masked_fill(ids[None, :] == self_ids[:, None], -2.0)
        v = torch.cat([best_v, sims], dim=1)
        i = torch.cat([best_i, ids.expand(queries.shape[0], -1)], dim=1)
        top = v.topk(min(k, v.shape[1]), dim=1)
        best_v, best_i = top.values, torch.gather(i, 1, top.indices)
    return best_i.cpu().numpy(), best_v.float().cpu().numpy()


def topk_cosine_np(query: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]], k: int, *, exclude: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`topk_cosine` of one query row in numpy, in float64 (a finite row of 1e30s has a cosine too): a single
    lookup is a matrix-vector product, bound by reading the rows, where torch adds only its start-up.

    Rows that hold NaN/Inf or are zero have no direction and are never neighbours, so fewer than k may come back.
    Returns ids int64 (m,) and cosines float32 (m,), best first, m <= k."""
    q = query.astype(np.float64).ravel()
    qn = np.linalg.norm(q)
    if not np.isfinite(qn) or qn == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    q /= qn
    best_i, best_v = np.zeros(0, np.int64), np.zeros(0, np.float64)
    for start, rows in blocks:
        r = rows.astype(np.float64)
        norms = np.linalg.norm(r, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            sims = (r @ q) / norms
        ids = np.arange(start, start + len(r))
        keep = np.isfinite(sims) & (norms > 0) & (ids != (-1 if exclude is None else exclude))
        v, i = np.concatenate([best_v, sims[keep]]), np.concatenate([best_i, ids[keep]])
        top = np.argsort(-v, kind="stable")[:k]  # stable: ties keep the lower id, as a reader expects
        best_v, best_i = v[top], i[top]
    return best_i, np.clip(best_v, -1.0, 1.0).astype(np.float32)


# ---- summaries over the drift table ---------------------------------------------------------------------------

def undefined_rows(drift: pa.Table, space: str) -> np.ndarray:
    """Rows of `space` whose cosine is undefined although the row moved: a row that became zero (in POST or in
    BASE) or holds NaN/Inf. Bool (n,).

    Why: a destroyed row has no direction to compare, so its cosine is NaN; left out, an all-zero lm_head would
    leave "no tokens to judge" and pass every gate. Such a row counts as drifted, below every threshold. A row zero
    in both checkpoints did not move (its L2 distance is 0) and stays out: padding rows are often all zero.
    """
    cos = drift.column(f"{space}_cos").to_numpy(zero_copy_only=False)
    undefined = ~np.isfinite(cos)
    l2_col = f"{space}_l2"
    if l2_col in drift.column_names:
        l2 = drift.column(l2_col).to_numpy(zero_copy_only=False)
        undefined &= ~(l2 == 0)  # NaN distance (a broken row) counts; a zero distance (unchanged) does not
    # the rows broken in this space's matrix (older tables: in either matrix)
    broken = f"{space}_nonfinite" if f"{space}_nonfinite" in drift.column_names else "nonfinite"
    if l2_col not in drift.column_names and broken in drift.column_names:  # without distances: only broken rows
        undefined &= drift.column(broken).to_numpy(zero_copy_only=False).astype(bool)
    if broken in drift.column_names:
        undefined |= drift.column(broken).to_numpy(zero_copy_only=False).astype(bool)
    return undefined


def _stats(cos: np.ndarray, threshold: float, undefined: np.ndarray | None = None) -> dict[str, Any]:
    """One summary block. `undefined` rows (see `undefined_rows`) count as tokens below every threshold; the mean
    and minimum are over the rows with a cosine."""
    n_undef = int(undefined.sum()) if undefined is not None else 0
    cos = cos[np.isfinite(cos)]
    n = int(cos.size) + n_undef
    if cos.size == 0:
        return {"tokens": n, "mean_cos": None, "min_cos": None, "below_0.95": n_undef, "below_0.90": n_undef,
                "below_threshold": n_undef, "undefined": n_undef}
    return {"tokens": n, "mean_cos": round(float(cos.mean()), 6), "min_cos": round(float(cos.min()), 6),
            "below_0.95": int((cos < 0.95).sum()) + n_undef, "below_0.90": int((cos < 0.90).sum()) + n_undef,
            "below_threshold": int((cos < threshold).sum()) + n_undef, "undefined": n_undef}


def summarize(drift: pa.Table, vocab: pa.Table, *, threshold: float = 0.95) -> dict[str, Any]:
    """summary.json's drift keys: overall and per category, for lm_head and embed.

    "overall" counts every non-special token (special and padding rows are often untrained and would only add
    noise); "reachable" counts the tokens a text can produce, the set a coverage repair is judged on. Category
    "special" is reported on its own. Rows whose cosine is undefined because they became zero or NaN count as
    tokens below every threshold (each block's "undefined"); "undefined_rows" lists their ids per space.
    """
    d = {c: drift.column(c).to_numpy(zero_copy_only=False) for c in ("lm_head_cos", "embed_cos")}
    ids = drift.column("token_id").to_numpy()
    special = vocab.column("is_special").to_numpy(zero_copy_only=False)[ids]
    reachable = vocab.column("reachable").to_numpy(zero_copy_only=False)[ids]
    cats = np.asarray(vocab.column("category").combine_chunks().cast("string").to_pylist(), dtype=object)[ids]

    undef = {space: undefined_rows(drift, space) for space in ("lm_head", "embed")}

    def block(mask: np.ndarray) -> dict[str, Any]:
        return {space: _stats(d[f"{space}_cos"][mask], threshold, undef[space][mask]) for space in ("lm_head", "embed")}

    out: dict[str, Any] = {"threshold": threshold, "overall": block(~special), "reachable": block(reachable & ~special)}
    out["categories"] = {c: block(cats == c) for c in dict.fromkeys(cats.tolist())}
    # rows that are no tokens: out of "overall" and "reachable" (they are special), counted here ("padding_rows",
    # "unused_rows")
    from .vocab import NOT_TOKENS

    for c in NOT_TOKENS:
        out[f"{c}_rows"] = int((cats == c).sum())
    if "nonfinite" in drift.column_names:
        out["nonfinite_rows"] = ids[drift.column("nonfinite").to_numpy(zero_copy_only=False)].tolist()
    out["undefined_rows"] = {space: ids[u].tolist()[:1000] for space, u in undef.items()}  # the first 1,000
    return out


def most_drifted(drift: pa.Table, vocab: pa.Table, n: int, *, space: str = "lm_head",
                 include_special: bool = False) -> pa.Table:
    """The n rows with the lowest cosine in `space`, joined with their text and category."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = drift.join(vocab.select(["token_id", "text", "category", "is_special", "reachable"]), "token_id")
    if not include_special:
        t = t.filter(pc.invert(t.column("is_special")))
    undef = pa.array(undefined_rows(t, space))
    # the rows without a cosine that moved come first (below every threshold); unchanged zero rows are left out
    t = t.filter(pc.or_(pc.is_finite(t.column(f"{space}_cos")), undef))
    t = t.sort_by([(f"{space}_cos", "ascending"), ("token_id", "ascending")])  # NaN sorts last ...
    if t.num_rows:
        u = undefined_rows(t, space)
        t = pa.concat_tables([t.filter(pa.array(u)), t.filter(pa.array(~u))])  # ... so they are moved first
    return t.slice(0, n).combine_chunks() if t.num_rows else pa.table({c: [] for c in t.column_names})


def most_drifted_ids(drift: pa.Table, vocab: pa.Table | None, n: int | None = None, *,
                     space: str = "lm_head") -> list[int]:
    """The token ids of `most_drifted` (THE definition of "most drifted"), for callers that need only the order:
    `probe --run`, the report's tables, the lab. `vocab` may be None (no special tokens known) or hold only
    token_id and is_special; `n` None means every judged row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if vocab is None:
        ids, special = drift.column("token_id"), pa.array(np.zeros(drift.num_rows, dtype=bool))
    else:
        ids, special = vocab.column("token_id"), pc.fill_null(vocab.column("is_special"), False)
    k = len(ids)
    view = pa.table({"token_id": ids, "text": pa.array([""] * k), "category": pa.array([""] * k),
                     "is_special": special, "reachable": pa.array(np.ones(k, dtype=bool))})
    top = most_drifted(drift, view, drift.num_rows if n is None else n, space=space)
    return [int(t) for t in top.column("token_id").to_pylist()] if top.num_rows else []


# ---- neighbour intrusion --------------------------------------------------------------------------------------

# Categories that intrude on a word's neighbourhood when its row drifts (the published case: after SFT a name's
# lm_head neighbours filled with tool-call markers and noise tokens): special-like rows, markup, byte pieces.
INTRUDER_CATEGORIES: tuple[str, ...] = ("special", "unused", "padding", "markup", "byte")


def neighbor_intrusion(neighbors: pa.Table, vocab: pa.Table, *, space: str = "lm_head") -> pa.Table:
    """Per query token of a neighbours table (`neighbors.parquet`'s columns), the share of intruders
    (INTRUDER_CATEGORIES) among its neighbours and the share of its own category, one column pair per model.

    Why: a drifted row's cosine says it moved, not where to; a neighbourhood that fills with special, markup and
    byte rows says it moved toward the shared "push-down" direction that those never-targeted rows sit in.

    Returns:
        token_id, category, then `intrusion_{model}` and `own_{model}` (float) for each model in the table's
        order, and `intrusion_change` / `own_change` (last model minus first) when there are two models.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    nt = neighbors.filter(pc.equal(neighbors.column("space"), space)) \
        if "space" in neighbors.column_names else neighbors
    cats = np.asarray(vocab.column("category").combine_chunks().cast("string").to_pylist(), dtype=object)
    vid = vocab.column("token_id").to_numpy()
    cat_of = np.full(int(vid.max()) + 1 if len(vid) else 0, "", dtype=object)
    cat_of[vid] = cats
    q = nt.column("token_id").to_numpy()
    nid = nt.column("neighbor_id").to_numpy()
    models = list(dict.fromkeys(nt.column("model").to_pylist()))
    mo = np.asarray(nt.column("model").to_pylist(), dtype=object)
    ok = (nid >= 0) & (nid < len(cat_of))
    ncat = np.where(ok, cat_of[np.clip(nid, 0, max(len(cat_of) - 1, 0))], "")
    intruder = np.isin(ncat, INTRUDER_CATEGORIES)
    queries = list(dict.fromkeys(q.tolist()))
    out: dict[str, list] = {"token_id": queries, "category": [str(cat_of[t]) if t < len(cat_of) else ""
                                                              for t in queries]}
    for m in models:
        inn, own = [], []
        for t, c in zip(queries, out["category"], strict=True):
            sel = (q == t) & (mo == m) & ok
            n = int(sel.sum())
            inn.append(float(intruder[sel].mean()) if n else float("nan"))
            own.append(float((ncat[sel] == c).mean()) if n else float("nan"))
        out[f"intrusion_{m}"], out[f"own_{m}"] = inn, own
    if len(models) == 2:
        a, b = models
        out["intrusion_change"] = (np.asarray(out[f"intrusion_{b}"]) - np.asarray(out[f"intrusion_{a}"])).tolist()
        out["own_change"] = (np.asarray(out[f"own_{b}"]) - np.asarray(out[f"own_{a}"])).tolist()
    return pa.table({k: pa.array(v, pa.int64() if k == "token_id" else pa.string() if k == "category"
                                 else pa.float64()) for k, v in out.items()})


def summarize_intrusion(intrusion: pa.Table, vocab: pa.Table, *, k: int, top: int = 50) -> dict[str, Any]:
    """summary.json's "neighbors" block: mean intrusion and own-category shares per model over the query tokens,
    their change, and the tokens whose intrusion grew most (with text and category)."""
    rows = intrusion.to_pylist()
    models = [c[len("intrusion_"):] for c in intrusion.column_names
              if c.startswith("intrusion_") and c != "intrusion_change"]

    def mean(col: str) -> float | None:
        v = np.asarray([r[col] for r in rows], dtype=np.float64)
        v = v[np.isfinite(v)]
        return round(float(v.mean()), 6) if v.size else None

    texts = vocab.column("text").to_pylist()
    out: dict[str, Any] = {"k": k, "tokens": len(rows), "intruder_categories": list(INTRUDER_CATEGORIES),
                           "intrusion": {m: mean(f"intrusion_{m}") for m in models},
                           "own_category": {m: mean(f"own_{m}") for m in models}}
    if "intrusion_change" in intrusion.column_names:
        out["intrusion"]["change"] = mean("intrusion_change")
        out["own_category"]["change"] = mean("own_change")
        order = sorted(rows, key=lambda r: (-(r["intrusion_change"] if np.isfinite(r["intrusion_change"])
                                              else -9.0), r["token_id"]))
    else:
        order = rows

    def rnd(x: float) -> float | None:
        return round(float(x), 4) if np.isfinite(x) else None

    out["per_token"] = [{"token_id": r["token_id"], "text": texts[r["token_id"]] if r["token_id"] < len(texts)
                         else "", "category": r["category"],
                         **{c: rnd(r[c]) for c in intrusion.column_names if c not in ("token_id", "category")}}
                        for r in order[:top]]
    return out
