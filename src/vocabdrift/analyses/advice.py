"""Advice a user can act on without hurting the model: how much coverage data to mix, and which tokens never to
prune.

Two mistakes this guards against: proposing a coverage set several times the size of the user's SFT data (it
would change what the model is trained on far more than the drift it repairs), and proposing to prune tokens that
are ordinary words (` Jack`, ` Paul`) only because one SFT set rarely targets them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .vocab import LANGUAGE_NAMES, LANGUAGES, category_label

MAX_SHARE = 0.05  # the coverage set's largest advised share of the training mix (the published repair: a few %)
PRESENT = 200  # a language with this many tokens at or above the floor is plainly in the data: its tail is rare words
DRIFTED_SHARE = 0.01  # a language counts as drifted when more than this share of its rows fell below 0.95 ...
# ... and more than the vocabulary as a whole: when an SFT run moved 8% of all rows (mostly English words), a
# language with 2 of 77 rows below 0.95 is not what coverage data should go to
COMMON_ZIPF = 3.0  # Zipf frequency (log10 per billion words) from which a word is common: once per million words

# wordfreq's language for each script category; Latin is checked in several languages that write with it
_WORDFREQ_LANGS: dict[str, tuple[str, ...]] = {
    "latin": ("en", "de", "fr", "es", "it", "pt", "nl"), "cyrillic": ("ru", "uk"), "greek": ("el",),
    "arabic": ("ar",), "hebrew": ("he",), "devanagari": ("hi",), "thai": ("th",), "hangul": ("ko",),
    "japanese": ("ja",), "han": ("zh", "ja"),
}


def coverage_advice(categories: dict[str, dict[str, Any]], *, samples: int, placements_needed: int,
                    below_floor: int, floor: int, drift: dict[str, dict[str, Any]] | None = None,
                    overall: dict[str, Any] | None = None, tokens_per_sample: int = 8, under_share: float = 0.1,
                    synth_samples: int | None = None) -> dict[str, Any]:
    """summary["coverage"]["advice"]: which languages call for coverage data, and how much of it to mix.

    Args:
        categories: coverage's per-category counts ({"tokens", "at_or_above_floor"}).
        samples: SFT samples counted. placements_needed: sum over below-floor tokens of (floor - count).
        drift: diff's per-category summary (`summary["categories"]`) when the run folder holds one: a language
            is then "needs data" only when its rows also drifted: more than DRIFTED_SHARE of them below 0.95, and
            a larger share than `overall` (diff's `summary["overall"]`) when given.
        tokens_per_sample: target tokens per coverage sample (`synth`'s default).
        synth_samples: what `synth --run RUN` writes for the below-floor tokens (`analyses.synth.estimate_samples`),
            when the caller has their categories; else estimated from `placements_needed`.
    A language rarely targeted but plainly present (PRESENT tokens at the floor: its uncovered tail is rare
    words and names) or not drifted is not called under-covered.
    """
    langs = []
    for lang in LANGUAGES:
        c = categories.get(lang)
        if not c or not c.get("tokens"):
            continue
        share = c["at_or_above_floor"] / c["tokens"]
        if share >= under_share:
            continue
        d = ((drift or {}).get(lang) or {}).get("lm_head")
        drifted = None if d is None or not d.get("tokens") else d["below_0.95"] / d["tokens"] > _floor_share(overall)
        if c["at_or_above_floor"] >= PRESENT:
            verdict = "present"  # in the data; the uncovered part is its long tail
        elif drifted is False:
            verdict = "rare, not drifted"
        else:
            verdict = "needs data" if drifted else "rare"
        langs.append({"category": lang, "name": LANGUAGE_NAMES.get(lang, lang), "tokens": c["tokens"],
                      "covered_share": round(share, 4), "drifted": drifted, "verdict": verdict})
    synth = synth_samples if synth_samples is not None else math.ceil(placements_needed / max(1, tokens_per_sample))
    full_share = synth / max(1, synth + samples)
    share = min(full_share, MAX_SHARE)
    mix_count = synth if full_share <= MAX_SHARE else int(samples * MAX_SHARE / (1 - MAX_SHARE))
    per_token = floor if full_share <= MAX_SHARE else max(0.0, floor * mix_count / max(1, synth))
    return {"languages": langs, "below_floor": below_floor, "synth_samples": synth, "sft_samples": samples,
            "synth_to_sft": round(synth / max(1, samples), 3), "mix_share": round(share, 4),
            "mix_samples": mix_count, "placements_per_token": round(per_token, 2)}


def _floor_share(overall: dict[str, Any] | None) -> float:
    """The share of a language's rows below 0.95 above which it counts as drifted."""
    o = (overall or {}).get("lm_head")
    return max(DRIFTED_SHARE, o["below_0.95"] / o["tokens"]) if o and o.get("tokens") else DRIFTED_SHARE


def advice_lines(advice: dict[str, Any]) -> list[str]:
    """The advice as sentences for the console and the report."""
    lines = []
    def shown(*verdicts: str) -> list[str]:
        return [category_label(x["category"]) for x in advice["languages"] if x["verdict"] in verdicts]

    need, rare, fine = shown("needs data"), shown("rare"), shown("present", "rare, not drifted")
    if need:
        lines.append(f"Needs coverage data (rarely targeted and drifted): {', '.join(need)}.")
    if rare:
        lines.append(f"Rarely targeted: {', '.join(rare)} — run `vocabdrift diff BASE POST` into this folder to see "
                     "whether their rows drifted before adding data.")
    if fine:
        lines.append(f"Not a problem: {', '.join(fine)} (present in the data, or rarely targeted without drift).")
    if advice["below_floor"]:
        s, f = advice["synth_samples"], advice["sft_samples"]
        if advice["mix_samples"] >= s:  # the whole set fits in the advised share
            lines.append(f"A coverage set for the {advice['below_floor']:,} tokens below the floor: about {s:,} "
                         f"samples, {advice['mix_share']:.1%} of the mix; add it whole.")
        else:
            lines.append(f"A coverage set for all {advice['below_floor']:,} tokens below the floor would be about "
                         f"{s:,} samples, {advice['synth_to_sft']:.1f}x your {f:,} SFT samples: too much. Mix a "
                         f"{advice['mix_share']:.0%} share (`vocabdrift mix SFT SYNTH -o MIXED --ratio "
                         f"{advice['mix_share']:g}`, {advice['mix_samples']:,} samples, about "
                         f"{advice['placements_per_token']:g} placements per token)"
                         + (", and cover the languages that need data first." if need else "."))
    return lines


def common_words(texts: Sequence[str], categories: Sequence[str], *, zipf: float = COMMON_ZIPF,
                 known: dict[str, bool] | None = None) -> tuple[list[bool], bool]:
    """Which tokens are common words of ordinary text (never to be pruned): ([common per token], available).

    Uses `wordfreq` (an optional dependency) in the languages of each token's script. Without it, every token
    that reads as a word (letters only, two or more) counts as common: the advice then never proposes a word,
    and says why (`available` is False).

    `known` ("category\ttext" -> common, from earlier calls at this `zipf`) is read first and gets the new
    answers: a cache the caller keeps, because loading wordfreq's word lists takes seconds and a run folder's
    candidates are asked again and again."""
    keys = [f"{c}\t{t}" for t, c in zip(texts, categories, strict=True)]
    if known is not None and all(k in known for k in keys):
        return [known[k] for k in keys], True
    try:
        from wordfreq import zipf_frequency
    except ImportError:
        return [_wordlike(t) for t in texts], False
    broken: set[str] = set()  # languages whose word list needs a tokenizer wordfreq lacks here (jieba, MeCab)

    def freq(w: str, lang: str) -> float | None:
        if lang in broken:
            return None
        try:
            return zipf_frequency(w, lang)
        except Exception:  # noqa: BLE001 - an optional segmenter missing: judge that language without the list
            broken.add(lang)
            return None

    out = []
    for text, cat, key in zip(texts, categories, keys, strict=True):
        if known is not None and key in known:
            out.append(known[key])
            continue
        w = text.strip()
        found = [f for f in (freq(w, lang) for lang in _WORDFREQ_LANGS.get(str(cat), ())) if f is not None]
        if not found and _WORDFREQ_LANGS.get(str(cat)):
            out.append(_wordlike(text))  # no usable list for this script: never propose a word
        else:
            out.append(bool(w) and bool(found) and max(found) >= zipf)
        if known is not None and not (broken & set(_WORDFREQ_LANGS.get(str(cat), ()))):
            known[key] = out[-1]  # an answer without a missing segmenter's list: stable, worth keeping
    return out, True


def _wordlike(text: str) -> bool:
    w = text.strip()
    return len(w) >= 2 and w.isalpha()
