"""`saymap`: which tokens of the whole vocabulary BASE and POST can say.

`probe` asks every token every template; on a whole vocabulary that is hours. The map asks each token only what
decides its verdict (a token is sayable when some template gets it kept by top-p sampling):

1. **Order the templates per model** on a seeded sample: the one that keeps most tokens first (a greedy cover).
2. **Stop at the first template that keeps a token**; a token no template keeps is asked them all.
3. **A fast pass** (bfloat16 on a CPU with bfloat16 matrix units, where it runs ~2.5x float32) settles the
   verdicts far from the top-p cut; the ones within the margin are asked again in the exact dtype (float32 on a
   CPU). The margin is twice the largest disagreement of the two passes on the model's own sample; in every
   block the fast verdicts nearest the margin are asked again exactly (an audit), and one that differs doubles
   the margin and asks the block again.
4. **The tail only**: the template's prefix is computed once, each token's prompt runs only its tail, and only the
   last position reaches the lm_head (`engines.hf`).

Resumable as `probe` is: finished blocks wait beside RUN until the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..analyses import probe as P
from ..analyses import saymap as S
from ..analyses import tokens as T
from ..errors import VocabdriftError
from ..outputs import run as R
from ..outputs.location import check_out
from ..outputs.run import Timer, existing_run, open_run, write_bytes_atomic, write_parquet_atomic
from .probe import (
    _bar,
    _checked_models,
    _encoded,
    _engine,
    _for,
    _job_key,
    _model_tokenizer,
    _open_partial,
    _resolve_asked,
    _where,
    non_special_ids,
    read_token_file,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from ..engines.base import Engine

log = logging.getLogger(__name__)
PathLike = str | os.PathLike

SAMPLE = 128  # tokens per model that choose its template order and measure the fast pass's margin
BLOCK = 8192  # tokens per resumable block
AUDIT = 32  # fast verdicts per block asked again exactly, the nearest the margin: one that differs widens it
FAST = ("auto", "bfloat16", "none")


@dataclass
class SaymapResult:
    """What `saymap` wrote: RUN/saymap.parquet and summary["saymap"]."""

    path: Path
    table: pa.Table
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"run": str(self.path), **self.summary}


def fast_dtype(fast: str, device: str | None) -> str | None:
    """The fast pass's dtype: bfloat16 on a CPU whose instructions run it natively (AVX-512 BF16 or AMX), where
    it is ~2.5x float32; none on a GPU (the exact pass is already bfloat16 there) or on an older CPU (where
    bfloat16 is emulated and slower)."""
    if fast not in FAST:
        raise VocabdriftError(f"--fast {fast!r}: choose auto, bfloat16 or none")
    if fast == "none":
        return None
    from ..device import best_device

    if best_device(device).type != "cpu":
        return None
    if fast == "bfloat16":
        return "bfloat16"
    import torch

    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bfloat16" if native else None


class _Model:
    """One model's engines: the exact one, and the fast one beside it (a bfloat16 copy of a local model)."""

    def __init__(self, exact: Engine, fast: str | None) -> None:
        self.exact = exact
        self.fast: Engine | None = exact.cast(fast) if fast is not None else None  # type: ignore[attr-defined]

    def close(self) -> None:
        for e in (self.exact, self.fast):
            if e is not None:
                e.close()


def _scores(eng: Engine, enc: P.PromptIds, ids: np.ndarray, top_p: float) -> list[P.Score]:
    return eng.score([enc.with_token(int(t)) for t in ids], [int(t) for t in ids], top_p=top_p)


def _calibrate(m: _Model, encs: list[P.PromptIds], sample: np.ndarray, top_p: float) -> dict[str, Any]:
    """The model's template order (by the exact verdicts on `sample`), the fast pass's margin (by the two passes'
    disagreement there), and the exact verdicts and probabilities themselves (for the template rule)."""
    kept = np.zeros((len(sample), len(encs)), bool)
    prob = np.zeros((len(sample), len(encs)))
    exact_m, fast_m = [], []
    for j, enc in enumerate(encs):
        sc = _scores(m.exact, enc, sample, top_p)
        kept[:, j] = [s.in_top_p for s in sc]
        prob[:, j] = [s.p for s in sc]
        if m.fast is not None:
            exact_m += [s.mass_above for s in sc]
            fast_m += [s.mass_above for s in _scores(m.fast, enc, sample, top_p)]
    # a prompt's work: the token and what follows it (the prefix before it is computed once per template)
    order = S.template_order(kept, [e.template for e in encs], [1 + len(e.after) for e in encs])
    margin = S.calibrate_margin(np.array(exact_m), np.array(fast_m), top_p) if m.fast is not None else None
    return {"order": order, "margin": margin, "sample": [int(t) for t in sample],
            "templates": [e.template for e in encs], "kept": kept.tolist(), "p": np.nan_to_num(prob).tolist()}


def _ask(m: _Model, encs: list[P.PromptIds], ids: np.ndarray, top_p: float, margin: float | None
         ) -> dict[str, np.ndarray]:
    """One model's verdict on each of `ids`: templates in order, a token settled at the first that keeps it; the
    fast pass's verdicts near the cut asked again exactly. The row of a token no template keeps is its most
    likely template's."""
    n, k = len(ids), len(encs)
    sayable, done = np.zeros(n, bool), np.zeros(n, bool)
    lp, rank = np.full(n, -np.inf), np.zeros(n, np.int64)
    tmpl = np.full(n, "", dtype=object)
    asked, exact = np.zeros(n, np.int64), np.zeros(n, bool)
    unsure = np.full((n, k), -np.inf)  # the fast pass's distance to the cut where it was unsure, else -inf
    settled = np.full((n, k), np.nan)  # ... where it settled the verdict (kept or cut beyond the margin)

    def take(i: int, s: P.Score, j: int, kept: bool, from_exact: bool) -> None:
        if kept:
            sayable[i] = done[i] = True
        if kept or (not sayable[i] and (s.logprob > lp[i] or not tmpl[i])):
            lp[i], rank[i], tmpl[i] = s.logprob, s.rank, encs[j].template
        exact[i] |= from_exact

    first = m.fast if margin is not None and m.fast is not None else m.exact
    for j, enc in enumerate(encs):
        todo = np.flatnonzero(~done)
        if not len(todo):
            break
        sc = _scores(first, enc, ids[todo], top_p)
        asked[todo] += 1
        if first is m.exact:
            verdict = np.where([s.in_top_p for s in sc], S.SURE, S.CUT)
        else:
            mass = np.array([s.mass_above for s in sc])
            verdict = S.screen(mass, top_p, float(margin))  # type: ignore[arg-type]
            d = np.nan_to_num(S.cut_distance(mass, top_p), nan=0.0)
            unsure[todo, j] = np.where(verdict == S.UNSURE, d, -np.inf)
            settled[todo, j] = np.where(verdict == S.UNSURE, np.nan, d)
        for i, s, v in zip(todo, sc, verdict, strict=True):
            take(i, s, j, v == S.SURE, first is m.exact)
    # the fast pass's near-cut verdicts, asked exactly: each token's likeliest keep first (the highest fast
    # distance), so a token kept exactly is asked no further
    for _ in range(k):
        todo = np.flatnonzero(~done & np.isfinite(unsure).any(axis=1))
        if not len(todo):
            break
        pick = unsure[todo].argmax(axis=1)
        for j in np.unique(pick):
            rows = todo[pick == j]
            for i, s in zip(rows, _scores(m.exact, encs[j], ids[rows], top_p), strict=True):
                take(i, s, int(j), s.in_top_p, True)
            unsure[rows, j] = -np.inf
    audited, disagreed = 0, 0
    if first is not m.exact:  # the fast verdicts nearest the margin, asked exactly: the ones a wrong margin flips
        rows, cols = np.nonzero(np.isfinite(settled))
        near = np.argsort(np.abs(settled[rows, cols]), kind="stable")[:AUDIT]
        for j in np.unique(cols[near]):
            sel = rows[near][cols[near] == j]
            got = [s.in_top_p for s in _scores(m.exact, encs[j], ids[sel], top_p)]
            audited += len(sel)
            disagreed += int(sum(g != (settled[i, j] > 0) for i, g in zip(sel, got, strict=True)))
    p = np.exp(lp)
    outcome = [P.outcome(int(r), bool(ok), float(x)) for r, ok, x in zip(rank, sayable, p, strict=True)]
    return {"sayable": sayable, "p": p, "rank": rank, "template": tmpl, "outcome": np.array(outcome, object),
            "asked": asked, "exact": exact, "audited": audited, "disagreed": disagreed}


def _block_table(ids: np.ndarray, cols: dict[str, np.ndarray]) -> pa.Table:
    import pyarrow as pa

    audit = json.dumps({"audited": cols["audited"], "disagreed": cols["disagreed"]}).encode()
    return pa.table({"token_id": pa.array(ids, pa.int64()), "sayable": pa.array(cols["sayable"], pa.bool_()),
                     "p": pa.array(cols["p"], pa.float64()), "rank": pa.array(cols["rank"], pa.int64()),
                     "template": pa.array(list(cols["template"]), pa.string()),
                     "outcome": pa.array(list(cols["outcome"]), pa.string()),
                     "asked": pa.array(cols["asked"], pa.int64()), "exact": pa.array(cols["exact"], pa.bool_())},
                    metadata={"vocabdrift.audit": audit})


def _categories(out: Path, tok_spec: Any, ids: np.ndarray, trust_remote_code: bool) -> tuple[list[str], np.ndarray]:
    """Category and reachability per token: from RUN's vocabulary table when it has these ids, else built
    from the tokenizer (cached)."""
    from ..sources.vocabulary import vocab_table

    r = R.Run(out)
    table = r.read_table(R.VOCAB, ("token_id", "category", "reachable")) if r.has(R.VOCAB) \
        else vocab_table(tok_spec, trust_remote_code=trust_remote_code)
    tid = table["token_id"].to_numpy().astype(np.int64)
    if ids.max(initial=-1) > tid.max(initial=-1):
        table = vocab_table(tok_spec, trust_remote_code=trust_remote_code)
        tid = table["token_id"].to_numpy().astype(np.int64)
    lut = np.full(int(max(tid.max(initial=-1), ids.max(initial=-1))) + 1, -1, np.int64)
    lut[tid] = np.arange(len(tid))
    rows = lut[ids]
    cats = np.asarray(table["category"].to_pylist(), dtype=object)
    reach = np.asarray(table["reachable"].to_pylist(), bool) if "reachable" in table.column_names \
        else np.ones(len(tid), bool)
    return ([str(cats[r]) if r >= 0 else "unknown" for r in rows],
            np.array([bool(reach[r]) if r >= 0 else False for r in rows]))


def saymap(model: PathLike, *, base: PathLike | None = None, out: PathLike | None = None,
           run: PathLike | None = None, tokens: Sequence[T.TokenSpec] | None = None,
           tokens_file: PathLike | None = None, templates: Sequence[str] | None = None,
           base_templates: Sequence[str] | None = None, top_p: float = P.TOP_P, fast: str = "auto",
           endpoint: str | None = None, engine: Any = None, tokenizer: str | None = None, device: str | None = None,
           batch_size: int = 256, block_tokens: int = BLOCK, sample: int = SAMPLE, seed: int = 0,
           trust_remote_code: bool = False, allow_pickle: bool = False, progress: bool | str = False,
           force: bool = False) -> SaymapResult:
    """Map which tokens MODEL (and BASE) can say; write RUN/saymap.parquet and summary["saymap"].

    Every non-special token by default (or `tokens`), in each model: sayable when some template (the probe's:
    chat families for a chat model, few-shot ones for a base model) gets it kept by top-p sampling at `top_p`,
    the same verdict as `probe`'s. With `base`: LOST (sayable in BASE, not in MODEL), GAINED, sayable in both or
    neither, per category, with how LOST relates to RUN's drift, coverage and collapsed rows when RUN has them.

    Args:
        model: the (post-trained) model: folder, .gguf file or hub id (or the served name with `endpoint`).
        base: the pre-trained model.
        out / run: the run folder to write (`run`: an existing one, e.g. a diff's, whose tables the map joins).
        tokens / tokens_file: map these tokens only (ids, pieces or texts; a file of them, one a line).
        fast: "auto" (bfloat16 on a CPU that runs it natively), "bfloat16" or "none" (exact pass only).
        endpoint / engine: ask MODEL through a server or vLLM (exact pass only; see `probe`).
        batch_size: prompts per forward pass; block_tokens: tokens per resumable block.
        sample: tokens per model that choose its template order and measure the fast pass's margin (seeded).
        force: map again even when RUN holds a map of these tokens made the same way.

    Example:
        >>> saymap("runs/lab/models/post", base="runs/lab/models/base", run="runs/lab")
    """
    import pyarrow as pa
    import pyarrow.parquet as pq


    if run is not None:
        run = existing_run(run)
    if out is None and run is None:
        raise VocabdriftError("say where to write: --run RUN (an existing run folder, e.g. from diff) or -o RUN")
    out = Path(out) if out is not None else Path(run)  # type: ignore[arg-type]
    if tokens_file is not None:
        tokens = [*(tokens or ()), *read_token_file(tokens_file)]
    if not 0 < top_p < 1:
        raise VocabdriftError(f"--top-p must be between 0 and 1 (exclusive) for a map, not {top_p}; a greedy "
                              "verdict is `probe --top-p 0`")
    for flag, value in (("--batch-size", batch_size), ("--sample", sample), ("block_tokens", block_tokens)):
        if value < 1:
            raise VocabdriftError(f"{flag} must be at least 1, not {value}")
    dtype = fast_dtype(fast, device)
    if endpoint or (engine is not None and engine not in ("hf", "transformers")):
        dtype = None  # a server, vLLM or an engine object: the exact pass only
    check_out(out, models=[model, base, tokenizer])
    R.refuse_foreign(out, model, base)
    timer = Timer()
    local = _checked_models(model, base, endpoint, allow_pickle)
    with timer("tokens"):
        tok_spec, tok = _model_tokenizer(model, local, endpoint, tokenizer, trust_remote_code, "mapping")
        ids = _resolve_asked(tokens, tok, tok_spec, trust_remote_code) if tokens is not None else non_special_ids(tok)
        ids_np = np.array(sorted(set(ids)), np.int64)
        if not len(ids_np):
            raise VocabdriftError("no tokens to map")
        cats, reach = _categories(out, tok_spec, ids_np, trust_remote_code)

    models: list[tuple[str, PathLike, str | None, Sequence[str] | None]] = (
        [("base", base, None, base_templates), ("post", model, endpoint, templates)] if base is not None
        else [("post", model, endpoint, templates)])
    with timer("templates"):
        encoded = _encoded(models, local, tokenizer, tok, trust_remote_code)
    plans = [p[:4] for p in encoded]
    vocabs = {p[0]: p[4].get_vocab() for p in encoded}
    if base is not None and vocabs["base"] != vocabs["post"]:  # one id, one token in both, or LOST means nothing
        raise VocabdriftError(f"{base} and {model} have different vocabularies ({len(vocabs['base']):,} and "
                              f"{len(vocabs['post']):,} tokens, or the same ids for other pieces): a map compares "
                              "one token id in both models; pass a BASE of the same tokenizer")
    job = {"models": [[n, _where(s, local[str(s)]), e, [x.template for x in enc]] for n, s, e, enc in plans],
           "tokens": ids_np.tolist(), "top_p": top_p, "fast": dtype, "sample": sample, "seed": seed,
           "block": block_tokens}
    key = _job_key(job)
    done = _mapped_before(out, key, force)
    if done is not None:
        return done
    part = _open_partial(out, "saymap", key, {k: v for k, v in job.items() if k != "tokens"})
    rng = np.random.default_rng(seed)
    sample_ids = np.sort(rng.choice(ids_np, size=min(sample, len(ids_np)), replace=False))
    blocks = [ids_np[s:s + block_tokens] for s in range(0, len(ids_np), block_tokens)]
    per_model: dict[str, pa.Table] = {}
    calib: dict[str, Any] = {}
    audits: dict[str, list[dict[str, int]]] = {}
    def open_model(name: str, spec: PathLike, ep: str | None) -> _Model:
        with timer(f"load_{name}"):
            return _Model(_engine(spec, endpoint=ep, engine=_for(engine, name), device=device,
                                  trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, tokenizer=tokenizer,
                                  batch_size=batch_size), dtype)

    # 1. every model on the sample first: the template order, the margin, and the template rule, which needs both
    kept_open: tuple[str, _Model] | None = None  # the last model calibrated is the first mapped: kept open
    try:
        for k, (name, spec, ep, encs) in enumerate(reversed(plans)):
            cfile = part / f"{name}.calibration.json"
            if cfile.exists():
                calib[name] = json.loads(cfile.read_text())
                continue
            m = open_model(name, spec, ep)
            try:
                with timer("calibrate"):
                    calib[name] = _calibrate(m, encs, sample_ids, top_p)
            except BaseException:
                m.close()
                raise
            write_bytes_atomic(cfile, json.dumps(calib[name]).encode())
            if k == len(plans) - 1:
                kept_open = (name, m)
            else:
                m.close()
        usable, failed = (S.template_rule(calib["base"], calib["post"]) if base is not None
                          else (list(calib["post"]["templates"]), []))
        if not usable:
            raise VocabdriftError(f"POST stopped following every probe template ({', '.join(failed)}: its "
                                  "probabilities fell below 1% of BASE's on a sample); choose others with --template")

        # 2. the blocks, model by model
        with _bar(progress, len(ids_np) * len(plans), "mapping") as advance:
            for name, spec, ep, encs in plans:
                files = [part / f"{name}.{i:06d}.parquet" for i in range(len(blocks))]
                cfile = part / f"{name}.calibration.json"
                m = kept_open[1] if kept_open is not None and kept_open[0] == name else None
                kept_open = None
                tables: list[pa.Table] = []
                try:
                    for blk, f in zip(blocks, files, strict=True):
                        if f.exists():
                            tables.append(pq.read_table(f))
                            advance(len(blk))
                            continue
                        if m is None:
                            m = open_model(name, spec, ep)
                        order = [next(e for e in encs if e.template == t) for t in calib[name]["order"]
                                 if t in usable]
                        with timer("ask"):
                            cols = _ask(m, order, blk, top_p, calib[name]["margin"])
                            while cols["disagreed"]:  # a margin too narrow for this block: wider, the block again
                                log.warning("%s: %d of %d fast verdicts nearest the margin differ from the exact "
                                            "pass; margin %.2f -> %.2f nats, block asked again", name,
                                            cols["disagreed"], cols["audited"], calib[name]["margin"],
                                            2 * calib[name]["margin"])
                                calib[name]["margin"] *= 2
                                calib[name]["widened"] = calib[name].get("widened", 0) + 1
                                write_bytes_atomic(cfile, json.dumps(calib[name]).encode())
                                cols = _ask(m, order, blk, top_p, calib[name]["margin"])
                            t = _block_table(blk, cols)
                        write_parquet_atomic(f, t)
                        tables.append(t)
                        advance(len(blk))
                finally:
                    if m is not None:
                        m.close()
                audits[name] = [json.loads((t.schema.metadata or {}).get(b"vocabdrift.audit", b"{}"))
                                for t in tables]
                per_model[name] = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    finally:
        if kept_open is not None:
            kept_open[1].close()

    cols: dict[str, Any] = {"token_id": pa.array(ids_np, pa.int64()), "category": pa.array(cats, pa.string()),
                            "reachable": pa.array(reach, pa.bool_())}
    for name, t in per_model.items():
        for c in ("sayable", "p", "rank", "template", "outcome", "asked", "exact"):
            cols[f"{name}_{c}"] = t[c]
    if base is not None:
        cols["status"] = pa.array(S.statuses(np.asarray(cols["base_sayable"]), np.asarray(cols["post_sayable"])),
                                  pa.string())
    table = pa.table(cols)
    r = R.Run(out)
    drift = r.read_table(R.DRIFT) if base is not None and r.has(R.DRIFT) else None
    coverage = r.read_table(R.COVERAGE) if base is not None and r.has(R.COVERAGE) else None
    summary = S.summarize(table, paired=base is not None, drift=drift, coverage=coverage)
    summary.update({"top_p": top_p, "fast": dtype, "job": key,
                    "templates": {n: [t for t in calib[n]["order"] if t in usable] for n in per_model},
                    "template_failures": failed,
                    "margin": {n: calib.get(n, {}).get("margin") for n in per_model},
                    "asked": {n: int(np.asarray(per_model[n]["asked"]).sum()) for n in per_model},
                    "exact": {n: int(np.asarray(per_model[n]["exact"]).sum()) for n in per_model},
                    "audit": {n: {"audited": sum(a.get("audited", 0) for a in audits[n]),
                                  "disagreed": sum(a.get("disagreed", 0) for a in audits[n]),
                                  "widened": calib.get(n, {}).get("widened", 0)} for n in per_model}})
    inputs = {"model": model, **({"base": base} if base is not None else {})}
    with open_run(out) as w:
        w.write_table(R.SAYMAP, table)
        w.update_summary(saymap=summary)
        w.record("saymap", arguments={"tokens": len(ids_np), "templates": list(templates or []),
                                      "base_templates": list(base_templates or []), "top_p": top_p, "fast": dtype,
                                      "sample": sample, "seed": seed, "endpoint": endpoint,
                                      "engine": engine if isinstance(engine, str) else "hf",
                                      "batch_size": batch_size}, inputs=inputs, timings=timer.timings)
        path = w.path
    shutil.rmtree(part, ignore_errors=True)
    return SaymapResult(out if out.exists() else path, table, summary, timer.timings)


def _mapped_before(out: Path, key: str, force: bool) -> SaymapResult | None:
    """RUN's map when it was made by this very job (said on stderr; nothing recomputed), unless `force`."""
    if force or not (out / R.SAYMAP).is_file():
        return None
    r = R.Run(out)
    s = r.read_json(R.SUMMARY, default={}).get("saymap")
    if not isinstance(s, dict) or s.get("job") != key:
        return None
    log.warning("%s already holds this map (same models, tokens, templates and top-p); nothing recomputed "
                "(--force maps again)", out / R.SAYMAP)
    return SaymapResult(out, r.read_table(R.SAYMAP), s)
