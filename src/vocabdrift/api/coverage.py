"""`coverage`, `synth`, `mix`, `prune_suggest`: predict drift from the SFT data, and fill the floor before training.

I/O at the edges (data files, tokenizers, the run folder, output JSONL); the numbers come from `analyses.coverage`
and `analyses.synth`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..analyses import coverage as C
from ..analyses import synth as S
from ..analyses.advice import common_words, coverage_advice
from ..analyses.recommend import MAX_TOKENS as RECOMMENDED_TOKENS
from ..analyses.vocab import LANGUAGE_NAMES
from ..errors import VocabdriftError
from ..outputs import run as R
from ..outputs.location import check_out
from ..outputs.run import Timer, open_run, run_target, write_lines_atomic
from ..sources.data import DataReader, Malformed, Sample, detect_shape
from ..sources.tokenizer import load_tokenizer
from ..sources.vocabulary import table_of_tokenizer, vocab_table

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


# ---- shared helpers ---------------------------------------------------------------------------------------------

def _tokenizer(spec: Any) -> Any:
    """A transformers fast tokenizer from a path/hub id, a transformers tokenizer, or a raw `tokenizers.Tokenizer`."""
    if isinstance(spec, (str, os.PathLike)):
        return load_tokenizer(spec)
    if hasattr(spec, "backend_tokenizer"):
        return spec
    if type(spec).__module__.startswith("tokenizers"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=spec)
    raise VocabdriftError(f"not a tokenizer: {type(spec).__name__}; pass a model folder, a tokenizer.json or a "
                          "tokenizer object")


def _vocab_of(spec: Any, tok: Any) -> pa.Table:
    """The vocabulary table through its one home (`sources.vocabulary`): read from the cache for a tokenizer named
    by a path (built and cached the first time), built afresh for a tokenizer object."""
    if isinstance(spec, (str, os.PathLike)):
        return vocab_table(spec)
    return table_of_tokenizer(tok)


def _check_same_tokenizer(vocab: pa.Table, tok: Any, where: Path) -> None:
    """The run's vocab.parquet must come from this tokenizer, or counts would join onto the wrong tokens."""
    backend = tok.backend_tokenizer
    n = backend.get_vocab_size(with_added_tokens=True)
    pieces = vocab.column("piece").to_pylist()
    if len(pieces) < n or any(pieces[i] != backend.id_to_token(i) for i in range(0, n, max(1, n // 4096))) \
            or any(pieces[i] != (backend.id_to_token(i) or "") for i in range(max(0, n - 64), n)):
        raise VocabdriftError(f"{where}/vocab.parquet was made with another tokenizer ({len(pieces)} tokens, this one "
                              f"has {n}); pass the same --tokenizer as the diff, or a new -o folder")


def _progress(enabled: bool, unit: str):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"),
                    TextColumn("{task.completed:,.0f} " + unit), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), disable=enabled is not True, transient=True)  # a bar on a terminal only


# ---- coverage ---------------------------------------------------------------------------------------------------

@dataclass
class CoverageResult:
    """What `coverage` found: the per-token table, the summary written to summary.json, and what was skipped."""

    path: Path | None
    table: pa.Table
    summary: dict[str, Any]
    below_floor: pa.Table
    under_covered: list[str]
    malformed: list[Malformed] = field(default_factory=list)
    scatter: pa.Table | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _batches(it: Iterator[Sample], n: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in it:
        batch.append(s)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def count_targets(samples: Iterator[Sample], tok: Any, *, vocab_size: int, targets: C.Targets = "assistant",
                  batch_size: int = 512, on_bad: Callable[[str, str], None] | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Stream `samples` through the renderer and `encode_batch`; return (count, samples, stats).

    Rendering batch k+1 overlaps encoding batch k (`encode_batch` releases the GIL), and each batch is reduced to
    two bincounts at once, so memory stays flat however long the stream.
    """
    backend = tok.backend_tokenizer
    renderer = C.Renderer(tok, targets=targets)
    count = np.zeros(vocab_size, dtype=np.int64)
    nsamp = np.zeros(vocab_size, dtype=np.int64)
    stats = {"samples": 0, "target_tokens": 0, "tokens": 0, "render": renderer.mode}
    need_spans = targets != "all"

    fast = getattr(backend, "encode_batch_fast", None)  # no offsets: twice as fast where spans are not needed

    def encode(rendered: list[C.Rendered]) -> list[Any]:
        texts = [r.text for r in rendered]
        if fast is not None and (not need_spans or all(r.spans is None for r in rendered)):
            return fast(texts, add_special_tokens=False)
        return backend.encode_batch(texts, add_special_tokens=False)

    def reduce(rendered: list[C.Rendered], encs: list[Any]) -> None:
        per = [C.target_ids(e.ids, r.spans if need_spans else None, e) for r, e in zip(rendered, encs, strict=True)]
        c, s = C.batch_counts(per, vocab_size)
        np.add(count, c, out=count)
        np.add(nsamp, s, out=nsamp)
        n_tok = sum(len(e) for e in encs)
        n_tgt = int(c.sum())
        stats["samples"] += len(rendered)
        stats["tokens"] += n_tok
        stats["target_tokens"] += n_tgt
        if on_progress:
            on_progress(len(rendered), n_tok)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in _batches(samples, batch_size):
            rendered: list[C.Rendered] = []
            for s, r in zip(batch, renderer.render(batch), strict=True):
                if isinstance(r, str):
                    if on_bad:
                        on_bad(s.source, r)
                else:
                    rendered.append(r)
            fut = pool.submit(encode, rendered)
            if pending is not None:
                reduce(pending[0], pending[1].result())
            pending = (rendered, fut)
        if pending is not None:
            reduce(pending[0], pending[1].result())
    return count, nsamp, stats


class _RayCounter:
    """Ray Data actor: holds the tokenizer and reduces each block of records to two bincounts."""

    def __init__(self, tok: Any, vocab_size: int, targets: str, field: str | None):
        self.tok, self.vocab_size, self.targets, self.field = tok, vocab_size, targets, field

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        from ..sources.data import BadRecord, drop_none, to_sample

        samples, bad = [], 0
        for k, rec in enumerate(batch.to_pylist()):
            try:
                samples.append(to_sample(drop_none(rec), f"ray:#{k}", field=self.field))
            except BadRecord:
                bad += 1
        bad_render = [0]

        def on_bad(_src: str, _reason: str) -> None:
            bad_render[0] += 1

        count, nsamp, st = count_targets(iter(samples), self.tok, vocab_size=self.vocab_size,
                                         targets=self.targets, on_bad=on_bad)  # type: ignore[arg-type]
        return {"count": count[None, :], "samples": nsamp[None, :],
                "n": np.array([[st["samples"], st["tokens"], st["target_tokens"], bad + bad_render[0]]])}


def count_targets_ray(files: Sequence[Path | str], tok: Any, *, vocab_size: int, targets: C.Targets = "assistant",
                      field: str | None = None, batch_size: int = 512, num_cpus: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """The same counts as `count_targets`, on Ray Data: read_json/read_parquet, one tokenizer per actor, a
    bincount per batch, summed on the driver. Connects to RAY_ADDRESS when set, else starts a local Ray."""
    if num_cpus is not None and num_cpus < 2:  # one CPU held by the counting actor, at least one for the reads
        raise VocabdriftError(f"--num-cpus {num_cpus}: Ray needs at least 2 (a counting actor holds one for its "
                              "whole life, the reads need another); or use --engine local")
    try:
        import ray
    except ImportError as e:
        raise VocabdriftError("--engine ray needs Ray Data: pip install 'vocabdrift[ray]'") from e
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 logging_level=logging.WARNING)
    try:
        return _count_on_ray(ray, files, tok, vocab_size=vocab_size, targets=targets, field=field,
                             batch_size=batch_size)
    finally:
        if started:  # a Ray this command started ends with it, on every exit path: no daemons left behind
            ray.shutdown()


def _count_on_ray(ray: Any, files: Sequence[Path | str], tok: Any, *, vocab_size: int, targets: C.Targets,
                  field: str | None, batch_size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    if int(ray.cluster_resources().get("CPU", 0)) < 2:
        raise VocabdriftError("the Ray cluster has fewer than 2 CPUs: a counting actor holds one, the reads need "
                              "another; give it more, or use --engine local")
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    remote = [str(f) for f in files if "://" in str(f)]  # s3://, gs://, hdfs:// ... read by the cluster itself
    local = [Path(f) for f in files if "://" not in str(f)]
    parquets = [str(f) for f in local if f.name.endswith(".parquet")] + [f for f in remote if "parquet" in f]
    jsons = [str(f) for f in local if f.is_file() and not f.name.endswith(".parquet")] + \
        [f for f in remote if "parquet" not in f]
    saved = [f for f in local if f.is_dir()]
    parts = []
    try:
        if jsons:
            parts.append(ray.data.read_json(jsons))
        if parquets:
            parts.append(ray.data.read_parquet(parquets))
        for d in saved:
            from datasets import DatasetDict, load_from_disk

            ds = load_from_disk(str(d))
            splits = ([ds["train"]] if "train" in ds else list(ds.values())) if isinstance(ds, DatasetDict) else [ds]
            for x in splits:  # the memory-mapped Arrow table itself (from_huggingface wants the hub client)
                parts.append(ray.data.from_arrow((x.flatten_indices() if x._indices is not None else x).data.table))
        # actors hold a CPU each for their whole life: leave one for the read tasks, or reads never get scheduled
        n = max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
        counted = [p.map_batches(_RayCounter, fn_constructor_args=(tok, vocab_size, targets, field),
                                 batch_format="pyarrow", batch_size=batch_size, concurrency=n) for p in parts]
        count = np.zeros(vocab_size, dtype=np.int64)
        nsamp = np.zeros(vocab_size, dtype=np.int64)
        tot = np.zeros(4, dtype=np.int64)
        for c in counted:
            for b in c.iter_batches(batch_format="numpy", batch_size=None):
                count += np.asarray(b["count"]).sum(0)
                nsamp += np.asarray(b["samples"]).sum(0)
                tot += np.asarray(b["n"]).sum(0)
    except VocabdriftError:
        raise
    except Exception as e:  # Ray wraps reader errors (ArrowInvalid on a malformed line) in its own types
        msg = str(e).strip().splitlines()
        raise VocabdriftError(f"Ray Data failed ({type(e).__name__}: {msg[-1] if msg else ''}); Ray's readers "
                              "stop at a malformed line: --engine local finds and skips those, with file:line") from e
    stats = {"samples": int(tot[0]), "tokens": int(tot[1]), "target_tokens": int(tot[2]),
             "render": C.Renderer(tok, targets=targets).mode, "malformed": int(tot[3])}
    return count, nsamp, stats


def _covered_before(run: Path, arguments: dict[str, Any], inputs: dict[str, Any]) -> CoverageResult | None:
    """RUN's coverage when it already holds this one (same data, tokenizer and options; and, when RUN holds a
    drift table, the join with it): a rerun says so and reads it back instead of counting again."""
    if not run.is_dir():
        return None
    done = R.Run(run)
    if not done.holds(R.COVERAGE, command="coverage", arguments=arguments, inputs=inputs) or (
            done.has(R.DRIFT) and not done.holds(R.COVERAGE_DRIFT, command="coverage", arguments=arguments,
                                                 inputs=inputs)):
        return None
    summary = done.read_json(R.SUMMARY, default={}).get("coverage")
    if not isinstance(summary, dict) or "categories" not in summary:
        return None
    log.warning("%s already holds this coverage (same data, tokenizer and options); nothing recounted "
                "(--force counts again)", run)
    table, vocab = done.read_contract(R.COVERAGE), done.read_contract(R.VOCAB)
    scatter = done.read_contract(R.COVERAGE_DRIFT) if done.has(R.COVERAGE_DRIFT) else None
    return CoverageResult(run, table, summary, C.below_floor(table, vocab, floor=int(summary.get("floor", 5))),
                          C.under_covered(summary["categories"]), [], scatter, {})


def coverage(data: PathLike | Sequence[PathLike] | Sequence[dict] | Any, *, tokenizer: Any, out: PathLike | None = None,
             targets: C.Targets = "assistant", floor: int = 5, field: str | None = None, strict: bool = False,
             batch_size: int = 512, progress: bool = False, engine: str = "local",
             num_cpus: int | None = None, force: bool = False, run: PathLike | None = None) -> CoverageResult:
    """Count, per token id, its occurrences as a generation target in DATA and the samples that hold it.

    Args:
        data: JSONL/JSON/Parquet files, folders of them, or saved HF data sets (one or a list); or records in
            memory (a list of dicts, a `datasets.Dataset`).
        tokenizer: model folder, tokenizer.json, .gguf, hub id or tokenizer object (the BASE model's).
        out: run folder; gets coverage.parquet and summary["coverage"] (and, when it holds drift.parquet,
            coverage_drift.parquet plus the Spearman correlation).
        run: an existing run folder (from `diff`) to add to, instead of `out`.
        targets: "assistant" (assistant turns, completions, plain text) or "all" (every token).
        floor: the count a token needs to be called covered.
        field: read this record field instead of detecting the shape.
        strict: stop at the first malformed record instead of counting it.
        engine: "local" (this process, streaming) or "ray" (Ray Data over the files, for corpora larger than one
            machine; `num_cpus` sizes a local Ray). Both give the same counts.
        force: count again even when `out` already holds this coverage (same data files, tokenizer and
            options, and its join with the folder's drift); without it such a rerun says so and reads it back.

    Example:
        >>> r = coverage("sft.jsonl", tokenizer="Qwen/Qwen2.5-7B", out="runs/sft1")
        >>> r.summary["categories"]["japanese"]
    """
    out = run_target(out, run, required=False)
    if floor < 1:
        raise VocabdriftError(f"--floor must be at least 1, not {floor}")
    if targets not in ("assistant", "all"):
        raise VocabdriftError(f"--targets must be assistant or all, not {targets!r}")
    if engine not in ("local", "ray"):
        raise VocabdriftError(f"--engine must be local or ray, not {engine!r}")
    in_memory = None
    if hasattr(data, "column_names") or (isinstance(data, (list, tuple)) and data and isinstance(data[0], dict)):
        in_memory, paths = data, []  # records in memory: a list of dicts or a `datasets.Dataset`
    else:
        paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not paths and in_memory is None:
        raise VocabdriftError("no data given; pass one or more JSONL/JSON/Parquet files or folders")
    remote = [str(p) for p in paths if "://" in str(p)]
    if remote and engine != "ray":
        raise VocabdriftError(f"{remote[0]}: a remote path needs --engine ray (the local engine reads local files)")
    if out is not None:  # before the counting: never into the tokenizer's model folder or a data folder
        check_out(out, models=[tokenizer] if isinstance(tokenizer, (str, os.PathLike)) else [], data=paths)
    arguments = {"data": [str(p) for p in paths] or "records in memory", "targets": targets, "floor": floor,
                 "field": field, "strict": strict, "engine": engine}
    inputs = {f"data{i}": str(p) for i, p in enumerate(paths)} \
        | ({"tokenizer": str(tokenizer)} if isinstance(tokenizer, (str, os.PathLike)) else {})
    if not force and out is not None and in_memory is None and not remote:
        done = _covered_before(Path(out), arguments, inputs)
        if done is not None:
            return done
    timer = Timer()
    tok = _tokenizer(tokenizer)
    reader = DataReader([p for p in paths if "://" not in str(p)], field=field, strict=strict, in_memory=in_memory)
    if in_memory is not None and engine == "ray":
        raise VocabdriftError("--engine ray reads files; pass paths, or use the local engine for records in memory")
    run_path = Path(out) if out is not None else None
    existing = run_path is not None and (run_path / R.VOCAB).exists()
    with timer("vocab"):
        if existing:  # through the run folder's reader: a damaged table is one clear error
            cols = ("token_id", "piece", "text", "category", "is_special", "reachable")
            vocab = R.Run(run_path).read_table(R.VOCAB, columns=cols)  # type: ignore[arg-type]
            _check_same_tokenizer(vocab, tok, run_path)  # type: ignore[arg-type]
        else:
            vocab = _vocab_of(tokenizer, tok)
    v_size = max(vocab.num_rows, tok.backend_tokenizer.get_vocab_size(with_added_tokens=True))

    t0 = time.perf_counter()
    from ..progress import bar as line_bar

    with _progress(progress is True, "samples") as bar, timer("count"), \
            line_bar("lines" if progress == "lines" else False, 0, "coverage: samples counted") as lines:
        task = bar.add_task("coverage", total=None, rate="")
        toks = [0]

        def tick(n_samples: int, n_tokens: int) -> None:
            toks[0] += n_tokens
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=n_samples, rate=f"{toks[0] / dt:,.0f} tok/s")
            lines(n_samples)

        if engine == "ray":
            if strict:
                raise VocabdriftError("--strict works with --engine local only (Ray's readers stop at any bad line)")
            count, nsamp, stats = count_targets_ray([*reader.files, *remote], tok, vocab_size=v_size, targets=targets,
                                                    field=field, batch_size=batch_size, num_cpus=num_cpus)
            reader.n_malformed += stats["malformed"]
        else:
            count, nsamp, stats = count_targets(iter(reader), tok, vocab_size=v_size, targets=targets,
                                                batch_size=batch_size, on_bad=reader.report, on_progress=tick)
    if stats["samples"] == 0:
        first = reader.malformed[0] if reader.malformed else None
        where = f"; first problem: {first.source}: {first.reason}" if first else ""
        raise VocabdriftError(f"no usable samples in {', '.join(map(str, paths)) or 'the records'}{where}")
    table = C.coverage_table(count[:vocab.num_rows], nsamp[:vocab.num_rows])
    cats = C.summarize_categories(table, vocab, floor=floor)
    summary: dict[str, Any] = {
        "floor": floor, "targets": targets, "samples": stats["samples"], "target_tokens": stats["target_tokens"],
        "tokens": stats["tokens"], "render": stats["render"], "malformed": reader.n_malformed, "categories": cats,
        "category_names": {c: LANGUAGE_NAMES.get(c, c) for c in cats},  # the keys, and the names shown on screen
    }
    scatter = None
    if run_path is not None and (run_path / R.DRIFT).exists():
        drift = R.Run(run_path).read_table(R.DRIFT)
        if drift.num_rows != vocab.num_rows:
            raise VocabdriftError(f"{run_path}/drift.parquet has {drift.num_rows} rows but vocab.parquet has "
                                  f"{vocab.num_rows}; the run folder is inconsistent — rerun diff")
        scatter = C.scatter_table(table, drift, vocab)
        summary["correlation"] = C.correlate(scatter)
    cos_by_id = None
    if scatter is not None:  # rarest first, then the most drifted
        cos_by_id = np.full(vocab.num_rows, np.nan)
        ids = drift.column("token_id").to_numpy()
        keep = ids < vocab.num_rows
        cos_by_id[ids[keep]] = drift.column("lm_head_cos").to_numpy(zero_copy_only=False).astype(float)[keep]
    below = C.below_floor(table, vocab, floor=floor, cos=cos_by_id)
    drift_summary: dict[str, Any] = {}
    if scatter is not None and (run_path / R.SUMMARY).exists():  # type: ignore[operator]
        drift_summary = json.loads((run_path / R.SUMMARY).read_text())  # type: ignore[operator]
    summary["advice"] = coverage_advice(  # how much coverage data, sized against this SFT data
        cats, samples=stats["samples"], floor=floor, below_floor=below.num_rows,
        drift=drift_summary.get("categories"), overall=drift_summary.get("overall"),
        placements_needed=int(np.maximum(floor - below.column("count").to_numpy(), 0).sum()),
        synth_samples=S.estimate_samples(below.column("category").to_pylist(),
                                         np.maximum(floor - below.column("count").to_numpy(), 0).tolist()))
    result = CoverageResult(run_path, table, summary, below, C.under_covered(cats), reader.malformed, scatter,
                            timer.timings)
    if run_path is not None:
        with open_run(run_path) as run:
            if not existing:
                run.write_table(R.VOCAB, vocab)
            run.write_table(R.COVERAGE, table)
            if scatter is not None:
                run.write_table(R.COVERAGE_DRIFT, scatter)
            run.update_summary(coverage=summary)
            run.record("coverage", arguments=arguments, inputs=inputs, timings=timer.timings)
    return result


# ---- synth ------------------------------------------------------------------------------------------------------

FORMATS = ("messages", "sharegpt", "alpaca", "prompt-completion")


@dataclass
class SynthResult:
    """Where `synth` wrote, and stats.json's content (covered, occurrences, skipped with reasons)."""

    path: Path
    stats_path: Path
    stats: dict[str, Any]


def load_tasks() -> dict[str, Any]:
    """The repetition-task phrasings shipped in vocabdrift/data/synth_tasks.json."""
    from importlib.resources import files

    return json.loads(files("vocabdrift").joinpath("data/synth_tasks.json").read_text(encoding="utf-8"))


def _atomic_lines(path: Path, lines: Iterator[str]) -> int:
    """Write lines through the one atomic writer: a failed write leaves nothing, the file follows the umask."""
    return write_lines_atomic(path, lines)


def _stats_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".gz").rsplit(".", 1)[0] + ".stats.json")


def synth(model_or_tokenizer: Any, *, out: PathLike, min_per_token: int = 2, tokens_per_sample: int = 8,
          run: PathLike | None = None, format: str = "messages", seed: int = 0,
          progress: bool = False, max_tokens: int = RECOMMENDED_TOKENS) -> SynthResult:
    """Write the full-vocabulary coverage set: repetition tasks placing every reachable, non-special token as a
    generation target at least `min_per_token` times, each placement verified by re-tokenizing the answer.

    Args:
        model_or_tokenizer: model folder, tokenizer.json, .gguf, hub id, or a tokenizer object.
        out: the JSONL file to write; `<name>.stats.json` goes beside it.
        min_per_token: verified occurrences per token.
        tokens_per_sample: tokens per conversation (more: fewer, longer samples).
        run: a run folder. Of a diff (drift.parquet): cover the tokens its recommendation names at risk (POST's
            LOST tokens, collapsed rows, then rows below the threshold that the SFT data rarely targets, lowest
            cosine first; at most `max_tokens`), each `min_per_token` times: the set `coverage` and `report`
            size, and `repair --heal POST` heals with. Of a coverage run alone: the tokens below its floor,
            each just enough times to reach the floor (`min_per_token` is then not used).
        max_tokens: with a diff run, the most tokens at risk to cover (the recommendation's dose).
        format: "messages" (TRL SFTTrainer), "sharegpt" or "alpaca".

    Example:
        >>> r = synth("Qwen/Qwen2.5-7B", out="coverage.jsonl")
        >>> r.stats["covered"], r.stats["skipped"]
    """
    if format not in FORMATS:
        raise VocabdriftError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if min_per_token < 1:
        raise VocabdriftError(f"--min-per-token must be at least 1, not {min_per_token}")
    if tokens_per_sample < 1:
        raise VocabdriftError(f"--tokens-per-sample must be at least 1, not {tokens_per_sample}")
    if min_per_token > MAX_PER_TOKEN or tokens_per_sample > MAX_PER_TOKEN:  # sizes that cannot be meant: refused
        raise VocabdriftError(f"--min-per-token {min_per_token} / --tokens-per-sample {tokens_per_sample}: at most "
                              f"{MAX_PER_TOKEN:,} each (the recipe places a token twice, eight to a sample)")
    out = _jsonl_name(check_out(out, file=True, models=[model_or_tokenizer]
                                if isinstance(model_or_tokenizer, (str, os.PathLike)) else []))
    timer = Timer()
    with _progress(progress, "") as bar:
        task = bar.add_task("reading the vocabulary", total=None, rate="")
        with timer("vocab"):
            tok = _tokenizer(model_or_tokenizer)
            vocab = _vocab_of(model_or_tokenizer, tok)
        n = vocab.num_rows
        reach = vocab.column("reachable").to_numpy(zero_copy_only=False)
        special = vocab.column("is_special").to_numpy(zero_copy_only=False)
        need = np.where(reach & ~special, min_per_token, 0).astype(np.int64)
        floor = None
        risk = None
        if run is not None and (Path(run) / R.DRIFT).exists():
            # a diff run: the tokens the run folder's recommendation covers (LOST, collapsed, drifted and rare)
            from .recommend import recommendation

            rp = Path(run)
            prev = R.Run(rp)
            _check_same_tokenizer(prev.read_table(R.VOCAB), tok, rp)
            risk = recommendation(rp, max_tokens=max_tokens)
            if not risk.covered:
                raise VocabdriftError(f"{rp}: no token is at risk (none LOST, collapsed, or below the drift "
                                      "threshold and rarely targeted); nothing to cover")
            cover = np.asarray(risk.covered, dtype=np.int64)
            cover = cover[cover < n]
            need = np.zeros(n, dtype=np.int64)
            need[cover] = np.where(reach[cover] & ~special[cover], min_per_token, 0)
        elif run is not None:
            rp = Path(run)
            if not (rp / R.COVERAGE).exists():
                raise VocabdriftError(f"{rp}/coverage.parquet: not found; run `vocabdrift coverage DATA --tokenizer "
                                      f"MODEL -o {rp}` first")
            prev = R.Run(rp)  # its reader turns a damaged table into one clear error
            if (rp / R.VOCAB).exists():
                _check_same_tokenizer(prev.read_table(R.VOCAB), tok, rp)
            cov = prev.read_table(R.COVERAGE).column("count").to_numpy()
            if len(cov) < n:
                raise VocabdriftError(f"{rp}/coverage.parquet covers {len(cov)} tokens, this tokenizer has {n}; "
                                      "pass the tokenizer the coverage run used")
            cov_summary = prev.read_json(R.SUMMARY, default={"coverage": {}}).get("coverage") or {}
            floor = cov_summary.get("floor", 5)
            if isinstance(floor, bool) or not isinstance(floor, int) or floor < 1:
                raise VocabdriftError(f"{rp}/{R.SUMMARY}: coverage.floor is {floor!r}, not a count; rerun "
                                      f"`vocabdrift coverage DATA --tokenizer MODEL -o {rp}`")
            need = np.where(reach & ~special, np.maximum(floor - cov[:n], 0), 0).astype(np.int64)
        ids = np.nonzero(need > 0)[0]
        texts = vocab.column("text").to_pylist()
        cats = vocab.column("category").cast("string").to_pylist()
        bar.update(task, description=f"placing {len(ids):,} tokens")
        with timer("plan+verify"):
            p = S.plan(tok.backend_tokenizer, ids.tolist(), [texts[i] for i in ids], [cats[i] for i in ids],
                       need[ids].tolist(), load_tasks(), tokens_per_sample=tokens_per_sample, seed=seed)
        bar.update(task, description=f"writing {len(p.samples):,} samples")
        with timer("write"):
            n_written = _atomic_lines(out, (json.dumps(S.to_record(s, format), ensure_ascii=False)
                                            for s in p.samples))
    placed = np.zeros(n, dtype=np.int64)
    if p.placed:
        placed[list(p.placed)] = list(p.placed.values())
    short = [int(i) for i in ids if placed[i] < need[i] and int(i) not in p.skipped]
    for i in short:  # cannot happen if plan() is right; kept as a guard so stats never over-claim
        p.skipped[i] = f"placed {placed[i]} of {need[i]} times"
    covered = int(len(ids) - len(p.skipped))
    unreachable = np.nonzero(~reach & ~special)[0]
    langs: dict[str, int] = {}
    for s in p.samples:
        langs[s.language] = langs.get(s.language, 0) + 1
    stats = {
        "tokenizer": str(model_or_tokenizer) if isinstance(model_or_tokenizer, (str, os.PathLike)) else "object",
        "vocab_size": n, "format": format, "seed": seed, "samples": n_written,
        "min_per_token": None if floor is not None else min_per_token,
        "run": str(run) if run is not None else None, "floor": floor,
        "at_risk": None if risk is None else {"covered": len(risk.covered), "at_risk": len(risk.at_risk),
                                              "lost": risk.lost, "max_tokens": max_tokens},
        "targets": int(len(ids)), "covered": covered,
        "occurrences": {"total": int(placed.sum()), "min": int(placed[ids].min()) if len(ids) else 0,
                        "max": int(placed[ids].max()) if len(ids) else 0},
        "samples_by_language": dict(sorted(langs.items())),
        "special": int(special.sum()),
        "unreachable": {"count": int(len(unreachable)),
                        "reason": "the token's text does not encode back to it alone (byte pieces, merged forms)",
                        "token_ids": unreachable.tolist()},
        "skipped": [{"token_id": int(i), "text": texts[i], "reason": r} for i, r in sorted(p.skipped.items())],
        "timings": timer.timings,
    }
    sp = _stats_path(out)
    _atomic_lines(sp, iter([json.dumps(stats, indent=2, ensure_ascii=False)]))
    return SynthResult(out, sp, stats)


# ---- mix --------------------------------------------------------------------------------------------------------

@dataclass
class MixResult:
    path: Path
    sft: int  # SFT records written
    synth: int  # synthetic records written (with repeats when more were asked than SYNTH holds)
    malformed: list[Malformed] = field(default_factory=list)
    n_malformed: int = 0


_BUCKET_BYTES = 64 << 20


def _shape_of(reader: DataReader, what: str) -> str:
    for _, rec in reader.records():
        shape = detect_shape(rec) if isinstance(rec, dict) else None
        if shape is None:
            continue
        return "sharegpt" if shape == "conversations" else shape
    raise VocabdriftError(f"{what}: no record with a known shape (messages, conversations, prompt/completion, text)")


def _check_mix_space(out: Path, sft_files: Sequence[Path], syn_bytes: int, n_syn: int) -> None:
    """Refuse a mix the disk cannot hold, before writing any of it: the buckets and the output exist side by side
    at the end, so twice the output's size must be free. (A --count of a billion once wrote 15 GB.) Compressed SFT
    files are counted at four times their size."""
    sft_bytes = sum(f.stat().st_size * (4 if f.name.endswith(".gz") else 1) for f in sft_files if f.is_file())
    need = 2 * (sft_bytes + syn_bytes) + (64 << 20)
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise VocabdriftError(f"{out}: the mix would need about {need / 1e9:.1f} GB ({n_syn:,} synthetic records, "
                              f"written to buckets and then to the output) but {folder} has {free / 1e9:.1f} GB free; "
                              "ask for fewer records (--count, --ratio) or free space")


def mix(sft: PathLike | Sequence[PathLike], synth: PathLike, *, out: PathLike, ratio: float | None = None,
        count: int | None = None, seed: int = 0, strict: bool = False, progress: bool = False) -> MixResult:
    """Mix SYNTH into the SFT data: a deterministic, seeded shuffle that streams through disk buckets.

    By default SYNTH is added whole, once: what the recommendation sizes (`synth --run RUN` writes the tokens at
    risk; `coverage` and `report` give its share of the mix). `ratio` is SYNTH's share of the result instead
    (0.05: 5% of the records are synthetic); `count` asks for N synthetic records. When more are asked than SYNTH
    holds, it is repeated whole before any record is repeated
    twice; when fewer, a seeded subset is taken (a warning says coverage is then partial). Records pass through
    unchanged; the shapes must agree (make SYNTH with `synth --format` to match the SFT data).

    Memory stays flat: records go to ~64 MB bucket files at random, then each bucket is shuffled in memory.

    Example:
        >>> mix(["sft.jsonl"], "coverage.jsonl", out="mixed.jsonl", ratio=0.05)
    """
    if ratio is not None and count is not None:
        raise VocabdriftError("give at most one of --ratio (synthetic share, e.g. 0.05) or --count N (default: "
                              "SYNTH whole, once)")
    if ratio is not None and not 0 < ratio < 1:
        raise VocabdriftError(f"--ratio must be between 0 and 1 (the synthetic share of the mix), not {ratio}")
    if count is not None and count < 0:
        raise VocabdriftError(f"--count must be >= 0, not {count}")
    sft_paths = [sft] if isinstance(sft, (str, os.PathLike)) else list(sft)
    out = _jsonl_name(check_out(out, file=True, data=[*sft_paths, synth]))
    sft_reader = DataReader(sft_paths, strict=strict)
    syn_reader = DataReader([synth], strict=True)
    resolved_out = out.resolve()
    for f in [*sft_reader.files, *syn_reader.files]:
        if f.resolve() == resolved_out:
            raise VocabdriftError(f"{out}: is also an input; write the mix to another file")
    a, b = _shape_of(DataReader(sft_paths), "the SFT data"), _shape_of(DataReader([synth]), str(synth))
    if a != b:
        fix = {"prompt_completion": "prompt-completion"}.get(a, a)
        if fix not in FORMATS:
            raise VocabdriftError(f"the SFT data is {a} records and {synth} holds {b} records; a trainer reads one "
                                  "shape: convert the SFT data to messages, or mix by hand")
        raise VocabdriftError(f"the SFT data is {a} records but {synth} holds {b} records; regenerate it with "
                              f"`vocabdrift synth ... --format {fix}` so a trainer reads one shape")
    rng = random.Random(seed)
    n_sft = sum(1 for _ in sft_reader.valid_records())  # only records a trainer can use are copied
    sft_malformed, sft_bad = list(sft_reader.malformed), sft_reader.n_malformed
    syn_sizes = [len(json.dumps(rec, ensure_ascii=False, default=str).encode()) + 1
                 for _, rec in syn_reader.valid_records()]
    n_syn_avail = len(syn_sizes)
    if n_syn_avail == 0:
        raise VocabdriftError(f"{synth}: no records")
    n_syn = count if count is not None else n_syn_avail if ratio is None \
        else round(ratio * n_sft / (1 - ratio))
    # Python integers: a count of 10**18 must be refused, not overflow into a small number
    _check_mix_space(out, sft_reader.files, n_syn * sum(syn_sizes) // n_syn_avail, n_syn)
    full, part = divmod(n_syn, n_syn_avail)
    times = np.full(n_syn_avail, full, dtype=np.int64)
    times[rng.sample(range(n_syn_avail), part)] += 1
    if full == 0 and part < n_syn_avail:
        log.warning("mix: %d of %d synthetic records used; the rest of the vocabulary loses its coverage "
                    "(raise --ratio/--count to %d for all)", part, n_syn_avail, n_syn_avail)
    total_bytes = sum(f.stat().st_size for f in [*sft_reader.files, *syn_reader.files] if f.is_file())
    n_buckets = max(1, min(4096, int(total_bytes * max(1.0, float(times.max(initial=1))) // _BUCKET_BYTES) + 1))
    tmpdir = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=f".{out.name}.mix-"))
    try:
        buckets: list[Any] = []
        try:  # opened inside the try: a SIGTERM among the opens still closes those already open
            with _signals_held():  # ... and none lands between an open and its place in `buckets`
                buckets.extend(open(tmpdir / f"{k:04d}.jsonl", "w", encoding="utf-8") for k in range(n_buckets))

            def put(rec: Any) -> None:
                buckets[rng.randrange(n_buckets)].write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")

            sft_reader2 = DataReader(sft_paths, strict=strict)
            for _, rec in sft_reader2.valid_records():
                put(rec)
            for j, (_, rec) in enumerate(DataReader([synth], strict=True).valid_records()):
                for _ in range(int(times[j])):
                    put(rec)
        finally:
            for f in buckets:
                f.close()

        def shuffled() -> Iterator[str]:
            for k in range(n_buckets):
                lines = (tmpdir / f"{k:04d}.jsonl").read_text(encoding="utf-8").splitlines()
                rng.shuffle(lines)
                yield from lines

        _atomic_lines(out, shuffled())
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return MixResult(out, n_sft, int(times.sum()), sft_malformed, sft_bad)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends (then arrive as usual): a file opened in it always reaches the
    list that closes it, instead of being left to the garbage collector's ResourceWarning."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # handlers can be set in the main thread only
        yield
        return
    # Held by handlers that only note the signal: blocking it with pthread_sigmask in this thread is not enough,
    # since another thread (a library's pool) may take it and Python then runs the handler here at once.
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            signal.raise_signal(got[0])  # delivered now, to the handler it was meant for


# ---- prune-suggest ----------------------------------------------------------------------------------------------

@dataclass
class PruneResult:
    """Tokens rare in the downstream data *and* drifted: candidates to drop from the next tokenizer."""

    table: pa.Table  # token_id, text, category, count, samples, lm_head_cos; most drifted first
    categories: dict[str, dict[str, int]]  # category -> {"tokens", "candidates"}
    floor: int
    threshold: float
    common_words_kept: int = 0  # rare here and drifted, but common words of ordinary text: never proposed
    word_list: bool = True  # False: wordfreq is not installed, and every word-like token was kept


def _common_words_cached(texts: list[str], categories: list[str]) -> tuple[list[bool], bool]:
    """`advice.common_words` with its answers kept in the user's cache folder (per wordfreq version and zipf
    threshold): wordfreq's lists take two seconds to load, and the same run's candidates are asked again and again
    (a second prune-suggest of a folder reads no list)."""
    from importlib.metadata import PackageNotFoundError, version

    from ..analyses.advice import COMMON_ZIPF
    from ..sources.vocabulary import read_cached_json, write_cached_json

    try:
        name = f"common-words-wordfreq{version('wordfreq')}-zipf{COMMON_ZIPF:g}.json"
    except PackageNotFoundError:
        return common_words(texts, categories)
    known = read_cached_json(name) or {}
    before = len(known)
    got = common_words(texts, categories, known=known)
    if len(known) > before:
        write_cached_json(name, known)
    return got


MAX_PER_TOKEN = 1_000  # synth: placements of a token, tokens of a sample; beyond this a set cannot be meant


def _jsonl_name(out: Path) -> Path:
    """synth and mix write plain JSON lines: a name that promises another format (gzip, Parquet) is refused, or
    the next reader would take the text for what the name says."""
    if out.name.endswith((".gz", ".parquet", ".arrow", ".zst", ".bz2", ".xz")):
        raise VocabdriftError(f"-o {out}: vocabdrift writes plain JSON lines; name the file .jsonl (and compress "
                              "it afterwards if you like)")
    return out


def prune_suggest(run: PathLike, *, floor: int | None = None, threshold: float = 0.95,
                  csv: PathLike | None = None) -> PruneResult:
    """List tokens counted below `floor` in RUN's coverage and with lm_head cosine below `threshold`. Reports only.

    Needs RUN/vocab.parquet, drift.parquet (from `diff`) and coverage.parquet (from `coverage`). With `csv`, the
    list is also written to that file (atomically; never into a model folder or over a run folder's files).

    Example:
        >>> r = prune_suggest("runs/sft1")
        >>> r.categories["japanese"]
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not -1.0 <= threshold <= 1.0:  # NaN fails this too
        raise VocabdriftError(f"--threshold {threshold}: a cosine threshold lies in [-1, 1] (0.95, say)")
    if floor is not None and floor < 1:
        raise VocabdriftError(f"--floor must be at least 1, not {floor}")
    if csv is not None:
        csv = check_out(csv, file=True, flag="--csv")
    with open_run(run, create=False) as r:
        missing = [n for n in (R.VOCAB, R.DRIFT, R.COVERAGE) if not r.has(n)]
        if missing:
            raise VocabdriftError(f"{run}: missing {', '.join(missing)}; run `vocabdrift diff BASE POST -o {run}` and "
                                  f"`vocabdrift coverage DATA --tokenizer BASE --run {run}` first")
        vocab, drift = r.read_table(R.VOCAB), r.read_table(R.DRIFT)
        cov = r.read_table(R.COVERAGE)
        summary = r.read_json(R.SUMMARY, default={"_": 0})
    floor = int(floor if floor is not None else summary.get("coverage", {}).get("floor", 5))
    scatter = C.scatter_table(cov, drift, vocab)
    cnt = scatter.column("count").to_numpy()
    cos = scatter.column("lm_head_cos").to_numpy()
    hit = (cnt < floor) & (cos < threshold)
    idx = np.nonzero(hit)[0]
    idx = idx[np.argsort(cos[idx], kind="stable")]
    ids = scatter.column("token_id").to_numpy()[idx]
    take = pa.array(ids)
    table = pa.table({"token_id": pa.array(ids), "text": pc.take(vocab.column("text"), take),
                      "category": pc.take(scatter.column("category"), pa.array(idx)),
                      "count": pa.array(cnt[idx]), "samples": pc.take(cov.column("samples"), take),
                      "lm_head_cos": pa.array(cos[idx])})
    # never propose a word of ordinary text (` Jack`, ` Paul`): rare in one SFT set is not rare in the language
    common, checked = _common_words_cached(table.column("text").to_pylist(), table.column("category").to_pylist())
    keep = np.asarray([not c for c in common], dtype=bool)
    if keep.size:
        kept_ids = set(table.column("token_id").to_numpy()[~keep].tolist())
        hit &= ~np.isin(scatter.column("token_id").to_numpy(), list(kept_ids))
        table = table.filter(pa.array(keep))
    cats = np.asarray(scatter.column("category").to_pylist(), dtype=object)
    per = {str(c): {"tokens": int((cats == c).sum()), "candidates": int((hit & (cats == c)).sum())}
           for c in sorted(set(cats.tolist()))}
    if csv is not None:
        import io

        import pyarrow.csv as pacsv

        from ..atomic import write_bytes_atomic

        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        write_bytes_atomic(csv, buf.getvalue())
    return PruneResult(table, per, floor, threshold, common_words_kept=int((~keep).sum()),
                       word_list=checked)
