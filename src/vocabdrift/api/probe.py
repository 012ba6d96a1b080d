"""`probe`, `cases`, `undertrained`, `confusion`: prove drift with the model itself.

I/O at the edges (models through an engine, the run folder, the shipped data files); prompts and the reading of
answers come from `analyses.probe` and `analyses.confusion`, the indicators from `analyses.undertrained`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..analyses import probe as P
from ..errors import VocabdriftError
from ..outputs.run import Timer, open_run

if TYPE_CHECKING:
    import pyarrow as pa

    from ..engines.base import Engine

log = logging.getLogger(__name__)
PathLike = str | os.PathLike
TokenSpec = int | str


# ---- shared helpers -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _bar(enabled: bool, total: int, description: str) -> Iterator[Any]:
    """A rich progress bar, or a silent stand-in; yields `advance(n)`."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


class _Borrowed:
    """An engine the caller opened: used, never closed here."""

    def __init__(self, eng: Engine) -> None:
        self._eng = eng

    def __getattr__(self, name: str) -> Any:
        return getattr(self._eng, name)

    def close(self) -> None:
        pass


def _engine(model: PathLike, *, endpoint: str | None, engine: Any, device: str | None,
            trust_remote_code: bool, tokenizer: str | None = None, batch_size: int | None = None) -> Engine:
    """Open the engine for `model`; `engine` may also be an engine the caller already opened (it is reused)."""
    from ..engines.base import open_engine

    if engine is not None and not isinstance(engine, str):
        return _Borrowed(engine)  # type: ignore[return-value]
    eng = open_engine(str(model), endpoint=endpoint, engine=engine, device=device,
                      trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    if batch_size and hasattr(eng, "batch_size"):
        eng.batch_size = batch_size
    return eng


def _for(engine: Any, label: str) -> Any:
    """An engine object passed by the caller is MODEL's; BASE is opened on its own."""
    return engine if isinstance(engine, str) or label != "base" else None


def _model_name(model: PathLike) -> str:
    p = Path(str(model))
    return (p.stem if p.suffix == ".gguf" else p.name) or str(model)


def resolve_tokens(tok: Any, specs: Sequence[TokenSpec]) -> list[int]:
    """Token ids for ids, raw pieces ("Ġthe") or texts (" the", "嘉祺"); a text must be exactly one token."""
    vocab = tok.get_vocab()
    n = len(tok)
    out = []
    for s in specs:
        if isinstance(s, int) or (isinstance(s, str) and s.isdigit() and s not in vocab):
            i = int(s)
            if not 0 <= i < n:
                raise VocabdriftError(f"token id {i} is outside the vocabulary (0..{n - 1})")
            out.append(i)
            continue
        if s in vocab:
            out.append(int(vocab[s]))
            continue
        ids = tok(s, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = tok.convert_ids_to_tokens(ids)
            raise VocabdriftError(f"{s!r} is {len(ids)} tokens {pieces}, not one; pass a single token's text, its "
                                  "raw piece or its id")
        out.append(int(ids[0]))
    return list(dict.fromkeys(out))


def _tokens_from_run(run: PathLike, top: int) -> list[int]:
    """The `top` most drifted non-special tokens of a diff run (lowest lm_head cosine first)."""
    import pyarrow.compute as pc

    from ..outputs.run import Run

    r = Run(run)
    drift = r.read_table("drift.parquet")
    if r.has("vocab.parquet"):
        drift = drift.join(r.read_table("vocab.parquet").select(["token_id", "is_special"]), "token_id")
        drift = drift.filter(pc.invert(pc.fill_null(drift["is_special"], False)))
    drift = drift.filter(pc.is_finite(drift["lm_head_cos"])).sort_by([("lm_head_cos", "ascending"),
                                                                        ("token_id", "ascending")])
    return [int(t) for t in drift["token_id"].slice(0, top).to_pylist()]


# ---- probe ----------------------------------------------------------------------------------------------------

@dataclass
class ProbeResult:
    """What `probe` wrote: RUN/probe.parquet and summary["probe"]."""

    path: Path
    table: pa.Table
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _partial_dir(out: Path) -> Path:
    """Where finished blocks wait for the end of a probe: beside RUN, so RUN itself appears only on success."""
    return out.parent / f".{out.name}.probe-partial"


def _job_key(job: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def probe(model: PathLike, *, out: PathLike, tokens: Sequence[TokenSpec] | None = None, base: PathLike | None = None,
          from_run: PathLike | None = None, top: int = 200, all_tokens: bool = False,
          templates: Sequence[str] | None = None, base_templates: Sequence[str] | None = None,
          top_p: float = P.TOP_P, endpoint: str | None = None, engine: Any = None,
          tokenizer: str | None = None, device: str | None = None, batch_size: int = 64, block_tokens: int = 1024,
          trust_remote_code: bool = False, progress: bool = False) -> ProbeResult:
    """Ask MODEL (and BASE) to say each token; write RUN/probe.parquet and summary["probe"].

    Each token goes into every template (chat families for a model with a chat template, few-shot ones for a base
    model without); the probability and rank of the token as the first answer token are recorded, and whether top-p
    sampling at `top_p` keeps it. A token is sayable by a model when any template gets it kept. With `base`, LOST
    lists the tokens sayable by BASE and not by MODEL.

    Resumable: finished blocks of `block_tokens` tokens are kept beside RUN (in `.RUN.probe-partial/`) until the
    end; a probe killed and restarted with the same arguments skips them and gives identical results.

    Args:
        model: the (post-trained) model: folder, .gguf file or hub id (or the served name with `endpoint`).
        out: the run folder.
        tokens: ids, pieces or texts to probe; or `from_run` + `top` (most drifted of a diff run); or
            `all_tokens` (every non-special token).
        base: the pre-trained model, probed the same way (locally).
        templates / base_templates: template names from `analyses.probe.TEMPLATES` (default by model kind).
        endpoint: probe MODEL through an OpenAI-compatible server that returns logprobs.
        engine: "hf" (default) or "vllm"; or an engine already opened on MODEL (e.g. `HFEngine`), reused.
        batch_size: prompts per forward pass; block_tokens: tokens per resumable block.

    Example:
        >>> probe("runs/lab/models/post", base="runs/lab/models/base", tokens=["嘉祺", "地税"], out="runs/lab")
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..sources.tokenizer import load_tokenizer

    out = Path(out)
    if sum(x is not None and x is not False for x in (tokens, from_run, all_tokens or None)) != 1:
        raise VocabdriftError("say which tokens to probe: give exactly one of --tokens, --from RUN (with --top) "
                              "or --all")
    if not 0 <= top_p <= 1:
        raise VocabdriftError(f"--top-p must be in [0, 1] (0: greedy), not {top_p}")
    timer = Timer()
    with timer("tokens"):
        tok_spec = tokenizer or (model if not endpoint or Path(str(model)).exists() else None)
        if tok_spec is None:
            raise VocabdriftError("probing through --endpoint needs the model's tokenizer: pass --tokenizer")
        tok = load_tokenizer(tok_spec, trust_remote_code=trust_remote_code)
        if tokens is not None:
            ids = resolve_tokens(tok, list(tokens))
        elif from_run is not None:
            ids = _tokens_from_run(from_run, top)
        else:
            special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
            ids = [i for i in range(len(tok)) if i not in special]
        if not ids:
            raise VocabdriftError("no tokens to probe")

    models: list[tuple[str, PathLike, str | None, Sequence[str] | None]] = []  # (name, spec, endpoint, templates)
    if base is not None:
        models.append(("base", base, None, base_templates))
        models.append(("post", model, endpoint, templates))
    else:
        models.append((_model_name(model), model, endpoint, templates))

    job = {"models": [[n, str(Path(str(s)).resolve()) if Path(str(s)).exists() else str(s), e, list(t or [])]
                      for n, s, e, t in models],
           "tokens": ids, "top_p": top_p, "block": block_tokens}
    key = _job_key(job)
    part = _partial_dir(out)
    if part.exists() and json.loads((part / "job.json").read_text() if (part / "job.json").exists() else "{}"
                                    ).get("key") != key:
        shutil.rmtree(part)  # a different job's leftovers
    part.mkdir(parents=True, exist_ok=True)
    (part / "job.json").write_text(json.dumps({"key": key, **job}))

    blocks = [(s, ids[s:s + block_tokens]) for s in range(0, len(ids), block_tokens)]
    plans = []  # (name, spec, endpoint, encoded templates)
    with timer("templates"):
        for name, spec, ep, tmpl in models:
            local = tokenizer or Path(str(spec)).exists() or not ep
            m_tok = load_tokenizer(tokenizer or spec, trust_remote_code=trust_remote_code) if local else tok
            plans.append((name, spec, ep, [P.encode_template(t, m_tok) for t in P.resolve_templates(tmpl, m_tok)]))
    tables: list[pa.Table] = []
    with _bar(progress, len(ids) * sum(len(p[3]) for p in plans), "probing") as advance:
        for name, spec, ep, encoded in plans:
            eng: Engine | None = None
            try:
                for enc in encoded:
                    for start, block in blocks:
                        f = part / f"{name}.{enc.template}.{start:08d}.parquet"
                        if f.exists():  # finished before a restart
                            tables.append(pq.read_table(f))
                            advance(len(block))
                            continue
                        if eng is None:
                            with timer(f"load_{name}"):
                                eng = _engine(spec, endpoint=ep, engine=_for(engine, name), device=device,
                                              trust_remote_code=trust_remote_code, tokenizer=tokenizer,
                                              batch_size=batch_size)
                        with timer("score"):
                            scores = eng.score([enc.with_token(t) for t in block], block, top_p=top_p)
                        t_block = P.probe_table(block, name, enc.template, scores)
                        _write_parquet_atomic(f, t_block)
                        tables.append(t_block)
                        advance(len(block))
            finally:
                if eng is not None:
                    eng.close()

    table = pa.concat_tables(tables).sort_by([("model", "ascending"), ("template", "ascending"),
                                              ("token_id", "ascending")])
    names = [m[0] for m in models]
    summary = P.summarize_probe(table, names, base="base" if base is not None else None,
                                post="post" if base is not None else None)
    summary["top_p"] = top_p
    summary["templates"] = sorted(set(table["template"].to_pylist()))
    with open_run(out) as run:
        run.write_table("probe.parquet", table)
        run.update_summary(probe=summary)
        run.record("probe", arguments={"tokens": len(ids), "templates": list(templates or []),
                                       "base_templates": list(base_templates or []), "top_p": top_p,
                                       "endpoint": endpoint, "engine": engine if isinstance(engine, str) else "hf",
                                       "batch_size": batch_size},
                   inputs={"model": model, **({"base": base} if base is not None else {})}, timings=timer.timings)
        path = run.path
    shutil.rmtree(part, ignore_errors=True)
    return ProbeResult(out if out.exists() else path, table, summary, timer.timings)


def _write_parquet_atomic(path: Path, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# ---- cases ----------------------------------------------------------------------------------------------------

def _data_file(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("vocabdrift") / "data" / name))


def read_cases(path: PathLike | None = None) -> list[P.Case]:
    """Cases from a JSONL file (default: the published cases shipped as vocabdrift/data/cases.jsonl)."""
    p = Path(path) if path is not None else _data_file("cases.jsonl")
    if not p.is_file():
        raise VocabdriftError(f"{p}: no such cases file; write one JSON object per line with \"prompt\" and "
                              "\"expected\"")
    with open(p, encoding="utf-8") as f:
        return P.parse_cases(f, source=str(p))


@dataclass
class CasesResult:
    """cases.json's content, plus where it was written (None without `out`)."""

    model: str
    cases: list[dict[str, Any]]
    passed: int
    total: int
    path: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "cases": self.cases, "passed": self.passed, "total": self.total}


def cases(model: PathLike, cases_file: PathLike | None = None, *, out: PathLike | None = None,
          endpoint: str | None = None, engine: Any = None, tokenizer: str | None = None,
          device: str | None = None, max_tokens: int = 64, name: str | None = None,
          trust_remote_code: bool = False, progress: bool = False) -> CasesResult:
    """Run user-written cases greedily: pass when the answer holds `expected` and no `forbidden` string.

    Writes RUN/cases.json and summary["cases"][name] when `out` is given.

    Example:
        >>> r = cases("runs/lab/models/post")          # the published cases
        >>> print(f"{r.passed}/{r.total}")
    """
    items = read_cases(cases_file)
    label = name or _model_name(model)
    eng = _engine(model, endpoint=endpoint, engine=engine, device=device, trust_remote_code=trust_remote_code,
                  tokenizer=tokenizer)
    timer = Timer()
    rows: list[dict[str, Any]] = []
    try:
        with _bar(progress, len(items), "cases") as advance, timer("generate"):
            for c in items:
                answer = eng.generate([c.prompt], n=1, temperature=0.0, max_tokens=max_tokens, seed=0)[0][0]
                rows.append({"name": c.name, "prompt": c.prompt, "expected": c.expected,
                             "forbidden": list(c.forbidden), "output": answer, "passed": P.judge(answer, c)})
                advance(1)
    finally:
        eng.close()
    res = CasesResult(label, rows, sum(r["passed"] for r in rows), len(rows))
    if out is not None:
        with open_run(out) as run:
            run.write_json("cases.json", res.to_json())
            prev = run.read_json("summary.json", default={}).get("cases", {})
            run.update_summary(cases={**prev, label: {"passed": res.passed, "total": res.total}})
            run.record("cases", arguments={"cases_file": str(cases_file or "shipped"), "max_tokens": max_tokens,
                                           "endpoint": endpoint},
                       inputs={"model": model, **({"cases": cases_file} if cases_file else {})},
                       timings=timer.timings)
        res.path = Path(out)
    return res


# ---- undertrained ---------------------------------------------------------------------------------------------

_RESERVED = ("reserved", "unused", "<|extra_", "<pad_", "<|pad_", "<extra_id_")


@dataclass
class UndertrainedResult:
    """undertrained.parquet and summary["undertrained"]; `tokens` answers Hypothesis 1 for the asked tokens."""

    table: pa.Table
    summary: dict[str, Any]
    path: Path | None = None


def undertrained(model: PathLike, *, out: PathLike | None = None, tokens: Sequence[TokenSpec] = (),
                 verify: bool = True, share: float = 0.02, reference: Sequence[TokenSpec] = (),
                 templates: Sequence[str] | None = None, device: str | None = None, batch_size: int = 64,
                 allow_pickle: bool = False, trust_remote_code: bool = False, progress: bool = False
                 ) -> UndertrainedResult:
    """Magikarp-style indicators of under-trained tokens for one model, the `share` most suspicious verified by
    probing (verified when the token's best probability over the templates stays below 0.01).

    `tokens` answers the published Hypothesis 1 (was this token trained at all?): their input-embedding norm and
    its percentile in the vocabulary (a trained token sits well above the bottom percentiles).

    Example:
        >>> r = undertrained("Qwen/Qwen2.5-7B-Instruct", tokens=["嘉祺"], out="runs/q")
        >>> r.summary["tokens"]["嘉祺"]["embed_norm_percentile"]
    """
    import numpy as np
    import pyarrow as pa

    from ..analyses import undertrained as U
    from ..sources.checkpoint import open_checkpoint
    from ..sources.tokenizer import load_tokenizer

    if not 0 < share < 1:
        raise VocabdriftError(f"--share must be between 0 and 1, not {share}")
    timer = Timer()
    with timer("read"):
        ck = open_checkpoint(model, allow_pickle=allow_pickle)
        v = min(ck.rows_of("embed"), ck.rows_of("lm_head"))
        tok = load_tokenizer(Path(str(model)).parent if Path(str(model)).is_file() and
                             Path(str(model)).suffix != ".gguf" else model, trust_remote_code=trust_remote_code)
    asked_specs = [str(t) for t in dict.fromkeys(tokens)]
    asked_ids = resolve_tokens(tok, list(dict.fromkeys(tokens))) if tokens else []  # bad tokens fail early
    special = sorted({int(i) for i in tok.all_special_ids} | {i for i, t in tok.added_tokens_decoder.items()
                                                              if t.special})
    if reference:
        ref = resolve_tokens(tok, list(reference))
    else:  # reserved specials and rows beyond the tokenizer: never in any training text
        ref = [i for i, t in tok.added_tokens_decoder.items() if any(r in str(t.content) for r in _RESERVED)]
        ref += list(range(len(tok), v))
        if len(ref) < 2:  # magikarp: a token that its own text never encodes to cannot have been trained
            ref = _unreachable(tok, special)
    ref = [i for i in ref if i < v]
    with timer("indicators"):
        # block by block: memory is a block of rows, not the two matrices (one pass over embed, three over lm_head)
        def blocks(kind: str) -> Callable[[], Iterator[tuple[int, np.ndarray]]]:
            return lambda: ((s, t.numpy()) for s, t in ck.iter_blocks(kind, stop=v))

        ind = U.indicators_blockwise(blocks("embed" if ck.tied else "lm_head"), blocks("embed"), reference=ref)
        cand = U.candidates(ind, share=share, exclude=[i for i in special if i < v])
    verified = np.full(v, -1, dtype=np.int8)  # -1 not probed
    best_p: dict[int, float] = {}
    if verify and len(cand):
        from ..engines.hf import HFEngine

        with timer("verify"):
            eng = HFEngine(model, device=device, batch_size=batch_size, trust_remote_code=trust_remote_code,
                           tokenizer=tok)
            try:
                encs = [P.encode_template(t, tok) for t in P.resolve_templates(templates, tok)]
                ids = [int(i) for i in cand]
                with _bar(progress, len(ids) * len(encs), "verifying") as advance:
                    for enc in encs:
                        for s in range(0, len(ids), batch_size):
                            blk = ids[s:s + batch_size]
                            for t, sc in zip(blk, eng.score([enc.with_token(t) for t in blk], blk), strict=True):
                                best_p[t] = max(best_p.get(t, 0.0), sc.p)
                            advance(len(blk))
            finally:
                eng.close()
        for t, p in best_p.items():
            verified[t] = int(p < P.VERIFY_P)
    table = pa.table({
        "token_id": pa.array(np.arange(v), pa.int64()),
        "unembed_score": pa.array(ind.unembed_score, pa.float32()),
        "embed_norm": pa.array(ind.embed_norm, pa.float32()),
        "embed_norm_percentile": pa.array(ind.embed_norm_percentile, pa.float32()),
        "verified": pa.array([None if x < 0 else bool(x) for x in verified.tolist()], pa.bool_()),
    })
    asked = {}
    if tokens:
        for spec, i in zip(asked_specs, asked_ids, strict=False):
            asked[spec] = {"token_id": i, "embed_norm": float(ind.embed_norm[i]),
                                "embed_norm_percentile": float(ind.embed_norm_percentile[i]),
                                "unembed_score": float(ind.unembed_score[i]),
                                "unembed_rank": int((ind.unembed_score > ind.unembed_score[i]).sum()) + 1,
                                "verified": None if verified[i] < 0 else bool(verified[i])}
    summary = {"reference": len(ind.reference), "candidates": len(cand), "share": share,
               "verified": int((verified == 1).sum()), "probed": int((verified >= 0).sum()),
               "top": [int(i) for i in cand[:50]], "tokens": asked}
    res = UndertrainedResult(table, summary)
    if out is not None:
        with open_run(out) as run:
            run.write_table("undertrained.parquet", table)
            run.update_summary(undertrained=summary)
            run.record("undertrained", arguments={"share": share, "verify": verify, "tokens": [str(t) for t in tokens],
                                                  "reference": [str(t) for t in reference]},
                       inputs={"model": model}, timings=timer.timings)
        res.path = Path(out)
    return res


def _unreachable(tok: Any, special: Sequence[int]) -> list[int]:
    """Whole-character tokens (not byte fragments, not special) that encoding their own text never produces."""
    from ..sources.tokenizer import read_vocabulary

    voc = read_vocabulary(tok)
    skip = set(special)
    out = []
    for i, (raw, ok) in enumerate(zip(voc.raw, voc.reachable.tolist(), strict=True)):
        if ok or i in skip or raw is None or not raw:
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a partial UTF-8 piece: trained as part of longer characters
        out.append(i)
    return out


# ---- confusion ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfusionPrompt:
    prompt: str
    language: str
    name: str = ""


def read_confusion_prompts(path: PathLike | None = None) -> list[ConfusionPrompt]:
    """Prompts from JSONL ({"prompt", "language", optional "name"}); default: the published ones shipped as
    vocabdrift/data/confusion_prompts.jsonl."""
    p = Path(path) if path is not None else _data_file("confusion_prompts.jsonl")
    out = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append(ConfusionPrompt(rec["prompt"], rec["language"], rec.get("name", f"prompt{i}")))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise VocabdriftError(f"{p}:{i}: a confusion prompt is {{\"prompt\": ..., \"language\": ...}} "
                                      f"({type(e).__name__}: {e})") from e
    return out


def _confusion_prompts(prompts: Any, language: str | None) -> list[ConfusionPrompt]:
    if prompts is None:
        items = read_confusion_prompts()
        return [p for p in items if language is None or p.language == language] or items
    if isinstance(prompts, (str, os.PathLike)) and str(prompts).endswith((".jsonl", ".json")) \
            and Path(str(prompts)).is_file():
        items = read_confusion_prompts(prompts)
        return [ConfusionPrompt(p.prompt, language or p.language, p.name) for p in items]
    if isinstance(prompts, os.PathLike):
        raise VocabdriftError(f"{prompts}: no such prompts file; write JSONL lines {{\"prompt\": ..., "
                              "\"language\": ...}")
    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, ConfusionPrompt):
            out.append(p)
        elif isinstance(p, dict):
            out.append(ConfusionPrompt(p["prompt"], p.get("language") or language or "", p.get("name", "")))
        else:
            if language is None:
                raise VocabdriftError("give --language (ja, ko, zh, ru...) for a prompt given as text")
            out.append(ConfusionPrompt(str(p), language, f"prompt{i + 1}"))
    return out


def confusion(model: PathLike, *, prompts: Any = None, language: str | None = None, n: int = 100,
              temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 256, seed: int = 0,
              base: PathLike | None = None, endpoint: str | None = None, base_endpoint: str | None = None,
              engine: Any = None, tokenizer: str | None = None, device: str | None = None,
              out: PathLike | None = None, trust_remote_code: bool = False, progress: bool = False
              ) -> dict[str, Any]:
    """Sample `n` answers per prompt and count those with letters of a script foreign to the prompt's language.

    Each result has the rate with a Wilson 95% interval and the answers per offending script; with `base`, the two
    models are compared per prompt by Fisher's exact test. Writes RUN/confusion.json and summary["confusion"]
    when `out` is given; returns confusion.json's content (plus "samples", the answers, which are not written).

    Example:
        >>> confusion("runs/lab/models/post", prompts="富士山について教えてください。", language="ja", n=100)
    """
    from ..analyses import confusion as C

    if n < 1:
        raise VocabdriftError(f"-n must be at least 1, not {n}")
    items = _confusion_prompts(prompts, language)
    for p in items:
        C._allowed(p.language)  # a bad language fails before any sampling
    runs: list[tuple[str, PathLike, str | None]] = [("post" if base is not None else _model_name(model), model,
                                                      endpoint)]
    if base is not None:
        runs.insert(0, ("base", base, base_endpoint))
    timer = Timer()
    results, samples = [], {}
    with _bar(progress, len(runs) * len(items), "sampling") as advance:
        for label, spec, ep in runs:
            eng = _engine(spec, endpoint=ep, engine=_for(engine, label), device=device,
                          trust_remote_code=trust_remote_code, tokenizer=tokenizer)
            try:
                for p in items:
                    with timer("generate"):
                        answers = eng.generate([p.prompt], n=n, temperature=temperature, top_p=top_p,
                                               max_tokens=max_tokens, seed=seed)[0]
                    cc = C.count_confusion(answers, p.language)
                    lo, hi = C.wilson_interval(cc.hits, cc.n)
                    results.append({"prompt": p.prompt, "language": p.language, "model": label, "n": cc.n,
                                    "hits": cc.hits, "rate": cc.rate, "ci_low": lo, "ci_high": hi,
                                    "by_script": cc.by_script})
                    samples[(label, p.prompt)] = answers
                    advance(1)
            finally:
                eng.close()
    tests = []
    if base is not None:
        for p in items:
            a = next(r for r in results if r["model"] == "base" and r["prompt"] == p.prompt)
            b = next(r for r in results if r["model"] == "post" and r["prompt"] == p.prompt)
            odds, pv = C.fisher_test(b["hits"], b["n"], a["hits"], a["n"])
            tests.append({"prompt": p.prompt, "models": ["post", "base"], "odds_ratio": odds, "p_value": pv})
    doc = {"results": results, "tests": tests}
    if out is not None:
        with open_run(out) as run:
            run.write_json("confusion.json", doc)
            run.update_summary(confusion={"results": [{k: r[k] for k in ("prompt", "language", "model", "n", "hits",
                                                                          "rate", "ci_low", "ci_high")}
                                                      for r in results], "tests": tests})
            run.record("confusion", arguments={"n": n, "temperature": temperature, "top_p": top_p,
                                               "max_tokens": max_tokens, "endpoint": endpoint,
                                               "prompts": [p.prompt for p in items]},
                       inputs={"model": model if endpoint is None else endpoint,
                               **({"base": base} if base is not None else {})},
                       seed=seed, timings=timer.timings)
    return {**doc, "samples": [{"model": m, "prompt": p, "answers": a} for (m, p), a in samples.items()]}
