"""Single-model indicators of under-trained tokens, after Magikarp (Land & Bartolo 2024, cohere-ai/magikarp).

A token that (almost) never occurred in training keeps an output row that only ever received the common "push
down" gradient, so all such rows point the same way. The indicator: remove the unembedding matrix's first principal
component (a direction every row shares), take the mean of rows known to be unused (reserved specials, padding
rows), and measure each row's cosine to that mean. High means "looks like the unused rows". The input embedding norm
is the second indicator: rarely-read rows stay near their (small) initialisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Indicators:
    """Per-token indicators, each (V,) float32; `reference` are the ids the unused mean was taken from."""

    unembed_score: np.ndarray
    embed_norm: np.ndarray
    embed_norm_percentile: np.ndarray
    reference: np.ndarray


Blocks = Callable[[], Iterable[tuple[int, np.ndarray]]]  # each call: a fresh pass of (start, float32 rows) blocks


def _moments(blocks: Blocks) -> tuple[np.ndarray, np.ndarray, int]:
    """One pass: the rows' sum (H,) and Gram matrix (H, H) in float64, and their count."""
    total, gram, n = None, None, 0
    for _, b in blocks():
        b = np.asarray(b, dtype=np.float32)
        g = (b.T @ b).astype(np.float64)  # float32 BLAS for the product, float64 to sum the blocks
        total = b.sum(axis=0, dtype=np.float64) + (0 if total is None else total)
        gram = g if gram is None else gram + g
        n += len(b)
    return total, gram, n


def _component(moments: tuple[np.ndarray, np.ndarray, int]) -> np.ndarray:
    """Lanczos (scipy's `eigsh`) on the H x H covariance: no V x H copy, where a full SVD of a 150K x 4K matrix
    would cost minutes."""
    from scipy.sparse.linalg import eigsh

    total, gram, n = moments
    mean = total / n
    cov = gram / n - np.outer(mean, mean)
    _, vec = eigsh(cov, k=1, which="LA", v0=np.ones(len(cov)))
    return vec[:, 0].astype(np.float32)


def default_reference(embed_norm: np.ndarray, candidates: Sequence[int], *, share: float = 0.001,
                      minimum: int = 4) -> np.ndarray:
    """Unused-token ids: `candidates` (reserved or padding rows) when there are at least two, else the rows with
    the smallest input-embedding norms (share of the vocabulary, at least `minimum`)."""
    cand = np.asarray(sorted(set(int(c) for c in candidates)), dtype=np.int64)
    if len(cand) >= 2:
        return cand
    k = max(minimum, int(len(embed_norm) * share))
    return np.sort(np.argsort(embed_norm, kind="stable")[:k]).astype(np.int64)


def indicators(unembed: np.ndarray, embed: np.ndarray, *, reference: Sequence[int] = ()) -> Indicators:
    """Magikarp's indicators for every token.

    Args:
        unembed: lm_head rows (V, H), float32 (the embedding rows when tied).
        embed: input embedding rows (V, H), float32.
        reference: ids known to be unused; default: see `default_reference`.
    """
    return indicators_blockwise(lambda: [(0, unembed)], lambda: [(0, embed)], reference=reference)


def indicators_blockwise(unembed: Blocks, embed: Blocks, *, reference: Sequence[int] = ()) -> Indicators:
    """`indicators` over blocks of rows, so memory is a block and two (V,) vectors, not the matrices.

    `unembed` and `embed` are called for each pass and yield (start, rows) in order: one pass over the embedding
    (norms), three over the unembedding (moments, the reference rows' mean, the scores).
    """
    norm = np.concatenate([np.linalg.norm(np.asarray(b, dtype=np.float32), axis=1) for _, b in embed()])
    norm = norm.astype(np.float32)
    ref = default_reference(norm, reference)
    pc = _component(_moments(unembed)).astype(np.float64)

    def removed(b: np.ndarray) -> np.ndarray:  # the shared direction taken out of each row
        b = np.asarray(b, dtype=np.float32)
        return b - np.outer(b @ pc, pc).astype(np.float32)

    m = None
    for s, b in unembed():
        sel = ref[(ref >= s) & (ref < s + len(b))] - s
        if len(sel):
            part = removed(b[sel]).sum(axis=0, dtype=np.float64)
            m = part if m is None else m + part
    m = (m / len(ref)).astype(np.float32)
    score = np.concatenate([(ur @ m) / (np.linalg.norm(ur, axis=1) * np.linalg.norm(m) + 1e-30)
                            for ur in (removed(b) for _, b in unembed())]).astype(np.float32)
    order = np.argsort(norm, kind="stable")
    pct = np.empty(len(norm), dtype=np.float32)
    pct[order] = (np.arange(len(norm), dtype=np.float32) + 0.5) / len(norm) * 100.0
    return Indicators(score, norm, pct, ref)


def candidates(ind: Indicators, *, share: float = 0.02, exclude: Sequence[int] = ()) -> np.ndarray:
    """The `share` of tokens that look most under-trained (highest unembedding score), excluding `exclude` (the
    reference rows and special tokens, which are unused by construction)."""
    skip = set(int(x) for x in exclude) | set(ind.reference.tolist())
    order = [int(i) for i in np.argsort(-ind.unembed_score, kind="stable") if int(i) not in skip]
    k = max(1, int(round(len(ind.unembed_score) * share)))
    return np.asarray(order[:k], dtype=np.int64)
