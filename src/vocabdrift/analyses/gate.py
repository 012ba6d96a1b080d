"""The pass/fail rules of `vocabdrift check`: parsed from short specs, judged over the drift and vocabulary tables.

Pure: tables in, a frozen `CheckResult` out. A rule is one of

- `min_cos`: the lowest cosine must be at least X (`--min-cos 0.9`);
- `max_below`: at most a share (or count) of tokens below cosine T (`--max-below 0.95:1%`);
- the same per category (`--category japanese:0.95:5%`).

Rules are judged over the reachable, non-special tokens by default: special and padding rows are often untrained,
and unreachable tokens (partial UTF-8 pieces) are never a generation target, so no data can repair them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import VocabdriftError
from .drift import undefined_rows
from .vocab import CATEGORIES, LANGUAGE_NAMES, token_label

if TYPE_CHECKING:
    import pyarrow as pa

# Everyday names for the categories, so `--category russian:0.95:5%` works.
ALIASES = {"russian": "cyrillic", "chinese": "han", "korean": "hangul", "english": "latin", "kana": "japanese",
           **{v.lower(): k for k, v in LANGUAGE_NAMES.items()}}


@dataclass(frozen=True)
class Rule:
    """One limit. `category` None means all tokens in the population; `kind` is "min_cos" or "max_below"."""

    kind: str
    threshold: float  # min_cos: the minimum allowed; max_below: the cosine a token must not fall below
    share: float | None = None  # max_below: the largest allowed share of tokens below threshold (0..1)
    count: int | None = None  # max_below: or the largest allowed number of tokens
    category: str | None = None

    def describe(self) -> str:
        where = f"{self.category} " if self.category else ""
        if self.kind == "max_lost":
            return f"{where}LOST <= {f'{self.share * 100:g}%' if self.share is not None else self.count}"
        if self.kind == "min_cos":
            return f"{where}min cos >= {self.threshold:g}"
        limit = f"{self.share * 100:g}%" if self.share is not None else f"{self.count} tokens"
        return f"{where}below {self.threshold:g} <= {limit}"


@dataclass(frozen=True)
class RuleResult:
    """How one rule fared: the measured `value` (min cosine, or share below), the tokens judged, the worst ids."""

    rule: Rule
    passed: bool
    value: float | None
    tokens: int
    below: int = 0
    worst: tuple[int, ...] = ()
    worst_text: str | None = None  # the worst token's text, for the verdict
    undefined: int = 0  # tokens without a cosine (row became zero or NaN): below every threshold, among `below`
    noun: str = "probed tokens"  # max_lost: what the judged tokens are

    def describe(self, population: str | None = None) -> str:
        """One line; `population` ("reachable" or "all") names what the counts are of, as the console's tables
        do ("reachable tokens", "non-special tokens")."""
        r = self.rule
        where = f"{r.category} " if r.category else ""
        noun = {"reachable": " reachable tokens", "all": " non-special tokens"}.get(population or "", "")
        if self.tokens == 0:
            return f"{where}no tokens to judge"
        who = ""
        if not self.passed and self.worst:
            w = self.worst[0] if self.worst_text is None else token_label(self.worst_text, self.worst[0])
            who = f" (token {w})"
        if r.kind == "max_lost":  # say-ability: probed tokens sayable in BASE and no longer in POST
            limit = f"{r.share * 100:g}%" if r.share is not None else f"{r.count}"
            return (f"{where}LOST {self.below:,}/{self.tokens:,} {self.noun} {'<=' if self.passed else '>'} {limit}"
                    f"{who}")
        if r.kind == "min_cos":
            op = ">=" if self.passed else "<"
            if self.undefined:
                return f"{where}min cos undefined ({self.undefined:,} zero or NaN rows) < {r.threshold:g}{who}"
            return f"{where}min cos {self.value:.4f} {op} {r.threshold:g}{who}"
        limit = f"{r.share * 100:g}%" if r.share is not None else f"{r.count}"
        op = "<=" if self.passed else ">"
        undef = f", {self.undefined:,} of them zero or NaN" if self.undefined else ""
        return (f"{where}{self.below:,}/{self.tokens:,}{noun} ({(self.value or 0) * 100:.2f}%) below "
                f"{r.threshold:g} {op} {limit}{undef}")


@dataclass(frozen=True)
class CheckResult:
    """The verdict of `check`: `passed`, a one-line `verdict`, and each rule's result."""

    passed: bool
    verdict: str
    results: tuple[RuleResult, ...]
    space: str = "lm_head"
    population: str = "reachable"
    nonfinite: tuple[int, ...] = field(default=())
    undefined: tuple[int, ...] = field(default=())  # judged rows that became zero or NaN (nonfinite among them)

    def to_json(self) -> dict[str, Any]:
        """summary.json's "check" key."""
        return {"passed": self.passed, "verdict": self.verdict, "space": self.space, "population": self.population,
                "nonfinite_rows": list(self.nonfinite), "undefined_rows": list(self.undefined),
                "rules": [{"rule": r.rule.describe(), "kind": r.rule.kind, "category": r.rule.category,
                           "threshold": r.rule.threshold, "share": r.rule.share, "count": r.rule.count,
                           "passed": r.passed, "value": r.value, "tokens": r.tokens, "below": r.below,
                           "undefined": r.undefined, "worst": list(r.worst)} for r in self.results]}


# ---- parsing --------------------------------------------------------------------------------------------------

def _cosine(text: str, spec: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise VocabdriftError(f"{spec!r}: {text!r} is not a cosine (a number such as 0.95)") from None
    if not -1.0 <= v <= 1.0:
        raise VocabdriftError(f"{spec!r}: cosine {v:g} is outside [-1, 1]")
    return v


def _limit(text: str, spec: str) -> tuple[float | None, int | None]:
    """"1%" -> share 0.01; "0.01" -> share 0.01; "25" -> at most 25 tokens."""
    t = text.strip()
    try:
        if t.endswith("%"):
            share = float(t[:-1]) / 100.0
        elif re.fullmatch(r"\d+", t):
            return None, int(t)
        else:
            share = float(t)
    except ValueError:
        raise VocabdriftError(f"{spec!r}: {text!r} is not a limit; write a share (1%, 0.01) or a count (25)") \
            from None
    if not 0.0 <= share <= 1.0:
        raise VocabdriftError(f"{spec!r}: share {text} is outside 0%..100%")
    return share, None


def category_name(name: str, spec: str = "") -> str:
    """A category of docs/ARCHITECTURE.md, from its name or an everyday alias (russian, chinese, korean, english)."""
    n = name.strip().lower()
    n = ALIASES.get(n, n)
    if n not in CATEGORIES:
        raise VocabdriftError(f"{spec or name!r}: unknown category {name!r}; use one of {', '.join(CATEGORIES)} "
                              "(or russian, chinese, korean, english)")
    return n


def parse_min_cos(value: float | str) -> Rule:
    return Rule("min_cos", _cosine(str(value), f"--min-cos {value}"))


def parse_max_below(spec: str, *, category: str | None = None) -> Rule:
    """"0.95:1%" -> at most 1% of tokens below cosine 0.95."""
    parts = spec.split(":")
    if len(parts) != 2:
        raise VocabdriftError(f"--max-below {spec!r}: expected COSINE:LIMIT, e.g. 0.95:1%")
    share, count = _limit(parts[1], spec)
    return Rule("max_below", _cosine(parts[0], spec), share=share, count=count, category=category)


def parse_category(spec: str) -> Rule:
    """"japanese:0.95:5%" -> at most 5% of Japanese tokens below 0.95; "japanese:0.9" -> their min cos >= 0.9."""
    parts = spec.split(":")
    if len(parts) == 2:
        return Rule("min_cos", _cosine(parts[1], spec), category=category_name(parts[0], spec))
    if len(parts) != 3:
        raise VocabdriftError(f"--category {spec!r}: expected NAME:COSINE:LIMIT (japanese:0.95:5%) "
                              "or NAME:MIN_COS (japanese:0.9)")
    return parse_max_below(f"{parts[1]}:{parts[2]}", category=category_name(parts[0], spec))


# ---- judging --------------------------------------------------------------------------------------------------

def _judge(rule: Rule, cos: np.ndarray, ids: np.ndarray, worst_n: int) -> RuleResult:
    """`cos` holds -inf for the rows without a cosine that moved: below every threshold, worst first."""
    n = int(cos.size)
    if n == 0:  # nothing of that kind in this vocabulary: nothing can have drifted
        return RuleResult(rule, True, None, 0)
    order = np.argsort(cos, kind="stable")[:worst_n]
    worst = tuple(int(i) for i in ids[order])
    undefined = int(np.isneginf(cos).sum())
    below = int((cos < rule.threshold).sum())
    if rule.kind == "min_cos":
        m = float(cos.min())
        finite = cos[np.isfinite(cos)]
        value = m if np.isfinite(m) else (float(finite.min()) if finite.size else None)  # JSON has no -inf
        return RuleResult(rule, m >= rule.threshold, value, n, below, worst, undefined=undefined)
    share = below / n
    ok = below <= rule.count if rule.count is not None else share <= (rule.share or 0.0) + 1e-12
    return RuleResult(rule, ok, share, n, below, worst, undefined=undefined)


def model_problems(summary: dict[str, Any]) -> list[str]:
    """What makes a model broken whatever the cosines, from diff's summary: tokens the tokenizer can emit with no
    row to judge, a final norm of NaN/Inf (every logit NaN). Each is a failing part of a verdict."""
    out = []
    missing = summary.get("missing_rows") or {}
    if isinstance(missing, dict) and missing.get("count"):
        ids = missing.get("ids") or []
        out.append(f"{int(missing['count']):,} tokens the tokenizer can emit have no row in both models"
                   + (f" (first id {ids[0]})" if ids else ""))
    for name in summary.get("nonfinite_norm") or []:
        out.append(f"the final norm of {str(name).upper()} holds NaN/Inf (every logit is NaN)")
    weights = summary.get("nonfinite_weights") or []
    if weights:
        out.append(f"POST's weights hold NaN/Inf in {len(weights)} tensor(s) (first: {weights[0]}; every logit is NaN)")
    return out


def judge(drift: pa.Table, vocab: pa.Table, rules: list[Rule] | tuple[Rule, ...], *, space: str = "lm_head",
          population: str = "reachable", worst_n: int = 5, problems: Sequence[str] = ()) -> CheckResult:
    """Judge `rules` over the drift of one space ("lm_head" or "embed"). `problems` (`model_problems`) fail the
    verdict whatever the rules say.

    Args:
        drift: drift.parquet's table (token_id, {space}_cos, optional nonfinite).
        vocab: vocab.parquet's table (token_id, category, is_special, reachable).
        population: "reachable" (reachable, non-special tokens) or "all" (every non-special token).
    Returns:
        A `CheckResult`. Rows holding NaN or Inf fail the check whatever the rules and the population (a NaN
        logit poisons every softmax); rows of the population that became zero (in
        POST or BASE) have no cosine and count as below every threshold; rows zero in both (unchanged) are left
        out.
    """
    if space not in ("lm_head", "embed"):
        raise VocabdriftError(f"space must be lm_head or embed, not {space!r}")
    if population not in ("reachable", "all"):
        raise VocabdriftError(f"population must be 'reachable' or 'all', not {population!r}")
    if not rules:
        raise VocabdriftError("no rule to check; give --min-cos, --max-below or --category")
    ids = drift.column("token_id").to_numpy()
    if len(ids) and (ids.max() >= vocab.num_rows or len(np.unique(ids)) != len(ids)):
        raise VocabdriftError(f"the drift table names token ids the vocabulary table ({vocab.num_rows:,} rows) lacks, "
                              "or names one twice: the two tables are not one run's — rerun `vocabdrift diff`")
    cos = drift.column(f"{space}_cos").to_numpy(zero_copy_only=False).astype(np.float64)
    special = vocab.column("is_special").to_numpy(zero_copy_only=False)[ids]
    keep = ~special
    if population == "reachable":
        keep &= vocab.column("reachable").to_numpy(zero_copy_only=False)[ids]
    cats = np.asarray(vocab.column("category").combine_chunks().cast("string").to_pylist(), dtype=object)[ids]
    nonfinite = (drift.column("nonfinite").to_numpy(zero_copy_only=False) if "nonfinite" in drift.column_names
                 else np.zeros(len(ids), dtype=bool))
    # NaN/Inf anywhere fails, whatever the population: one NaN logit makes every softmax NaN, special rows too
    bad = tuple(int(i) for i in ids[nonfinite])
    undef = undefined_rows(drift, space) & keep
    cos[undef] = -np.inf  # no direction left: below every threshold
    keep &= np.isfinite(cos) | undef
    gone = tuple(int(i) for i in ids[undef])

    texts = vocab.column("text").to_pylist() if "text" in vocab.column_names else None
    results = []
    for rule in rules:
        m = keep if rule.category is None else keep & (cats == rule.category)
        r = _judge(rule, cos[m], ids[m], worst_n)
        if texts is not None and r.worst:
            r = replace(r, worst_text=texts[r.worst[0]])
        results.append(r)
    passed = all(r.passed for r in results) and not bad and not gone and not problems
    shown = [r for r in results if not r.passed] if not passed else results
    parts = [*problems, *(r.describe(population) for r in shown)]
    zero = [i for i in gone if i not in set(bad)]
    if zero:
        parts.insert(0, f"{len(zero)} rows became zero (first id {zero[0]})")
    if bad:
        parts.insert(0, f"{len(bad)} rows hold NaN/Inf (first id {bad[0]})")
    verdict = f"{'PASS' if passed else 'FAIL'} {space}: " + "; ".join(parts)
    return CheckResult(passed, verdict, tuple(results), space, population, bad, gone)


def parse_max_lost(spec: str) -> Rule:
    """"0" (no token may be LOST), "5" (at most five), "2%" (at most 2% of the judged tokens); with a category
    first, over that category only ("japanese:1%", a say-ability map's categories)."""
    text = str(spec)
    cat = None
    if ":" in text:
        name, text = text.rsplit(":", 1)
        cat = category_name(name, f"--max-lost {spec}")
    share, count = _limit(text, f"--max-lost {spec}")
    return Rule("max_lost", 0.0, share=share, count=count, category=cat)


def judge_lost(rule: Rule, probed: int, lost: Sequence[int], texts: Sequence[str] | None = None, *,
               noun: str = "probed tokens") -> RuleResult:
    """The say-ability rule: `lost` of `probed` judged tokens are LOST (most confident first). `noun` names the
    judged population in the verdict ("probed tokens", or a map's "tokens BASE could say")."""
    n = len(lost)
    ok = n <= rule.count if rule.count is not None else (n / max(probed, 1)) <= (rule.share or 0.0)
    return RuleResult(rule, ok, n / max(probed, 1), probed, below=n, worst=tuple(int(t) for t in lost[:5]),
                      worst_text=texts[0] if texts else None, noun=noun)


def with_rule(result: CheckResult, extra: RuleResult) -> CheckResult:
    """`result` with one more rule's outcome in its verdict."""
    results = (*result.results, extra)
    passed = result.passed and extra.passed
    head = "PASS" if passed else "FAIL"
    body = result.verdict.split(" ", 1)[1] if " " in result.verdict else result.verdict
    return replace(result, passed=passed, results=results, verdict=f"{head} {body}; {extra.describe()}")
