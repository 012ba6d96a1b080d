"""`probe`, `cases`, `undertrained`, `confusion`: prove drift with the model itself.

I/O at the edges (models through an engine, the run folder, the shipped data files); prompts and the reading of
answers come from `analyses.probe` and `analyses.confusion`, the indicators from `analyses.undertrained`.
"""

from __future__ import annotations

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
from ..analyses import tokens as T
from ..analyses.tokens import TokenIndex
from ..errors import VocabdriftError
from ..outputs import run as R
from ..outputs.location import check_out
from ..outputs.run import (
    Timer,
    existing_run,
    open_run,
    run_target,
    write_bytes_atomic,
    write_parquet_atomic,
)
from ..sources.spec import ModelSpec, check_weights_policy, parse_model_spec

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from ..engines.base import Engine

log = logging.getLogger(__name__)
PathLike = str | os.PathLike
TokenSpec = T.TokenSpec


# ---- shared helpers -------------------------------------------------------------------------------------------

def _bar(enabled: Any, total: int, description: str) -> Any:
    """`progress.bar`: a rich bar (True), a line at a steady pace in a log ("lines"), or nothing (False)."""
    from ..progress import bar

    return bar(enabled, total, description)


class _Borrowed:
    """An engine the caller opened: used, never closed here."""

    def __init__(self, eng: Engine) -> None:
        self._eng = eng

    def __getattr__(self, name: str) -> Any:
        return getattr(self._eng, name)

    def close(self) -> None:
        pass


def _engine(model: PathLike, *, endpoint: str | None, engine: Any, device: str | None,
            trust_remote_code: bool, allow_pickle: bool = False, tokenizer: Any = None,
            batch_size: int = 64) -> Engine:
    """Open the engine for `model` through the factory; `engine` may also be an engine the caller already opened
    (it is reused)."""
    from ..engines import open_engine

    if engine is not None and not isinstance(engine, str):
        return _Borrowed(engine)  # type: ignore[return-value]
    return open_engine(engine, model, endpoint=endpoint, device=device, batch_size=batch_size,
                       trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, tokenizer=tokenizer)


def _for(engine: Any, label: str) -> Any:
    """An engine object passed by the caller is MODEL's; BASE is opened on its own."""
    return engine if isinstance(engine, str) or label != "base" else None


def _model_name(model: PathLike) -> str:
    """A label for a model in the run's tables: a folder's name, a .gguf file's stem, a hub id's last part."""
    p = Path(str(model)).expanduser()
    return (p.stem if p.suffix == ".gguf" else p.name) or str(model)


def token_index(tokenizer: Any, specs: Sequence[TokenSpec] | None = None, *,
                trust_remote_code: bool = False) -> TokenIndex:
    """The index token specs are resolved against (`analyses.tokens`): the vocabulary table's texts and pieces
    (cached per tokenizer.json) and the tokenizer's encoder. `tokenizer` is a spec or a tokenizer object. When
    every one of `specs` is an id, only the vocabulary's size is needed, and the table is not built."""
    from ..sources.tokenizer import load_tokenizer
    from ..sources.vocabulary import table_of_tokenizer, vocab_table

    path = isinstance(tokenizer, (str, os.PathLike))
    tok = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code) if path else tokenizer
    if specs is not None and all(T.is_id(s) for s in specs):
        return T.TokenIndex(len(tok), {}, {}, T.encoder_of(tok))
    table = vocab_table(tokenizer, trust_remote_code=trust_remote_code) if path else table_of_tokenizer(tok)
    return T.TokenIndex.from_table(table, encode=T.encoder_of(tok))


def resolve_tokens(tok: Any, specs: Sequence[TokenSpec]) -> list[int]:
    """Token ids of `specs` under the one rule (`analyses.tokens.TOKEN_RULE`); `tok` is a tokenizer or its spec."""
    return T.resolve_tokens(list(specs), token_index(tok, list(specs)))


def _tokens_from_run(run: PathLike, top: int) -> list[int]:
    """The `top` most drifted non-special tokens of a diff run (lowest lm_head cosine first)."""
    from ..analyses.drift import most_drifted_ids
    from ..outputs.run import Run

    r = Run(run)
    drift = r.read_table(R.DRIFT, ("token_id", "lm_head_cos"))
    return most_drifted_ids(drift, r.read_table(R.VOCAB, ("token_id", "is_special")) if r.has(R.VOCAB) else None,
                            top)


def _checked_models(model: PathLike, base: PathLike | None, endpoint: str | None, allow_pickle: bool
                    ) -> dict[str, ModelSpec | None]:
    """The local spec of MODEL and BASE (None for a hub id or a served name), each checked against the pickle
    policy now: a refused pickle fails before the tokens are read."""
    local = {str(m): _local_spec(m) for m in (model, base) if m is not None}
    for m, ms in local.items():
        if ms is not None and (m != str(model) or not endpoint):
            check_weights_policy(ms, allow_pickle=allow_pickle)
    return local


def _model_tokenizer(model: PathLike, local: dict[str, ModelSpec | None], endpoint: str | None,
                     tokenizer: str | None, trust_remote_code: bool, verb: str) -> tuple[Any, Any]:
    """(spec, tokenizer) of MODEL: `tokenizer` when given, else the model's own (a served name has none)."""
    from ..sources.tokenizer import load_tokenizer

    ms = local[str(model)]
    spec = tokenizer or (ms.tokenizer_source() if ms is not None else None if endpoint else model)
    if spec is None:
        raise VocabdriftError(f"{verb} through --endpoint needs the model's tokenizer: pass --tokenizer")
    return spec, load_tokenizer(spec, trust_remote_code=trust_remote_code)


def _resolve_asked(tokens: Sequence[TokenSpec], tok: Any, tok_spec: Any, trust_remote_code: bool) -> list[int]:
    """Ids of the asked token specs, resolved before any model loads (ids alone need no vocabulary table)."""
    index = token_index(tok, list(tokens)) if all(map(T.is_id, tokens)) else \
        token_index(tok_spec, trust_remote_code=trust_remote_code)
    return T.resolve_tokens(list(tokens), index)


def non_special_ids(tok: Any) -> list[int]:
    """Every id the tokenizer can emit that is not a special token (`--all-tokens`, the map's default)."""
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return [i for i in range(len(tok)) if i not in special]


def _encoded(models: Sequence[tuple[str, PathLike, str | None, Sequence[str] | None]],
             local: dict[str, ModelSpec | None], tokenizer: str | None, tok: Any, trust_remote_code: bool
             ) -> list[tuple[str, PathLike, str | None, list[P.PromptIds], Any]]:
    """(name, spec, endpoint, encoded templates, tokenizer) per model: each model's templates under its own
    tokenizer (a served model without one: MODEL's), resolved before any partial folder exists, so a bad
    --template leaves nothing behind."""
    from ..sources.tokenizer import load_tokenizer

    plans = []
    for name, spec, ep, tmpl in models:
        ms = local[str(spec)]
        own = tokenizer or ms is not None or not ep
        m_tok = load_tokenizer(tokenizer or (ms.tokenizer_source() if ms is not None else spec),
                               trust_remote_code=trust_remote_code) if own else tok
        plans.append((name, spec, ep, [P.encode_template(t, m_tok) for t in P.resolve_templates(tmpl, m_tok)], m_tok))
    return plans


# ---- probe ----------------------------------------------------------------------------------------------------

@dataclass
class ProbeResult:
    """What `probe` wrote: RUN/probe.parquet and summary["probe"]."""

    path: Path
    table: pa.Table
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _local_spec(model: PathLike) -> ModelSpec | None:
    """The parsed spec of a local model; None for a hub id or a served name (which `sources.spec` cannot check)."""
    try:
        ms = parse_model_spec(model)
    except VocabdriftError:
        return None
    return ms if ms.local else None


def _where(spec: PathLike, ms: ModelSpec | None) -> str:
    """A model in the resume key: a local one by its resolved path, a hub id or served name as written."""
    return str(ms.path.resolve()) if ms is not None and ms.path is not None else str(spec)


def _partial_dir(out: Path, verb: str = "probe") -> Path:
    """Where finished blocks wait for the end of a probe (or a map): beside RUN, so RUN itself appears only on
    success."""
    return out.parent / f".{out.name}.{verb}-partial"


def _open_partial(out: Path, verb: str, key: str, job: dict[str, Any]) -> Path:
    """The partial folder of this job: a different job's leftovers removed, this job's blocks kept (a restart
    resumes from them), job.json naming the job."""
    part = _partial_dir(out, verb)
    if part.exists() and json.loads((part / "job.json").read_text() if (part / "job.json").exists() else "{}"
                                    ).get("key") != key:
        shutil.rmtree(part)  # a different job's leftovers
    part.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(part / "job.json", json.dumps({"key": key, **job}).encode())
    return part


def _job_key(job: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


CONTROL = 40  # undrifted control tokens probed beside the asked ones (with BASE)
DRIFTED = 200  # most drifted tokens of a run probed when no token is named (`--drifted`)


def read_token_file(path: PathLike) -> list[str]:
    """Token specs from a file, one a line (`analyses.tokens.TOKEN_RULE`); blank lines and # comments skipped.
    A line is taken as written, without its line break, so " the" (with its space) stays itself."""
    p = Path(path)
    if not p.is_file():
        raise VocabdriftError(f"{p}: no such token file; write one token (id, text or piece) a line")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of a token
    except UnicodeDecodeError as e:
        raise VocabdriftError(f"{p}: not UTF-8 text ({e.reason}); write one token a line in UTF-8") from e
    specs = [x for x in lines if x.strip() and not x.lstrip().startswith("#")]
    if not specs:
        raise VocabdriftError(f"{p}: holds no token; write one token (id, text or piece) a line")
    return specs


def _control_tokens(run: PathLike, n: int, *, exclude: set[int], seed: int = 0) -> list[int]:
    """`n` undrifted tokens of a diff run, drawn at random (seeded) from the most stable half of the reachable,
    non-special rows: what SFT left alone, to tell a model-wide change from the drifted tokens' own."""
    import numpy as np

    r = R.Run(run)
    drift = r.read_table(R.DRIFT, ("token_id", "lm_head_cos"))
    ids = drift["token_id"].to_numpy()
    cos = drift["lm_head_cos"].to_numpy(zero_copy_only=False).astype(float)
    ok = np.isfinite(cos)
    if r.has(R.VOCAB):
        v = r.read_table(R.VOCAB, ("token_id", "is_special"))
        special = set(np.asarray(v["token_id"])[np.asarray(v["is_special"].to_pylist(), bool)].tolist())
        if "reachable" in v.column_names:
            reach = np.asarray(r.read_table(R.VOCAB, ("token_id", "reachable"))["reachable"].to_pylist(), bool)
            special |= set(np.asarray(v["token_id"])[~reach].tolist())
        ok &= ~np.isin(ids, list(special))
    ok &= ~np.isin(ids, list(exclude))
    pool = ids[ok][np.argsort(-cos[ok], kind="stable")]
    pool = pool[: max(n, len(pool) // 2)]
    rng = np.random.default_rng(seed)
    return sorted(int(t) for t in rng.choice(pool, size=min(n, len(pool)), replace=False))


def _summary(table: pa.Table, names: list[str], paired: bool, top_p: float) -> dict[str, Any]:
    """summary["probe"]: the asked tokens' outcomes (control rows apart), and with BASE the headline change."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rule: dict[str, Any] = {}
    read = table
    if paired:
        by_model = {m: set(table.filter(pc.equal(table["model"], m))["template"].to_pylist()) for m in names}
        if by_model.get("base") == by_model.get("post"):
            # the same prompts asked of both: the template rule. A template on which POST lost every token,
            # controls included, is a template failure: left out of every count, shown per template
            from ..analyses.verdict import post_lost

            _, lost, controls, control_lost, failed, use = post_lost(table)
            rule = {"lost": lost, "control_lost": control_lost, "controls": len(controls),
                    "template_failures": failed, "templates_read": use}
            if use:
                read = table.filter(pc.is_in(table["template"], pa.array(use)))
    asked = read.filter(pc.invert(read["control"])) if "control" in read.column_names else read
    summary = P.summarize_probe(asked, names, base="base" if paired else None, post="post" if paired else None)
    summary["top_p"] = top_p
    summary["templates"] = sorted(set(table["template"].to_pylist()))
    if paired:
        summary["headline"] = P.headline(read, base="base", post="post")
        summary["headline"]["templates"] = P.headline(table, base="base", post="post")["templates"]
        summary.update(rule)
    return summary


def _probed_before(out: Path, ids: list[int], plans: list[Any], inputs: dict[str, Any], top_p: float,
                   paired: bool) -> ProbeResult | None:
    """A rerun over RUN/probe.parquet: the result RUN holds when it already probed these tokens the same way
    (said on stderr), None when this probe may write (a wider one of the same kind), else one clear error: a
    narrower or different probe never silently replaces the one RUN holds."""
    import pyarrow as pa
    import pyarrow.compute as pc

    run = R.Run(out)
    old = run.read_table(R.PROBE, (*R.REQUIRED_COLUMNS[R.PROBE], "template"))
    stamp = run.read_json(R.MANIFEST, default={}).get("files", {}).get(R.PROBE) or {}
    made = {(str(n), str(t)) for n, t in zip(old["model"].to_pylist(), old["template"].to_pylist(), strict=True)}
    same = (stamp.get("models") == {k: R.model_identity(v) for k, v in inputs.items()}
            and (stamp.get("arguments") or {}).get("top_p") == top_p
            and made == {(n, e.template) for n, _s, _e, enc in plans for e in enc})
    control = old["control"] if "control" in old.column_names else pa.array([False] * old.num_rows)
    have = set(old.filter(pc.invert(control))["token_id"].to_pylist())  # the asked tokens, not the controls
    if same and set(ids) <= have:
        log.warning("%s already holds a probe of these %s tokens (of %s, same models, templates and top-p); "
                    "nothing recomputed (--force probes again)", out / R.PROBE, f"{len(set(ids)):,}", f"{len(have):,}")
        table = old.filter(pc.or_(pc.is_in(old["token_id"], pa.array(ids, pa.int64())), control))
        names = list(dict.fromkeys(table["model"].to_pylist()))
        return ProbeResult(out, table, _summary(table, names, paired, top_p))
    if same and set(ids) >= have:
        return None  # a wider probe of the same kind replaces a narrower one
    how = "" if same else " made another way (another model, template or top-p)"
    raise VocabdriftError(f"{out / R.PROBE}: holds a probe of {len(have):,} tokens{how}; this probe of "
                          f"{len(set(ids)):,} tokens would replace it — pass --force to replace it, or -o another "
                          "run folder")


def probe(model: PathLike, *, out: PathLike | None = None, tokens: Sequence[TokenSpec] | None = None,
          base: PathLike | None = None, run: PathLike | None = None, drifted: int = DRIFTED,
          all_tokens: bool = False, templates: Sequence[str] | None = None,
          base_templates: Sequence[str] | None = None, top_p: float = P.TOP_P, endpoint: str | None = None,
          engine: Any = None, tokenizer: str | None = None, device: str | None = None, batch_size: int = 64,
          block_tokens: int = 1024, trust_remote_code: bool = False, allow_pickle: bool = False,
          progress: bool | str = False, tokens_file: PathLike | None = None, control: int = CONTROL,
          force: bool = False) -> ProbeResult:
    """Ask MODEL (and BASE) to say each token; write RUN/probe.parquet and summary["probe"].

    Each token goes into every template (chat families for a model with a chat template, few-shot ones for a base
    model without); the probability and rank of the token as the first answer token are recorded, and whether top-p
    sampling at `top_p` keeps it. A token is sayable by a model when any template gets it kept. With `base`, LOST
    lists the tokens sayable by BASE and not by MODEL.

    Resumable: finished blocks of `block_tokens` tokens are kept beside RUN (in `.RUN.probe-partial/`) until the
    end; a probe killed and restarted with the same arguments skips them and gives identical results.

    Args:
        model: the (post-trained) model: folder, .gguf file or hub id (or the served name with `endpoint`).
        out: the run folder to write (default: `run`).
        tokens: ids, pieces or texts to probe; or `all_tokens` (every non-special token); without either, the
            `drifted` most drifted tokens of the diff in `run` (or in `out`).
        run: an existing run folder (`--run`, as every command names one): where the most drifted and the control
            tokens are read from, and where the probe is written unless `out` says otherwise.
        drifted: how many of the most drifted tokens to probe (`--drifted`).
        base: the pre-trained model, probed the same way (locally).
        templates / base_templates: template names from `analyses.probe.TEMPLATES` (default by model kind).
        endpoint: probe MODEL through an OpenAI-compatible server that returns logprobs.
        engine: "hf" (default) or "vllm"; or an engine already opened on MODEL (e.g. `HFEngine`), reused.
        batch_size: prompts per forward pass; block_tokens: tokens per resumable block.
        allow_pickle: accept pickle weights (`pytorch_model.bin`); refused otherwise, before anything loads.
        tokens_file: a file of token specs, one a line (blank lines and lines starting with # skipped), read
            as `tokens` (and added to them).
        control: with `base`, also probe this many undrifted tokens drawn from RUN's drift table (the most
            stable reachable, non-special rows, seeded), so the headline compares the probed tokens' change
            against tokens SFT left alone (0: none). Needs drift.parquet in `run` or `out`.
        force: replace a probe RUN already holds even when this one is narrower or made another way. Without
            it, a rerun whose tokens RUN already probed the same way says so and recomputes nothing, and a probe
            that would replace a different one is refused.

    Example:
        >>> probe("runs/lab/models/post", base="runs/lab/models/base", tokens=["嘉祺", "地税"], out="runs/lab")
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq


    if run is not None:
        run = existing_run(run)
    if out is None and run is None:
        raise VocabdriftError("say where to write: --run RUN (an existing run folder, e.g. from diff) or -o RUN")
    out = Path(out) if out is not None else Path(run)  # type: ignore[arg-type]
    if tokens_file is not None:
        tokens = [*(tokens or ()), *read_token_file(tokens_file)]
    if tokens is not None and all_tokens:
        raise VocabdriftError("say which tokens to probe: --token/--tokens-file or --all-tokens, not both")
    drift_run = run if run is not None else out if (out / R.DRIFT).is_file() else None
    if tokens is None and not all_tokens and drift_run is None:
        raise VocabdriftError("say which tokens to probe: --token (or --tokens-file), --all-tokens, or --run RUN "
                              "(a diff's run folder: its --drifted most drifted tokens)")
    if drifted < 1:
        raise VocabdriftError(f"--drifted {drifted}: probe at least one token")
    if not 0 <= top_p <= 1:
        raise VocabdriftError(f"--top-p must be in [0, 1] (0: greedy), not {top_p}")
    if batch_size < 1 or block_tokens < 1:
        raise VocabdriftError(f"--batch-size must be at least 1, not {min(batch_size, block_tokens)}")
    check_out(out, models=[model, base, tokenizer])  # before any partial folder: never into a model folder
    R.refuse_foreign(out, model, base)  # another pair's folder: said now, never a folder left unreportable
    if device is not None:
        from ..device import best_device

        best_device(device)  # a device that is not here fails now, not when the first engine loads
    timer = Timer()
    local = _checked_models(model, base, endpoint, allow_pickle)
    with timer("tokens"):
        tok_spec, tok = _model_tokenizer(model, local, endpoint, tokenizer, trust_remote_code, "probing")
        if tokens is not None:
            ids = _resolve_asked(tokens, tok, tok_spec, trust_remote_code)
        elif not all_tokens:
            ids = _tokens_from_run(drift_run, drifted)
        else:
            ids = non_special_ids(tok)
        if not ids:
            raise VocabdriftError("no tokens to probe")

    models: list[tuple[str, PathLike, str | None, Sequence[str] | None]] = []  # (name, spec, endpoint, templates)
    if base is not None:
        models.append(("base", base, None, base_templates))
        models.append(("post", model, endpoint, templates))
    else:
        models.append((_model_name(model), model, endpoint, templates))
    with timer("templates"):
        plans = [p[:4] for p in _encoded(models, local, tokenizer, tok, trust_remote_code)]
    inputs = {"model": model, **({"base": base} if base is not None else {})}
    if not force and (out / R.PROBE).is_file():
        done = _probed_before(out, ids, plans, inputs, top_p, base is not None)
        if done is not None:
            return done
    control_ids: list[int] = []
    if base is not None and control > 0:
        if drift_run is not None:
            control_ids = [t for t in _control_tokens(drift_run, control, exclude=set(ids)) if t < len(tok)]
    ids = ids + control_ids
    job = {"models": [[n, _where(s, local[str(s)]), e, list(t or [])] for n, s, e, t in models],
           "tokens": ids, "top_p": top_p, "block": block_tokens}
    key = _job_key(job)
    part = _open_partial(out, "probe", key, job)

    blocks = [(s, ids[s:s + block_tokens]) for s in range(0, len(ids), block_tokens)]
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
                                              trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                              tokenizer=tokenizer, batch_size=batch_size)
                        with timer("score"):
                            scores = eng.score([enc.with_token(t) for t in block], block, top_p=top_p)
                        t_block = P.probe_table(block, name, enc.template, scores)
                        write_parquet_atomic(f, t_block)
                        tables.append(t_block)
                        advance(len(block))
            finally:
                if eng is not None:
                    eng.close()

    table = pa.concat_tables(tables).sort_by([("model", "ascending"), ("template", "ascending"),
                                              ("token_id", "ascending")])
    names = [m[0] for m in models]
    if control_ids:
        table = table.append_column("control", pc.is_in(table["token_id"], pa.array(control_ids, pa.int64())))
    summary = _summary(table, names, base is not None, top_p)
    with open_run(out) as run:
        run.write_table(R.PROBE, table)
        run.update_summary(probe=summary)
        run.record("probe", arguments={"tokens": len(ids) - len(control_ids), "control": len(control_ids),
                                       "templates": list(templates or []),
                                       "base_templates": list(base_templates or []), "top_p": top_p,
                                       "endpoint": endpoint, "engine": engine if isinstance(engine, str) else "hf",
                                       "batch_size": batch_size},
                   inputs=inputs, timings=timer.timings)
        path = run.path
    shutil.rmtree(part, ignore_errors=True)
    return ProbeResult(out if out.exists() else path, table, summary, timer.timings)


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
          trust_remote_code: bool = False, allow_pickle: bool = False, progress: bool | str = False,
          run: PathLike | None = None) -> CasesResult:
    """Run user-written cases greedily: pass when the answer holds `expected` and no `forbidden` string.

    Writes RUN/cases.json and summary["cases"][name] when `out` (a new or existing run folder) or `run` (an
    existing one) is given.

    Example:
        >>> r = cases("runs/lab/models/post")          # the published cases
        >>> print(f"{r.passed}/{r.total}")
    """
    out = run_target(out, run, required=False)
    if out is not None:  # before any answer is generated: never into a model folder
        check_out(out, models=[model, tokenizer], data=[cases_file])
        R.refuse_foreign(out, model)
    if max_tokens < 1:
        raise VocabdriftError(f"--max-tokens must be at least 1, not {max_tokens}")
    items = read_cases(cases_file)
    label = name or _model_name(model)
    eng = _engine(model, endpoint=endpoint, engine=engine, device=device, trust_remote_code=trust_remote_code,
                  allow_pickle=allow_pickle, tokenizer=tokenizer)
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
            run.write_json(R.CASES, res.to_json())
            prev = run.read_json(R.SUMMARY, default={}).get("cases", {})
            run.update_summary(cases={**prev, label: {"passed": res.passed, "total": res.total}})
            run.record("cases", arguments={"cases_file": str(cases_file or "shipped"), "max_tokens": max_tokens,
                                           "endpoint": endpoint},
                       inputs={"model": model, **({"cases": cases_file} if cases_file else {})},
                       timings=timer.timings)
        res.path = Path(out)
    return res


# ---- undertrained ---------------------------------------------------------------------------------------------

@dataclass
class UndertrainedResult:
    """undertrained.parquet and summary["undertrained"]; `tokens` answers Hypothesis 1 for the asked tokens."""

    table: pa.Table
    summary: dict[str, Any]
    path: Path | None = None


def undertrained(model: PathLike, *, out: PathLike | None = None, tokens: Sequence[TokenSpec] = (),
                 verify: bool = True, share: float = 0.02, reference: Sequence[TokenSpec] = (),
                 unused: Sequence[TokenSpec] = (), reserved_names: dict[str, str] | None = None,
                 collapse: bool = True, templates: Sequence[str] | None = None, device: str | None = None,
                 batch_size: int = 64,
                 allow_pickle: bool = False, trust_remote_code: bool = False, progress: bool | str = False,
                 run: PathLike | None = None) -> UndertrainedResult:
    """Magikarp-style indicators of under-trained tokens for one model, the `share` most suspicious verified by
    probing (verified when the token's best probability over the templates stays below 0.01).

    The reference rows (known unused) are the tokens named by `reserved_names` (default
    `analyses.vocab.RESERVED_NAMES`, one pattern per tokenizer family), a GGUF's UNUSED tokens and the matrix rows
    past the tokenizer, plus the user's `unused` tokens; `reference` replaces them all.

    With `collapse` (the default), groups of near-identical rows (`analyses.collapse`) in lm_head (and embed when
    untied): columns `{space}_collapse_group` and `{space}_collapse_size`, and summary["collapse"] per category.

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

    out = run_target(out, run, required=False)  # `run`: an existing run folder to add to
    if out is not None:  # before the matrices are read: never into a model folder
        check_out(out, models=[model])
        R.refuse_foreign(out, model)
    if not 0 < share < 1:
        raise VocabdriftError(f"--share must be between 0 and 1, not {share}")
    timer = Timer()
    with timer("read"):
        ck = open_checkpoint(model, allow_pickle=allow_pickle)
        v = min(ck.rows_of("embed"), ck.rows_of("lm_head"))
        tok_spec = parse_model_spec(ck.path).tokenizer_source()
        tok = load_tokenizer(tok_spec, trust_remote_code=trust_remote_code)
    index = token_index(tok_spec, [*tokens, *reference, *unused], trust_remote_code=trust_remote_code) \
        if tokens or reference or unused else None
    asked_specs = [str(t) for t in dict.fromkeys(tokens)]
    # bad tokens fail early, before any indicator is computed or model loaded
    asked_ids = [T.resolve_token(t, index) for t in dict.fromkeys(tokens)] if index is not None else []
    with timer("vocab"):
        vt = _undertrained_vocab(tok_spec, tok, size=max(ck.rows_of("embed"), ck.rows_of("lm_head")),
                                 trust_remote_code=trust_remote_code)
    added = T.resolve_tokens(list(unused), index) if index is not None and unused else []
    special = sorted({int(i) for i in tok.all_special_ids} | {i for i, t in tok.added_tokens_decoder.items()
                                                              if t.special}
                     | set(np.flatnonzero(vt.column("is_special").to_numpy(zero_copy_only=False)).tolist()))
    if reference:
        assert index is not None
        ref = T.resolve_tokens(list(reference), index)
    else:  # reserved names, GGUF UNUSED tokens and rows past the tokenizer: never in any training text
        ref = unused_ids(vt, names=reserved_names).tolist() + added
        if len(set(ref)) < 2:  # magikarp: a token that its own text never encodes to cannot have been trained
            ref = _unreachable(tok, special) + added
    ref = sorted({i for i in ref if i < v})
    with timer("indicators"):
        # block by block: memory is a block of rows, not the two matrices (one pass over embed, three over lm_head)
        def blocks(kind: str) -> Callable[[], Iterator[tuple[int, np.ndarray]]]:
            return lambda: ((s, t.numpy()) for s, t in ck.iter_blocks(kind, stop=v))

        ind = U.indicators_blockwise(blocks("embed" if ck.tied else "lm_head"), blocks("embed"), reference=ref)
        cand = U.candidates(ind, share=share, exclude=[i for i in special if i < v])
    groups: dict[str, Any] = {}
    if collapse:
        from ..analyses.collapse import collapsed_groups

        with timer("collapse"):  # groups of near-identical rows: tokens that cannot be told apart
            for space in (("lm_head",) if ck.tied else ("lm_head", "embed")):
                groups[space] = collapsed_groups(blocks("embed" if space == "lm_head" and ck.tied else space))
    verified = np.full(v, -1, dtype=np.int8)  # -1 not probed
    best_p: dict[int, float] = {}
    if verify and len(cand):
        from ..engines import open_engine

        with timer("verify"):
            eng = open_engine("hf", model, device=device, batch_size=batch_size,
                              trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, tokenizer=tok)
            try:
                encs = [P.encode_template(t, tok) for t in P.resolve_templates(templates, tok)]
                ids = [int(i) for i in cand]
                with _bar(progress, len(ids), "verifying") as advance:
                    best_p = verify_candidates(eng, encs, ids, batch_size=batch_size, advance=advance)
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
    for space, c in groups.items():  # group: the smallest id of the row's group, -1 when in none
        table = table.append_column(f"{space}_collapse_group", pa.array(c.group, pa.int64())) \
                     .append_column(f"{space}_collapse_size", pa.array(c.size, pa.int32()))
    asked = {}
    if tokens:
        for spec, i in zip(asked_specs, asked_ids, strict=False):
            asked[spec] = {"token_id": i, "embed_norm": float(ind.embed_norm[i]),
                                "embed_norm_percentile": float(ind.embed_norm_percentile[i]),
                                "unembed_score": float(ind.unembed_score[i]),
                                "unembed_rank": int((ind.unembed_score > ind.unembed_score[i]).sum()) + 1,
                                "verified": None if verified[i] < 0 else bool(verified[i])}
    from ..analyses.collapse import collapse_summary

    cats = vt.column("category").combine_chunks().cast("string").to_numpy(zero_copy_only=False)
    summary = {"reference": len(ind.reference), "candidates": len(cand), "share": share,
               "padding_rows": int((cats == "padding").sum()), "unused_rows": int((cats == "unused").sum()),
               **({"collapse": {space: collapse_summary(c, cats[:v]) for space, c in groups.items()}}
                  if groups else {}),
               "verified": int((verified == 1).sum()), "probed": int((verified >= 0).sum()),
               "top": [int(i) for i in cand[:50]], "tokens": asked}
    res = UndertrainedResult(table, summary)
    if out is not None:
        with open_run(out) as run:
            run.write_table(R.UNDERTRAINED, table)
            run.update_summary(undertrained=summary)
            run.record("undertrained", arguments={"share": share, "verify": verify, "tokens": [str(t) for t in tokens],
                                                  "reference": [str(t) for t in reference],
                                                  "unused": [str(t) for t in unused],
                                                  "reserved_names": reserved_names, "collapse": collapse},
                       inputs={"model": model}, timings=timer.timings)
        res.path = Path(out)
    return res


def verify_candidates(eng: Engine, encs: Sequence[P.PromptIds], ids: Sequence[int], *, batch_size: int = 64,
                      advance: Callable[[int], Any] | None = None) -> dict[int, float]:
    """Each token's best probability over the templates, as far as its verdict needs: a token is verified
    under-trained when its best p stays below VERIFY_P, so once one template gives it p >= VERIFY_P its verdict is
    known and the other templates are skipped for it (its value here is then that template's p, not the maximum).

    Why: probing every candidate with every template cost a 0.5B model minutes per hundred candidates. Tokens go
    in batches of `batch_size`; within a batch the templates are tried in the order of how many tokens each has
    decided so far, so the template that settles most verdicts (on SmolLM2 the quoted one, which decides nearly
    every token) runs first and usually alone. A first batch of 8 tokens learns that order. The engine's
    `logprobs` (HFEngine: each template's prefix computed once and kept, each row's tail alone through the
    decoder, lm_head at the one position read) is used when it has one, else `score`. The verdicts are those of
    probing every template (tests/test_real_vocab.py; bench/undertrained_verify.py).
    """
    import math

    logprobs = getattr(eng, "logprobs", None)

    def ps(prompts: list[list[int]], targets: list[int]) -> list[float]:
        if logprobs is not None:
            return [math.exp(x) for x in logprobs(prompts, targets)]
        return [sc.p for sc in eng.score(prompts, targets)]

    best: dict[int, float] = {}
    decided = [0] * len(encs)
    tried = [0] * len(encs)
    # a small first batch learns which template is most decisive before the full batches follow it
    pilot = min(batch_size, 8)
    starts = [0, *range(pilot, len(ids), batch_size)] if len(ids) > pilot else [0]
    for s, e in zip(starts, [*starts[1:], len(ids)], strict=True):
        open_ = [int(t) for t in ids[s:e]]
        for t in open_:
            best[t] = 0.0
        n = len(open_)
        # most decisive first (ties: the given order)
        for j in sorted(range(len(encs)), key=lambda j: (-decided[j] / tried[j] if tried[j] else 0.0, j)):
            if not open_:
                break
            enc = encs[j]
            for t, p in zip(open_, ps([enc.with_token(t) for t in open_], open_), strict=True):
                best[t] = max(best[t], p)
            tried[j] += len(open_)
            still = [t for t in open_ if best[t] < P.VERIFY_P]
            decided[j] += len(open_) - len(still)
            open_ = still
        if advance is not None:
            advance(n)
    return best


def _undertrained_vocab(tok_spec: Any, tok: Any, *, size: int, trust_remote_code: bool) -> pa.Table:
    """The vocabulary table for `undertrained`: cached for a tokenizer.json, else read from the tokenizer already
    loaded (a GGUF's token types included)."""
    from ..sources.tokenizer import gguf_of
    from ..sources.vocabulary import _cache_key, table_of_tokenizer, vocab_table

    if _cache_key(tok_spec, size) is not None:
        return vocab_table(tok_spec, size=size, trust_remote_code=trust_remote_code)
    if len(tok) > size:
        raise VocabdriftError(f"{tok_spec}: the tokenizer has {len(tok)} tokens but the model has only {size} rows; "
                              "this tokenizer belongs to another model")
    return table_of_tokenizer(tok, size=size, gguf=gguf_of(tok_spec))


def unused_ids(vocab: pa.Table, *, names: dict[str, str] | None = None) -> np.ndarray:
    """Rows known to be unused in a vocabulary table: category "unused" and "padding" (default names), or, with
    `names`, padding rows, GGUF UNUSED tokens and the pieces matching `names` (which replaces RESERVED_NAMES)."""
    import numpy as np

    from ..analyses.vocab import GGUF_UNUSED, reserved_ids

    cats = vocab.column("category").combine_chunks().cast("string").to_numpy(zero_copy_only=False)
    if names is None:
        return np.flatnonzero((cats == "unused") | (cats == "padding")).astype(np.int64)
    mask = cats == "padding"
    if "token_type" in vocab.column_names:
        mask |= vocab.column("token_type").to_numpy(zero_copy_only=False) == GGUF_UNUSED
    mask[reserved_ids(vocab.column("piece").to_pylist(), names)] = True
    return np.flatnonzero(mask).astype(np.int64)


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
              out: PathLike | None = None, trust_remote_code: bool = False, allow_pickle: bool = False,
              progress: bool | str = False, run: PathLike | None = None) -> dict[str, Any]:
    """Sample `n` answers per prompt and count those with letters of a script foreign to the prompt's language.

    Each result has the rate with a Wilson 95% interval and the answers per offending script; with `base`, the two
    models are compared per prompt by Fisher's exact test. Each result also counts the answers written mostly in
    the language's own scripts ("native": kana and kanji for Japanese). Writes RUN/confusion.json,
    summary["confusion"] and every sampled answer to RUN/confusion.jsonl (prompt, model, sample index, text, the
    foreign scripts found) when `out` or `run` is given; returns confusion.json's content plus "samples", the
    answers.

    Example:
        >>> confusion("runs/lab/models/post", prompts="富士山について教えてください。", language="ja", n=100)
    """
    from ..analyses import confusion as C

    out = run_target(out, run, required=False)  # `run`: an existing run folder to add to
    if out is not None:  # before any sample is drawn: never into a model folder
        check_out(out, models=[model, base])
        R.refuse_foreign(out, model, base)
    if n < 1:
        raise VocabdriftError(f"-n must be at least 1, not {n}")
    if not 0 <= temperature < float("inf"):  # NaN fails this too
        raise VocabdriftError(f"--temperature must be a number >= 0, not {temperature}")
    if not 0 <= top_p <= 1:
        raise VocabdriftError(f"--top-p must be in [0, 1], not {top_p}")
    if max_tokens < 1:
        raise VocabdriftError(f"--max-tokens must be at least 1, not {max_tokens}")
    items = _confusion_prompts(prompts, language)
    for p in items:
        C._allowed(p.language)  # a bad language fails before any sampling
    runs: list[tuple[str, PathLike, str | None]] = [("post" if base is not None else _model_name(model), model,
                                                      endpoint)]
    if base is not None:
        runs.insert(0, ("base", base, base_endpoint))
    timer = Timer()
    results, samples, rows = [], {}, []
    with _bar(progress, len(runs) * len(items), "sampling") as advance:
        for label, spec, ep in runs:
            eng = _engine(spec, endpoint=ep, engine=_for(engine, label), device=device,
                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, tokenizer=tokenizer)
            try:
                for k, p in enumerate(items):
                    with timer("generate"):  # each prompt its own random draws (both models the same ones)
                        answers = eng.generate([p.prompt], n=n, temperature=temperature, top_p=top_p,
                                               max_tokens=max_tokens, seed=seed + 7919 * k)[0]
                    cc = C.count_confusion(answers, p.language)
                    lo, hi = C.wilson_interval(cc.hits, cc.n)
                    results.append({"prompt": p.prompt, "name": p.name, "language": p.language, "model": label,
                                    "n": cc.n, "hits": cc.hits, "rate": cc.rate, "ci_low": lo, "ci_high": hi,
                                    "by_script": cc.by_script, "native": cc.native,
                                    "native_rate": cc.native / cc.n})
                    samples[(label, p.prompt)] = answers
                    rows += C.answer_rows(answers, prompt=p.prompt, language=p.language, model=label, name=p.name)
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
            run.write_json(R.CONFUSION, doc)
            run.write_jsonl(R.CONFUSION_ANSWERS, rows)
            run.update_summary(confusion={"results": [{k: r[k] for k in ("prompt", "name", "language", "model", "n",
                                                                          "hits", "rate", "ci_low", "ci_high",
                                                                          "by_script", "native", "native_rate")}
                                                      for r in results], "tests": tests})
            run.record("confusion", arguments={"n": n, "temperature": temperature, "top_p": top_p,
                                               "max_tokens": max_tokens, "endpoint": endpoint,
                                               "prompts": [p.prompt for p in items]},
                       inputs={"model": model if endpoint is None else endpoint,
                               **({"base": base} if base is not None else {})},
                       seed=seed, timings=timer.timings)
    return {**doc, "samples": [{"model": m, "prompt": p, "answers": a} for (m, p), a in samples.items()]}
