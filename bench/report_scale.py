"""How `report` scales with the vocabulary: a 25,000-token run (the baseline) against a 250,000-token run.

Run: python bench/report_scale.py
Prints the time and page size of each, and the ratios; the figures' data must not grow with the vocabulary
(histograms are binned, scatters subsampled, tables top-N), so the page size ratio stays near 1. Then the charts'
PNGs rendered one after the other against `pngs` (two forked processes), the same bytes either way.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vocabdrift.analyses.drift import summarize
from vocabdrift.analyses.vocab import build_vocab_table
from vocabdrift.outputs.report import Chart, build_sections, png, pngs, read_run, report


def make_run(path: Path, n: int, seed: int = 0) -> Path:
    """A run folder with vocab, drift, summary, coverage and probe parts for n tokens."""
    rng = np.random.default_rng(seed)
    alphabets = ["あいうえおかきくけこ", "가나다라마바사", "абвгдежз", "的一是不了人我", "abcdefghij"]
    texts = [alphabets[i % 5][i % 7 % len(alphabets[i % 5])] + f"{i}" for i in range(n)]
    special = np.zeros(n, bool)
    special[:3] = True
    vocab = build_vocab_table(texts, texts, [t.encode() for t in texts], special, ~special)
    lm = 1 - rng.exponential(0.01, n)
    lm[rng.choice(n, n // 50, replace=False)] = rng.uniform(0.3, 0.95, n // 50)
    f32 = np.float32
    drift = pa.table({"token_id": np.arange(n, dtype=np.int64), "lm_head_cos": lm.astype(f32),
                      "lm_head_l2": (1 - lm).astype(f32), "lm_head_norm_base": np.ones(n, f32),
                      "lm_head_norm_post": np.ones(n, f32), "embed_cos": (1 - rng.exponential(0.001, n)).astype(f32)})
    path.mkdir(parents=True)
    pq.write_table(vocab, path / "vocab.parquet")
    pq.write_table(drift, path / "drift.parquet")
    pq.write_table(pa.table({"token_id": np.arange(n, dtype=np.int64), "count": rng.poisson(3, n)}),
                   path / "coverage.parquet")
    probed = np.arange(3, n)
    pq.write_table(pa.table({"token_id": np.repeat(probed, 2), "model": ["base", "post"] * len(probed),
                             "template": ["en"] * (2 * len(probed)), "p_target": rng.uniform(0, 1, 2 * len(probed)),
                             "sayable": rng.uniform(0, 1, 2 * len(probed)) > 0.1}), path / "probe.parquet")
    summary = summarize(drift, vocab)
    summary["probe"] = {"models": ["base", "post"], "tokens": len(probed), "lost": probed[:500].tolist()}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def measure(path: Path, repeats: int = 3) -> tuple[float, int, int]:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        html_path, md_path = report(path)
        best = min(best, time.perf_counter() - t0)
    return best, html_path.stat().st_size, md_path.stat().st_size


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for n in (25_000, 250_000):
            rows[n] = measure(make_run(Path(tmp) / f"v{n}", n))
            t, h, m = rows[n]
            print(f"{n:>8,} tokens: {t:6.2f} s   report.html {h / 1e6:5.2f} MB   report.md {m / 1e3:6.1f} kB")
        (t0, h0, m0), (t1, h1, m1) = rows[25_000], rows[250_000]
        print(f"ratio 250k / 25k: time {t1 / t0:.2f}x (vocabulary 10x), html size {h1 / h0:.3f}x, "
              f"md size {m1 / m0:.3f}x")
        run = read_run(Path(tmp) / "v25000")
        charts = [it for s in build_sections(run, compare=None, names=None, tokens=(), top=50) for it in s.items
                  if isinstance(it, Chart)]
        png(charts[0])  # matplotlib's first-use costs (fonts) out of both clocks
        best = {"one after the other": float("inf"), "pngs (two forked processes)": float("inf")}
        for _ in range(3):
            for name, render in (("one after the other", lambda: [png(c) for c in charts]),
                                 ("pngs (two forked processes)", lambda: pngs(charts))):
                t = time.perf_counter()
                got = render()
                best[name] = min(best[name], time.perf_counter() - t)
        assert got == [png(c) for c in charts]
        ref = best["one after the other"]
        for name, t in best.items():
            print(f"{len(charts)} charts' PNGs, {name}: {t:.2f} s (x{ref / t:.2f}, best of 3)")


if __name__ == "__main__":
    main()
