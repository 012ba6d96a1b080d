"""Collapsed rows at Qwen2.5-0.5B's lm_head shape (151,936 x 896, float32): `analyses.collapse.collapsed_groups`
over blocks, against a brute-force blockwise V x V cosine pass on a slice of the same matrix (the brute force on
the whole matrix would take hours here; its time grows with V², ours about with V).

    .venv/bin/python bench/collapse_scale.py                  # the whole matrix, brute force on 16,384 rows
    .venv/bin/python bench/collapse_scale.py --rows 50000 --slice 8192

Planted: one group of 2,000 rows (a direction every row of the group shares, as never-targeted rows converge to)
and the 271 padding rows as one more group; every row carries a direction shared by the whole matrix, as real
unembeddings do. Prints seconds, rows/s, peak RSS (this process's VmHWM) and whether the groups equal the brute
force's on the slice; writes bench/out/collapse_scale.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vocabdrift.analyses.collapse import MIN_COS, collapsed_groups

OUT = Path(__file__).resolve().parent / "out"


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def matrix(v: int, h: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((v, h), dtype=np.float32)
    x += 2.0 * rng.standard_normal(h, dtype=np.float32)
    ids = rng.permutation(v - 271)
    group = np.sort(ids[:2000])
    c = rng.standard_normal(h, dtype=np.float32)
    x[group] = c + 1e-3 * rng.standard_normal((len(group), h), dtype=np.float32)
    pad = np.arange(v - 271, v)
    x[pad] = rng.standard_normal(h, dtype=np.float32)
    return x, group, pad


def brute(x: np.ndarray, min_cos: float, block: int = 2048) -> np.ndarray:
    """Group sizes from every pair's cosine, block by block (connected components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    a, b = [], []
    for s in range(0, len(u), block):
        i, j = np.nonzero(u[s:s + block] @ u.T >= min_cos)
        a.append(s + i)
        b.append(j)
    a, b = np.concatenate(a), np.concatenate(b)
    _, label = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(u), len(u))), directed=False)
    size = np.bincount(label)[label]
    return np.where(size >= 2, size, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--slice", type=int, default=16_384, help="rows the brute force is compared on")
    ap.add_argument("--block", type=int, default=4096)
    args = ap.parse_args()
    x, group, pad = matrix(args.rows, args.hidden)
    base_rss = peak_rss_mb()

    def blocks(m: np.ndarray):  # noqa: ANN202
        return lambda: ((s, m[s:s + args.block]) for s in range(0, len(m), args.block))

    t0 = time.perf_counter()
    c = collapsed_groups(blocks(x))
    t_all = time.perf_counter() - t0
    rss = peak_rss_mb()
    found = bool((c.size[group] == len(group)).all() and (c.size[pad] == len(pad)).all()
                 and int((c.size > 0).sum()) == len(group) + len(pad))

    sl = x[:args.slice]
    t0 = time.perf_counter()
    ours_slice = collapsed_groups(blocks(sl)).size
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    want = brute(sl, MIN_COS)
    t_brute = time.perf_counter() - t0
    same = bool((ours_slice == want).all())

    print("| matrix | rows | seconds | rows/s | × brute force |\n| --- | ---: | ---: | ---: | ---: |")
    print(f"| slice, brute force (V x V) | {args.slice:,} | {t_brute:.1f} | {args.slice / t_brute:,.0f} | 1.00 |")
    print(f"| slice, collapsed_groups | {args.slice:,} | {t_ours:.1f} | {args.slice / t_ours:,.0f} | "
          f"{t_brute / t_ours:.1f} |")
    print(f"| whole, collapsed_groups | {args.rows:,} x {args.hidden} | {t_all:.1f} | {args.rows / t_all:,.0f} | |")
    est = t_brute * (args.rows / args.slice) ** 2
    print(f"brute force on the whole matrix, extrapolated (V²): {est:,.0f} s; ours {est / t_all:,.0f}x faster")
    print(f"planted groups found exactly: {found}; slice equal to the brute force: {same}; "
          f"peak RSS {rss:,.0f} MB (the matrix alone: {base_rss:,.0f} MB)")
    OUT.mkdir(exist_ok=True)
    (OUT / "collapse_scale.json").write_text(json.dumps({
        "rows": args.rows, "hidden": args.hidden, "seconds": t_all, "slice": args.slice,
        "slice_seconds_ours": t_ours, "slice_seconds_brute": t_brute, "found": found, "same_on_slice": same,
        "peak_rss_mb": rss, "matrix_rss_mb": base_rss}, indent=1))
    if not (found and same):
        raise SystemExit("collapsed groups differ from the planted or brute-force ones")


if __name__ == "__main__":
    main()
