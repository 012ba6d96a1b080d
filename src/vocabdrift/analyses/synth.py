"""The full-vocabulary coverage set: repetition tasks that make every token a generation target.

Pure: token ids, their texts and categories, a `tokenizers.Tokenizer` (used only to encode, for verification) and the
task phrasings in; samples and the list of tokens that could not be placed (with the reason) out.

Naive string repetition is wrong for a byte-level BPE: "the the the" gives `the`, `Ġthe`, `Ġthe`, so the token
`the` appears once. Each token is therefore laid out with a separator chosen by encoding candidate layouts and
keeping the first in which every repetition comes back as that very id; every answer is then re-tokenized, and a
token that fails inside a shared answer is moved to an answer of its own, where its layout was already verified.

Each answer lists tokens of one script, asked in that script's language. Mixed into SFT as a large share, the
lists still taught the lab's 2-layer model (which cannot copy them from the prompt) that after a newline any script
may come, and its Japanese answers picked up more foreign letters; at 5% of the samples they did not. A layout that
led every line with a word of the token's own script did worse. Measured in docs/LAB.md ("Why coverage raises
confusion here"): keep the set a small share of the mix, and measure `confusion` before and after.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tokenizers

# Layout separators, most natural first. The odd ones ("x") exist for whitespace pieces, which merge with any
# whitespace separator: "   " followed by " x" stays a piece of its own under GPT-2/Qwen pre-tokenizers.
SEPARATORS: tuple[str, ...] = ("\n", " ", ", ", "\n\n", " | ", " x", "x", ".", "\t", "\r\n")
MAX_REPS = 5  # the phrasings have number words up to five
_CHECK_REPS = 3  # a layout is verified with three repetitions: first, middle and last positions
# Task language by token category; everything else is asked in English.
TASK_LANGUAGE = {"han": "zh", "japanese": "ja", "hangul": "ko", "cyrillic": "ru", "arabic": "ar"}


@dataclass(frozen=True)
class SynthSample:
    """One conversation: a user prompt and the assistant answer that repeats each token `reps` times."""

    language: str
    prompt: str
    answer: str
    token_ids: tuple[int, ...]
    reps: int


@dataclass(frozen=True)
class SynthPlan:
    samples: list[SynthSample]
    placed: dict[int, int]  # token id -> verified occurrences in the answers
    skipped: dict[int, str]  # token id -> why it could not be placed


def _encode_counts(backend: tokenizers.Tokenizer, texts: Sequence[str], want: Sequence[int]) -> np.ndarray:
    """How many times id want[i] appears in the encoding of texts[i] (int64 (n,))."""
    encs = backend.encode_batch(list(texts), add_special_tokens=False)
    return np.fromiter((e.ids.count(w) for e, w in zip(encs, want, strict=True)), dtype=np.int64, count=len(want))


def choose_layouts(backend: tokenizers.Tokenizer, ids: Sequence[int], texts: Sequence[str]
                   ) -> tuple[dict[int, str], dict[int, str]]:
    """For each token, the first separator in SEPARATORS whose layout `s SEP s SEP s` encodes to three `id`s.

    Returns (id -> separator, id -> reason for the tokens no separator places).
    """
    todo = list(zip(ids, texts, strict=True))
    chosen: dict[int, str] = {}
    for sep in SEPARATORS:
        if not todo:
            break
        got = _encode_counts(backend, [sep.join([t] * _CHECK_REPS) for _, t in todo], [i for i, _ in todo])
        rest = []
        for (i, t), n in zip(todo, got, strict=True):
            if n >= _CHECK_REPS:
                chosen[i] = sep
            else:
                rest.append((i, t))
        todo = rest
    failed = {}
    if todo:
        shown = [SEPARATORS[0].join([t] * _CHECK_REPS) for _, t in todo]
        encs = backend.encode_batch(shown, add_special_tokens=False)
        for (i, _), text, e in zip(todo, shown, encs, strict=True):
            failed[i] = (f"no layout of {len(SEPARATORS)} separators keeps it whole, e.g. {text!r} tokenizes as "
                         f"{e.tokens[:8]}{'...' if len(e.tokens) > 8 else ''}")
    return chosen, failed


def _show(word: str) -> str:
    """The word as shown in a prompt: quoted and escaped when whitespace or control characters would hide it."""
    if not word.strip() or word != word.strip() or any(ord(c) < 32 for c in word):
        return json.dumps(word, ensure_ascii=False)
    return word


def _prompt(tasks: dict[str, Any], lang: str, words: Sequence[str], reps: int, rng: random.Random) -> str:
    t = tasks.get(lang) or tasks["en"]
    times = t["times"][reps - 1]
    if len(words) == 1:
        return rng.choice(t["one"]).format(times=times, word=_show(words[0]))
    return rng.choice(t["many"]).format(times=times, words="\n".join(_show(w) for w in words))


def _make(tasks: dict[str, Any], lang: str, group: Sequence[tuple[int, str, str]], reps: int,
          rng: random.Random) -> SynthSample:
    answer = "\n".join(sep.join([text] * reps) for _, text, sep in group)
    return SynthSample(lang, _prompt(tasks, lang, [t for _, t, _ in group], reps, rng), answer,
                       tuple(i for i, _, _ in group), reps)


def verify(backend: tokenizers.Tokenizer, samples: Sequence[SynthSample]) -> list[np.ndarray]:
    """Re-tokenize every answer; per sample, the occurrences (int64) of each of its token ids as that id."""
    encs = backend.encode_batch([s.answer for s in samples], add_special_tokens=False)
    out = []
    for s, e in zip(samples, encs, strict=True):
        ids = e.ids
        out.append(np.fromiter((ids.count(i) for i in s.token_ids), dtype=np.int64, count=len(s.token_ids)))
    return out


def estimate_samples(categories: Sequence[str], need: Sequence[int], *, tokens_per_sample: int = 8) -> int:
    """How many samples `plan` writes for tokens of these categories placed `need` times each, before
    verification (which adds a sample only for a token whose shared answer did not re-tokenize): the same
    grouping by task language and repetitions, so an estimate shown before `synth` runs is what it writes."""
    groups: dict[tuple[str, int], int] = defaultdict(int)
    for cat, n in zip(categories, need, strict=True):
        if n < 1:
            continue
        k = math.ceil(n / MAX_REPS)
        groups[(TASK_LANGUAGE.get(str(cat), "en"), math.ceil(n / k))] += k
    return sum(math.ceil(c / max(1, tokens_per_sample)) for c in groups.values())


def plan(backend: tokenizers.Tokenizer, ids: Sequence[int], texts: Sequence[str], categories: Sequence[str],
         need: Sequence[int], tasks: dict[str, Any], *, tokens_per_sample: int = 8, seed: int = 0) -> SynthPlan:
    """Build verified repetition samples placing token ids[i] at least need[i] times.

    Args:
        backend: the raw tokenizer; only `encode_batch` is used.
        ids, texts, categories: the tokens to place, their text (which must encode alone to the id) and category.
        need: occurrences wanted per token (>= 1).
        tasks: phrasings per task language ({"en": {"one": [...], "many": [...], "times": [...]}, ...}).
        tokens_per_sample: tokens per conversation (several keep the set small).
    """
    if tokens_per_sample < 1:
        raise ValueError("tokens_per_sample must be at least 1")
    rng = random.Random(seed)
    seps, skipped = choose_layouts(backend, ids, texts)
    text_of = dict(zip(ids, texts, strict=True))
    # Each token is spread over k samples of `reps` repetitions: k * reps >= need, reps <= MAX_REPS.
    groups: dict[tuple[str, int], list[tuple[int, str, str]]] = defaultdict(list)
    for i, cat, n in zip(ids, categories, need, strict=True):
        if i not in seps or n < 1:
            continue
        k = math.ceil(n / MAX_REPS)
        reps = math.ceil(n / k)
        lang = TASK_LANGUAGE.get(cat, "en")
        for _ in range(k):
            groups[(lang, reps)].append((i, text_of[i], seps[i]))
    samples: list[SynthSample] = []
    for (lang, reps), items in sorted(groups.items()):
        # tokens sharing a separator share answers (fewer new contexts); repeated copies land in other samples
        items.sort(key=lambda x: (x[2], x[0]))
        for j in range(0, len(items), tokens_per_sample):
            samples.append(_make(tasks, lang, items[j:j + tokens_per_sample], reps, rng))

    # Verify; the tokens of an answer that fails get answers of their own (their layout was verified alone).
    placed: dict[int, int] = defaultdict(int)
    keep: list[SynthSample] = []
    retry: list[SynthSample] = []
    for s, got in zip(samples, verify(backend, samples), strict=True):
        if (got >= s.reps).all():
            keep.append(s)
            for i, g in zip(s.token_ids, got, strict=True):
                placed[i] += int(g)
        else:
            retry.extend(_make(tasks, s.language, [(i, text_of[i], seps[i])], s.reps, rng) for i in s.token_ids)
    for s, got in zip(retry, verify(backend, retry), strict=True):
        i = s.token_ids[0]
        if got[0] >= s.reps:
            keep.append(s)
            placed[i] += int(got[0])
        else:
            e = backend.encode(s.answer, add_special_tokens=False)
            skipped[i] = f"repeated {s.reps}x with separator {seps[i]!r} it tokenizes as {e.tokens[:6]}"
    # a token can pass in one of its copies and fail in another: keep what was placed, skip only the unplaced
    for i in list(skipped):
        if placed.get(i, 0) > 0:
            del skipped[i]
    rng.shuffle(keep)
    return SynthPlan(keep, dict(placed), skipped)


def to_record(s: SynthSample, fmt: str = "messages") -> dict[str, Any]:
    """The sample as a `messages`, `sharegpt`, `alpaca` or `prompt-completion` record (SFTTrainer, LLaMA-Factory)."""
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.answer}]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": s.prompt}, {"from": "gpt", "value": s.answer}]}
    if fmt == "alpaca":
        return {"instruction": s.prompt, "input": "", "output": s.answer}
    if fmt == "prompt-completion":
        return {"prompt": s.prompt, "completion": s.answer}
    raise ValueError(f"unknown format {fmt!r}; use messages, sharegpt, alpaca or prompt-completion")
