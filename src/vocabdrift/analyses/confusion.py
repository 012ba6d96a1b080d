"""Language confusion: does an answer contain letters of a script that does not belong to the prompt's language?

The published case: Japanese answers picked up Cyrillic 47% of the time after SFT. Each character's script comes
from `analyses.vocab.script_of`; digits, punctuation, symbols and spaces have no script and are always allowed.
A sample is a hit when it holds at least one character of a script outside its language's allowed set. An answer
is "native" when more than half of its letters (characters with a script) are of the language's own scripts
(`NATIVE`: kana and kanji for Japanese): what tells an answer in Japanese from one in English or in tool-call
markup, which holds no foreign letter either and so cannot show confusion.
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


# The language's own scripts (ALLOWED without the Latin every language may borrow).
NATIVE: dict[str, frozenset[str]] = {k: v - {"latin"} for k, v in ALLOWED.items() if k != "en"} | {
    "en": frozenset({"latin"})}


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


def foreign_spans(text: str, language: str) -> list[tuple[int, int, str]]:
    """The runs of foreign letters in `text`: (start, end, script) character offsets, `text[start:end]` all of one
    script outside the language's allowed set. What the report marks."""
    allowed = _allowed(language)
    out: list[tuple[int, int, str]] = []
    for i, ch in enumerate(text):
        s = script_of(ch)
        if s is None or s in allowed:
            continue
        if out and out[-1][1] == i and out[-1][2] == s:
            out[-1] = (out[-1][0], i + 1, s)
        else:
            out.append((i, i + 1, s))
    return out


def is_native(text: str, language: str) -> bool:
    """Whether more than half of the letters of `text` are of the language's own scripts (no letter: False)."""
    _allowed(language)
    own = NATIVE[language]
    letters = native = 0
    for ch in text:
        s = script_of(ch)
        if s is not None:
            letters += 1
            native += s in own
    return 2 * native > letters


@dataclass(frozen=True)
class ConfusionCount:
    """How many of n answers mixed in a foreign script; `by_script` counts answers per offending script;
    `native` the answers mostly in the language's own scripts (`is_native`)."""

    n: int
    hits: int
    by_script: dict[str, int]
    native: int = 0

    @property
    def rate(self) -> float:
        return self.hits / self.n if self.n else float("nan")


def count_confusion(answers: Sequence[str], language: str) -> ConfusionCount:
    """Count answers holding any foreign-script character, and per script the answers holding it."""
    by: Counter[str] = Counter()
    hits = native = 0
    for a in answers:
        off = offending_scripts(a, language)
        hits += bool(off)
        by.update(off.keys())
        native += is_native(a, language)
    return ConfusionCount(len(answers), hits, dict(sorted(by.items(), key=lambda kv: (-kv[1], kv[0]))), native)


def answer_rows(answers: Sequence[str], *, prompt: str, language: str, model: str, name: str = ""
                ) -> list[dict[str, object]]:
    """One row per sampled answer, as RUN/confusion.jsonl holds them: prompt, its name and language, the model,
    the sample's index, its text, the foreign scripts found (script -> letters) and whether it is native."""
    return [{"prompt": prompt, "name": name, "language": language, "model": model, "sample": i, "text": a,
             "foreign": dict(sorted(offending_scripts(a, language).items())), "native": is_native(a, language)}
            for i, a in enumerate(answers)]


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
