"""Single-model indicators of under-trained tokens, after Magikarp (Land & Bartolo 2024, cohere-ai/magikarp).

A token that (almost) never occurred in training keeps an output row that only ever received the common "push
down" gradient, so all such rows point the same way. The indicator: remove the unembedding matrix's first principal
component (a direction every row shares), take the mean of rows known to be unused (reserved specials, padding
rows), and measure each row's cosine to that mean. High means "looks like the unused rows". The input embedding norm
is the second indicator: rarely-read rows stay near their (small) initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Indicators:
    """Per-token indicators, each (V,) float32; `reference` are the ids the unused mean was taken from."""

    unembed_score: np.ndarray
    embed_norm: np.ndarray
    embed_norm_percentile: np.ndarray
    reference: np.ndarray


def first_component(u: np.ndarray) -> np.ndarray:
    """Unit first principal component (H,) of the centred rows of `u` (V, H).

    Lanczos (scipy's `eigsh`) on the H x H covariance: one pass over the rows and no V x H copy, where a full SVD
    of a 150K x 4K matrix would cost minutes.
    """
    from scipy.sparse.linalg import eigsh

    mean = u.mean(axis=0, dtype=np.float64)
    cov = (u.T @ u).astype(np.float64) / len(u) - np.outer(mean, mean)  # (H, H); float32 BLAS for the product
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
    u = np.asarray(unembed, dtype=np.float32)
    e = np.asarray(embed, dtype=np.float32)
    norm = np.linalg.norm(e, axis=1).astype(np.float32)
    ref = default_reference(norm, reference)
    pc = first_component(u)
    ur = u - np.outer(u @ pc, pc)  # (V, H) with the shared direction removed
    m = ur[ref].mean(axis=0)
    score = (ur @ m) / (np.linalg.norm(ur, axis=1) * np.linalg.norm(m) + 1e-30)
    order = np.argsort(norm, kind="stable")
    pct = np.empty(len(norm), dtype=np.float32)
    pct[order] = (np.arange(len(norm), dtype=np.float32) + 0.5) / len(norm) * 100.0
    return Indicators(score.astype(np.float32), norm, pct, ref)


def candidates(ind: Indicators, *, share: float = 0.02, exclude: Sequence[int] = ()) -> np.ndarray:
    """The `share` of tokens that look most under-trained (highest unembedding score), excluding `exclude` (the
    reference rows and special tokens, which are unused by construction)."""
    skip = set(int(x) for x in exclude) | set(ind.reference.tolist())
    order = [int(i) for i in np.argsort(-ind.unembed_score, kind="stable") if int(i) not in skip]
    k = max(1, int(round(len(ind.unembed_score) * share)))
    return np.asarray(order[:k], dtype=np.int64)
