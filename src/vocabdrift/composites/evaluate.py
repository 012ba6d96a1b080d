"""`evaluate`: the before/after verdict on a repair, on the user's own models.

Given BASE, POST and one or more candidates (a `repair` output, or a model trained with any stack, in any format
vocabdrift reads), every model is asked to say the same tokens with the same templates: POST's LOST tokens and the
most drifted (from the run folder's diff and probe) and undrifted control tokens. With held-out chats, each
model's loss on exactly the targets `coverage` counts; against BASE, each candidate's lm_head drift. The verdict
per candidate comes from `analyses.verdict` ("REPAIRED: 78 of 81 LOST tokens sayable again ...").

Written into the run folder: evaluate.parquet (every probe row, a `group` column: probed or control) and
summary["evaluate"] (`Evaluation.to_json`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..analyses import probe as P
from ..analyses import verdict as V
from ..errors import VocabdriftError
from ..outputs import run as R

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)
PathLike = str | os.PathLike

DRIFTED = 200  # the most drifted tokens asked beside POST's LOST ones
CONTROL = 100  # undrifted control tokens: enough for the tests to see a change of a few tokens
HELDOUT = 500  # held-out records read at most (the loss of 500 chats is stable to the third decimal)


@dataclass
class EvaluateResult:
    """What `evaluate` wrote: the run folder, the verdict, every probe row."""

    path: Path
    evaluation: V.Evaluation
    table: pa.Table
    paths: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.evaluation.passed

    def to_json(self) -> dict[str, Any]:
        return {"run": str(self.path), "models": self.paths, **self.evaluation.to_json()}


def candidate_names(candidates: Sequence[PathLike], names: Sequence[str] | None = None) -> list[str]:
    """A short, unique name per candidate (its folder's name; `repair`'s OUT/model is named for OUT)."""
    if names:
        if len(names) != len(candidates):
            raise VocabdriftError(f"--name was given {len(names)} times for {len(candidates)} candidates; give one "
                                  "name per candidate, or none")
        got = list(names)
    else:
        got = []
        for c in candidates:
            p = Path(str(c)).expanduser()
            stem = p.stem if p.suffix == ".gguf" else p.name
            if stem == "model" and p.parent.name:  # repair's OUT/model
                stem = p.parent.name
            got.append(stem or str(c))
    out: list[str] = []
    for n in got:
        k, i = n, 2
        while k in out or k in ("base", "post"):
            k, i = f"{n}-{i}", i + 1
        out.append(k)
    return out


def check_run_pair(run: PathLike, base: PathLike, post: PathLike) -> None:
    """RUN's diff must be of this BASE and POST: the tokens at risk and the controls are theirs."""
    pair = R.Run(run).pair()
    if pair and (R.model_identity(base) != pair.get("base") or R.model_identity(post) != pair.get("post")):
        raise VocabdriftError(f"{run}: its diff is of another BASE/POST pair; pass the --base and --post it was "
                              "made from, or a run folder of this pair")


def _reusable_probe(run: R.Run, base: PathLike, post: PathLike, templates: Sequence[str], ids: Sequence[int]
                    ) -> pa.Table | None:
    """BASE's and POST's rows from the run's own probe when it asked these tokens with these templates of these
    models (the same numbers: scoring is deterministic), else None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not run.has(R.PROBE):
        return None
    stamp = run.read_json(R.MANIFEST, default={}).get("files", {}).get(R.PROBE) or {}
    if stamp.get("models") != {"model": R.model_identity(post), "base": R.model_identity(base)} \
            or (stamp.get("arguments") or {}).get("top_p") != P.TOP_P:
        return None
    t = run.read_table(R.PROBE, ("token_id", "model", "template", "p_target", "rank", "sayable"))
    t = t.filter(pc.and_(pc.is_in(t["model"], pa.array(["base", "post"])),
                         pc.is_in(t["template"], pa.array(list(templates)))))
    t = t.filter(pc.is_in(t["token_id"], pa.array(list(ids), pa.int64())))
    have = set(zip(t["model"].to_pylist(), t["template"].to_pylist(), t["token_id"].to_pylist(), strict=True))
    need = {(m, tm, int(i)) for m in ("base", "post") for tm in templates for i in ids}
    return t if need <= have else None


def _drift_of(base: PathLike, model: PathLike, *, threshold: float, device: str | None, allow_pickle: bool
              ) -> dict[str, Any]:
    """Rows below `threshold` and the minimum cosine against BASE, over reachable, non-special tokens."""
    from ..api.diff import measure

    s = measure(base, model, device=device, allow_pickle=allow_pickle).summary(threshold=threshold)
    block = (s.get("reachable") or {}).get("lm_head") or {}
    return {"below": block.get("below_threshold"), "min_cos": block.get("min_cos"), "tokens": block.get("tokens")}


def evaluate(candidates: Sequence[PathLike], *, base: PathLike, post: PathLike, run: PathLike,
             out: PathLike | None = None, heldout: PathLike | Sequence[PathLike] | None = None,
             names: Sequence[str] | None = None,
             drifted: int | None = None, control: int | None = None, templates: Sequence[str] | None = None,
             max_length: int = 256, heldout_limit: int = HELDOUT, min_back: float = V.MIN_BACK,
             max_loss_rise: float = V.MAX_LOSS_RISE, threshold: float = 0.95, device: str | None = None,
             batch_size: int = 64, allow_pickle: bool = False, trust_remote_code: bool = False,
             confusion: int = 0, confusion_tokens: int = 64, seed: int = 0, progress: bool = False,
             report: Callable[[str], None] | None = None) -> EvaluateResult:
    """Judge each candidate against BASE and POST: are POST's LOST tokens sayable again, beyond what the control
    tokens did, without costing the task? Writes RUN/evaluate.parquet and summary["evaluate"].

    Args:
        candidates: repaired models (folders, .safetensors, .gguf or hub ids), one or more.
        base, post: the pre-trained model and the post-trained one whose drift is being repaired.
        run: the run folder of `diff BASE POST` (its most drifted and control tokens; its probe's BASE/POST rows
            are reused when they asked the same tokens with the same templates).
        out: where to write the verdict (default: `run`; `repair` writes it into its own folder).
        heldout: held-out chats of the user's task (the SFT data's format); the loss is on the targets
            `coverage` counts. Without it the verdict says the task cost was not measured.
        names: a name per candidate (default: its folder's name; OUT for repair's OUT/model).
        drifted, control, templates: by default, the tokens, controls and templates of RUN's own probe (so
            BASE's and POST's rows are reused and only the candidates are asked); without a probe in RUN, or
            when any of them is given, the `drifted` (200) most drifted tokens beside POST's LOST ones, `control`
            (100) undrifted controls, and `templates` (the chat families for a chat model).
        min_back, max_loss_rise: REPAIRED needs this share of LOST back and the loss at most this much above POST's.
        confusion: answers sampled per language-confusion prompt (the shipped Japanese and Korean ones, T=1.0,
            at most `confusion_tokens` tokens each) from every model; 0: not measured. A candidate whose rate of
            answers with a foreign script rose significantly above POST's is not REPAIRED.
        report: called with a line per step (the CLI prints it off a terminal, where there is no bar).

    Example:
        >>> r = evaluate(["runs/fixed/model"], base="base/", post="post/", run="runs/sft1", heldout="heldout.jsonl")
        >>> r.evaluation.candidates[0].sentence
    """
    import pyarrow as pa

    from ..analyses.confusion import count_confusion
    from ..analyses.recommend import probe_lost
    from ..api.probe import _confusion_prompts, _control_tokens, _engine, _tokens_from_run
    from ..outputs.run import Timer, existing_run, open_run
    from ..sources.spec import check_weights_policy, parse_model_spec
    from ..sources.tokenizer import load_tokenizer
    from .train import heldout_loss, read_records

    say = report or (lambda s: log.info("%s", s))
    if not candidates:
        raise VocabdriftError("name at least one candidate model to evaluate (a repair's OUT/model, or your own)")
    if not 0 < min_back <= 1:
        raise VocabdriftError(f"--min-back is a share in (0, 1], not {min_back}")
    if not max_loss_rise >= 0:
        raise VocabdriftError(f"--max-loss-rise is a share >= 0, not {max_loss_rise}")
    if confusion < 0 or confusion_tokens < 1:
        raise VocabdriftError(f"--confusion must be >= 0 and --confusion-tokens >= 1, not {confusion} and "
                              f"{confusion_tokens}")
    if (drifted is not None and drifted < 1) or (control is not None and control < 0):
        raise VocabdriftError(f"--drifted must be at least 1 and --control at least 0, not {drifted} and {control}")
    run_path = existing_run(run)
    r = R.Run(run_path)
    if not r.has(R.DRIFT):
        raise VocabdriftError(f"{run_path}: holds no drift.parquet; run `vocabdrift diff BASE POST -o {run_path}` "
                              "first")
    check_run_pair(run_path, base, post)
    dest = Path(out) if out is not None else run_path
    if out is not None:
        from ..outputs.location import check_out

        check_out(dest, models=[base, post, *candidates], data=[] if heldout is None else
                  ([heldout] if isinstance(heldout, (str, os.PathLike)) else list(heldout)))
    specs = {"base": base, "post": post}
    names = candidate_names(candidates, names)
    specs.update(zip(names, candidates, strict=True))
    for s in specs.values():
        ms = parse_model_spec(s)
        if ms.local:
            check_weights_policy(ms, allow_pickle=allow_pickle)
    records = None
    if heldout is not None:
        records = read_records(heldout, what="held-out")[:heldout_limit]
    timer = Timer()
    tok = load_tokenizer(parse_model_spec(base).tokenizer_source(), trust_remote_code=trust_remote_code)
    summary = r.read_json(R.SUMMARY, default={})
    own = probe_lost(r.read_table(R.PROBE)) if r.has(R.PROBE) else ([], [], [], [])
    if own[0] and drifted is None and control is None and templates is None:  # the run's own probe, reused
        probed, controls = own[0], own[2]
        templates = sorted(set(r.read_table(R.PROBE, ("template",))["template"].to_pylist()))
    else:
        drifted, control = DRIFTED if drifted is None else drifted, CONTROL if control is None else control
        probed = list(dict.fromkeys([*own[1], *_tokens_from_run(run_path, drifted)]))
        controls = _control_tokens(run_path, control, exclude=set(probed)) if control else []
    encoded = [P.encode_template(t, tok) for t in P.resolve_templates(templates, tok)]
    tnames = [e.template for e in encoded]
    probed = [t for t in probed if t < len(tok)]
    controls = [t for t in controls if t < len(tok)]
    ids = probed + controls
    reused = _reusable_probe(r, base, post, tnames, ids)
    tables: list[pa.Table] = []
    losses: dict[str, float] = {}
    confused: dict[str, tuple[int, int]] = {}
    prompts = _confusion_prompts(None, None) if confusion else []
    if reused is not None:
        tables.append(reused)
        say(f"evaluate: BASE's and POST's probe rows reused from {run_path / R.PROBE}")
    for k, (name, spec) in enumerate(specs.items(), 1):
        need_probe = reused is None or name not in ("base", "post")
        if not need_probe and records is None and not confusion:
            continue
        t0 = time.perf_counter()
        what = f"probing {len(ids):,} tokens x {len(tnames)} templates" if need_probe else "held-out loss"
        say(f"evaluate: {name} ({k}/{len(specs)}): {what}" + (" and held-out loss" if need_probe and records
                                                              else ""))
        eng = _engine(spec, endpoint=None, engine="hf", device=device, trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle, batch_size=batch_size)
        try:
            if need_probe:
                with timer("score"):
                    for enc in encoded:
                        scores = eng.score([enc.with_token(t) for t in ids], ids)
                        tables.append(P.probe_table(ids, name, enc.template, scores))
            if records is not None:
                with timer("heldout"):
                    losses[name] = heldout_loss(eng.model, eng.tokenizer, records, max_length=max_length)
            if confusion:
                with timer("confusion"):
                    hits = n = 0
                    for j, p in enumerate(prompts):  # the same draws for every model (as `confusion` does)
                        answers = eng.generate([p.prompt], n=confusion, temperature=1.0, top_p=1.0,
                                               max_tokens=confusion_tokens, seed=seed + 7919 * j)[0]
                        cc = count_confusion(answers, p.language)
                        hits, n = hits + cc.hits, n + cc.n
                    confused[name] = (hits, n)
        finally:
            eng.close()
        say(f"evaluate: {name} done in {time.perf_counter() - t0:.0f}s"
            + (f" (held-out loss {losses[name]:.4f})" if name in losses else ""))
    drift: dict[str, dict[str, Any]] = {}
    with timer("drift"):
        reach = (summary.get("reachable") or {}).get("lm_head") or {}
        if summary.get("threshold") == threshold and reach:
            drift["post"] = {"below": reach.get("below_threshold"), "min_cos": reach.get("min_cos")}
        else:
            drift["post"] = _drift_of(base, post, threshold=threshold, device=device, allow_pickle=allow_pickle)
        for name in names:
            drift[name] = _drift_of(base, specs[name], threshold=threshold, device=device, allow_pickle=allow_pickle)
    table = pa.concat_tables([t.select(["token_id", "model", "template", "p_target", "rank", "sayable"])
                              for t in tables])
    group = pa.array(["control" if t in set(controls) else "probed" for t in table["token_id"].to_pylist()])
    table = table.append_column("group", group)
    ev = V.evaluate_rows(table, probed=probed, controls=controls, candidates=names, losses=losses, drift=drift,
                         confusion=confused, min_back=min_back, max_loss_rise=max_loss_rise)
    paths = {n: str(s) for n, s in specs.items()}
    with open_run(dest) as rr:
        rr.write_table(R.EVALUATE, table)
        rr.update_summary(evaluate={"models_paths": paths, "heldout": None if heldout is None else
                                    [str(h) for h in ([heldout] if isinstance(heldout, (str, os.PathLike))
                                                      else heldout)],
                                    "heldout_records": None if records is None else len(records),
                                    **ev.to_json()})
        rr.record("evaluate", arguments={"candidates": paths, "drifted": drifted, "control": control,
                                         "templates": tnames, "min_back": min_back, "max_loss_rise": max_loss_rise,
                                         "threshold": threshold, "confusion": confusion,
                                         "confusion_tokens": confusion_tokens, "seed": seed},
                  inputs={"base": base, "post": post}, timings=timer.timings)
    return EvaluateResult(dest, ev, table, paths, timer.timings)


def read_evaluation(run: PathLike) -> V.Evaluation | None:
    """The verdict a run folder holds (summary["evaluate"]), or None; a damaged one is one clear error."""
    s = R.Run(run).read_json(R.SUMMARY, default={}).get("evaluate")
    if s is None:
        return None
    try:
        return V.Evaluation.from_json(s)
    except (KeyError, TypeError, ValueError) as e:
        raise VocabdriftError(f"{Path(run) / R.SUMMARY}: its \"evaluate\" entry is damaged ({e}); run `vocabdrift "
                              "evaluate` again") from e
