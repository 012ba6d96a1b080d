"""`check`: a pass/fail gate on vocabulary drift, for the CI of post-training pipelines.

It measures BASE -> POST (or reads a run folder `diff` wrote) and judges the rules of `analyses.gate`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..analyses.gate import (
    CheckResult,
    Rule,
    RuleResult,
    judge,
    judge_lost,
    model_problems,
    parse_category,
    parse_max_below,
    parse_max_lost,
    parse_min_cos,
    with_rule,
)
from ..errors import VocabdriftError
from ..outputs import run as R

PathLike = str | os.PathLike

DEFAULT_MAX_BELOW = "0.95:1%"
DEFAULT_MAX_LOST = "0"


def rules_from(*, min_cos: float | str | None = None, max_below: str | Sequence[str] | None = None,
               categories: Sequence[str] = ()) -> list[Rule]:
    """Parse the CLI's specs into rules; with none at all, the default `--max-below 0.95:1%`."""
    rules: list[Rule] = []
    if min_cos is not None:
        rules.append(parse_min_cos(min_cos))
    for spec in [max_below] if isinstance(max_below, str) else (max_below or ()):
        rules.append(parse_max_below(spec))
    rules += [parse_category(s) for s in categories]
    return rules or [parse_max_below(DEFAULT_MAX_BELOW)]


def check(base: PathLike | None = None, post: PathLike | None = None, *, run: PathLike | None = None,
          min_cos: float | str | None = None, max_below: str | Sequence[str] | None = None,
          categories: Sequence[str] = (), space: str = "lm_head", population: str = "reachable",
          out: PathLike | None = None, tokenizer: PathLike | None = None, device: str | None = None,
          allow_pickle: bool = False, progress: bool = False, write: bool = False,
          all_tokens: bool = False, max_lost: str | Sequence[str] | None = DEFAULT_MAX_LOST) -> CheckResult:
    """Judge the drift from BASE to POST against limits; the result has a one-line `verdict`.

    Args:
        base, post: the two checkpoints (anything `diff` takes). Or `run`: a run folder `diff` already wrote.
        min_cos: the lowest cosine allowed.
        max_below: "COS:LIMIT", e.g. "0.95:1%" (at most 1% of tokens below 0.95) or "0.9:0" (none below 0.9).
        categories: "NAME:COS:LIMIT" ("japanese:0.95:5%") or "NAME:MIN_COS" ("japanese:0.9").
        space: "lm_head" (what the model says) or "embed" (what it reads).
        all_tokens: judge every non-special token, unreachable ones too (`--all-tokens`); by default only the
            reachable, non-special ones. `population="all"` is its old spelling.
        out: also write the run folder (diff's tables, and summary.json's "check" key).
        write: with `run`, record the result in the run folder (summary.json's "check" key); a gate reads
            and judges, so by default it leaves the folder as it was.
        max_lost: with a run folder holding a say-ability map (`saymap --base`) or `probe --base` results, the
            most tokens that may be LOST (sayable in BASE, not in POST): a count ("0", the default) or a share
            ("2%": of the tokens BASE could say, in a map; of the probed tokens, in a probe); a category first
            ("japanese:1%") limits that category of the map. Several specs: each is a rule. None: not judged.
            The map judges when the folder has one (the whole vocabulary), else the probe. An lm_head cosine
            is not say-ability: rows can stay put while the tokens are lost.
    Returns:
        A `CheckResult`: `.passed`, `.verdict`, per-rule `.results`.

    Example:
        >>> r = check("base/", "sft/", min_cos=0.9, max_below="0.95:1%", categories=["japanese:0.95:5%"])
        >>> print(r.verdict)
        PASS lm_head: min cos 0.9712 >= 0.9; 0/140,112 reachable tokens (0.00%) below 0.95 <= 1%; japanese ...
    """
    from ..outputs.run import Run, open_run

    if all_tokens:
        population = "all"
    rules = rules_from(min_cos=min_cos, max_below=max_below, categories=categories)
    if run is not None:
        if base is not None or post is not None:
            raise VocabdriftError("give either BASE and POST, or --run RUN, not both")
        r = Run(run)
        for name in (R.DRIFT, R.VOCAB):
            if not r.has(name):
                raise VocabdriftError(f"{run}: no {name}; run `vocabdrift diff BASE POST -o {run}` first")
        mixed = r.disagreements()
        if mixed:
            raise VocabdriftError(f"{run}: its files do not belong to one BASE/POST pair: {'; '.join(mixed)}")
        result = judge(r.read_table(R.DRIFT, ("token_id", f"{space}_cos")),
                       r.read_table(R.VOCAB, ("token_id", "category", "is_special")), rules, space=space,
                       population=population, problems=model_problems(r.read_json(R.SUMMARY, default={}) or {}))
        lost_rules = [parse_max_lost(s) for s in ([max_lost] if isinstance(max_lost, str) else max_lost or ())]
        for extra in _lost_results(r, lost_rules):
            result = with_rule(result, extra)
        if write:
            with open_run(run, create=False) as w:
                w.update_summary(check=result.to_json())
                w.record("check", arguments={**_arguments(rules, space, population), "max_lost": max_lost},
                         inputs={"run": str(run)})
        return result
    if base is None or post is None:
        raise VocabdriftError("check needs BASE and POST checkpoints (or --run RUN)")
    if out is not None:
        from .diff import diff

        diff(base, post, out=out, tokenizer=tokenizer, device=device, allow_pickle=allow_pickle, progress=progress)
        return check(run=out, min_cos=min_cos, max_below=max_below, categories=categories, space=space,
                     population=population, write=True, max_lost=max_lost)
    from .diff import measure

    m = measure(base, post, tokenizer=tokenizer, device=device, allow_pickle=allow_pickle, progress=progress)
    return judge(m.drift, m.vocab, rules, space=space, population=population, problems=model_problems(m.summary()))


def _lost_results(r: R.Run, rules: Sequence[Rule]) -> list[RuleResult]:
    """The LOST rules over RUN's say-ability map (the whole vocabulary: a share is of the tokens BASE could
    say, per category when the rule names one), else over its probe with BASE; nothing to judge: no results."""
    import numpy as np

    if not rules:
        return []
    summary = r.read_json(R.SUMMARY, default={}) or {}
    paired_map = r.has(R.SAYMAP) and "counts" in (summary.get("saymap") or {})
    if not paired_map:
        named = [x for x in rules if x.category is not None]
        if named:
            raise VocabdriftError(f"--max-lost {named[0].category}:...: a per-category limit needs a say-ability "
                                  f"map with BASE in {r.path}; run `vocabdrift saymap POST --base BASE --run "
                                  f"{r.path}` first")
        if not r.has(R.PROBE):
            return []
        from ..analyses.recommend import probe_lost

        asked, lost, _, _ = probe_lost(r.read_table(R.PROBE))
        if not asked:
            return []
        text = _texts(r)
        return [judge_lost(x, len(asked), lost, [text.get(t, "") for t in lost]) for x in rules]
    m = r.read_table(R.SAYMAP, ("token_id", "category", "status", "post_p"))
    ids = m["token_id"].to_numpy()
    cats = np.asarray(m["category"].to_pylist(), dtype=object)
    status = np.asarray(m["status"].to_pylist(), dtype=object)
    order = np.argsort(m["post_p"].to_numpy(zero_copy_only=False), kind="stable")  # the most confident loss first
    text = _texts(r)
    out = []
    for x in rules:
        sel = np.ones(len(ids), bool) if x.category is None else cats == x.category
        could = int((sel & np.isin(status, ("kept", "lost"))).sum())
        lost = [int(ids[i]) for i in order if sel[i] and status[i] == "lost"]
        out.append(judge_lost(x, could, lost, [text.get(t, "") for t in lost[:1]], noun="tokens BASE could say"))
    return out


def _texts(r: R.Run) -> dict[int, str]:
    vocab = r.read_table(R.VOCAB, ("token_id", "text"))
    return dict(zip(vocab["token_id"].to_pylist(), vocab["text"].to_pylist(), strict=True))


def _arguments(rules: list[Rule], space: str, population: str) -> dict[str, object]:
    return {"rules": [r.describe() for r in rules], "space": space, "population": population}

