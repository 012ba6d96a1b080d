"""Language confusion: does an answer contain letters of a script that does not belong to the prompt's language?

The published case: Japanese answers picked up Cyrillic 47% of the time after SFT. Each character's script comes
from `analyses.vocab.script_of`; digits, punctuation, symbols and spaces have no script and are always allowed.
A sample is a hit when it holds at least one character of a script outside its language's allowed set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import VocabdriftError
from .vocab import script_of

# Scripts a language's answers may use. Latin is allowed everywhere (names, code, units); Han is allowed in
# Japanese (kanji) and Chinese; Korean answers with Hanja are rare enough in chat models to flag.
ALLOWED: dict[str, frozenset[str]] = {
    "ja": frozenset({"japanese", "han", "latin"}),
    "zh": frozenset({"han", "latin"}),
    "ko": frozenset({"hangul", "latin"}),
    "ru": frozenset({"cyrillic", "latin"}),
    "en": frozenset({"latin"}),
    "ar": frozenset({"arabic", "latin"}),
    "he": frozenset({"hebrew", "latin"}),
    "hi": frozenset({"devanagari", "latin"}),
    "th": frozenset({"thai", "latin"}),
    "el": frozenset({"greek", "latin"}),
}


def _allowed(language: str) -> frozenset[str]:
    try:
        return ALLOWED[language]
    except KeyError:
        raise VocabdriftError(f"unknown language {language!r}; choose from {', '.join(sorted(ALLOWED))}") from None


def offending_scripts(text: str, language: str) -> Counter[str]:
    """script -> number of characters in `text` whose script does not belong to `language`."""
    allowed = _allowed(language)
    c: Counter[str] = Counter()
    for ch in text:
        s = script_of(ch)
        if s is not None and s not in allowed:
            c[s] += 1
    return c


@dataclass(frozen=True)
class ConfusionCount:
    """How many of n answers mixed in a foreign script; `by_script` counts answers per offending script."""

    n: int
    hits: int
    by_script: dict[str, int]

    @property
    def rate(self) -> float:
        return self.hits / self.n if self.n else float("nan")


def count_confusion(answers: Sequence[str], language: str) -> ConfusionCount:
    """Count answers holding any foreign-script character, and per script the answers holding it."""
    by: Counter[str] = Counter()
    hits = 0
    for a in answers:
        off = offending_scripts(a, language)
        hits += bool(off)
        by.update(off.keys())
    return ConfusionCount(len(answers), hits, dict(sorted(by.items(), key=lambda kv: (-kv[1], kv[0]))))


def wilson_interval(hits: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial rate (scipy's), which stays inside [0, 1] at 0 and n hits."""
    from scipy.stats import binomtest

    if n <= 0:
        raise VocabdriftError("the interval needs at least one sample; use -n 1 or more")
    ci = binomtest(hits, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def fisher_test(hits_a: int, n_a: int, hits_b: int, n_b: int) -> tuple[float, float]:
    """(odds ratio, two-sided p-value) of Fisher's exact test on the 2x2 table hits/misses x model a/b."""
    from scipy.stats import fisher_exact

    res = fisher_exact([[hits_a, n_a - hits_a], [hits_b, n_b - hits_b]], alternative="two-sided")
    return float(res.statistic), float(res.pvalue)
