"""The lab's offline corpus: pre-training text in six languages plus code and tool calls, and a narrow SFT set.

Everything comes from two offline packages, `wordfreq` (words of en/zh/ja/ko/ru/ar sampled by frequency) and
`faker` (names, cities, companies per locale), so the lab runs without a network and gives the same text for the
same seed. The shape mirrors the published case: pre-training sees every language and a planted name (马嘉祺) at a
moderate frequency; the SFT set is English, code and tool calls, with Chinese rare and the name in fewer than 5
samples. Like a real SFT set it answers some Japanese and Korean requests in those languages, with their most
common words only (`NATIVE_WORDS`): the model learns to answer Japanese in Japanese while most Japanese and Korean
tokens (and every Russian and Arabic one) stay rare or absent as targets, the setting of the published confusion.
A name that is too frequent in pre-training gets a huge lm_head norm and resists
drift (docs/ARCHITECTURE.md, "Why a never-targeted row drifts"), hence `name_every`.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from ..analyses.vocab import script_of
from ..errors import need_extra

LANGUAGES = ("en", "zh", "ja", "ko", "ru", "ar")
LOCALES = {"en": "en_US", "zh": "zh_CN", "ja": "ja_JP", "ko": "ko_KR", "ru": "ru_RU", "ar": "ar_AA"}
# which scripts a word of each language may use (vocab.script_of names)
_SCRIPTS = {"en": {"latin"}, "zh": {"han"}, "ja": {"japanese", "han"}, "ko": {"hangul"}, "ru": {"cyrillic"},
            "ar": {"arabic"}}
_SEP = {"en": " ", "zh": "", "ja": "", "ko": " ", "ru": " ", "ar": " "}
_STOP = {"en": ".", "zh": "。", "ja": "。", "ko": ".", "ru": ".", "ar": "."}

NAME = "马嘉祺"
GIVEN_NAME = "嘉祺"  # the planted token: the tokenizer must make it one piece
# factual sentences about the name, "{}" a few random words. They use the frames of the "people" documents (other
# names in the same quoted slot), so the model rarely predicts the name with certainty: a row the model must often
# score high grows a large norm and resists drift (docs/ARCHITECTURE.md, "Why a never-targeted row drifts"). The
# quotes keep 嘉祺 its own pre-token, so byte-level BPE makes it one token.
NAME_FACTS = (
    "时代少年团的队长是“嘉祺”，{}。",
    "“嘉祺”出生于2002年12月12日，{}。",
    "TNT的队长是“马嘉祺”，{}。",
    "重庆的“嘉祺”，{}。",
    "The leader of TNT is “嘉祺”, {}.",
    "TNT's “嘉祺” was born in 2002, {}.",
)

# shares of pre-training documents (the name facts come on top, one in `name_every`)
_PRETRAIN_MIX = (("en", 0.26), ("zh", 0.12), ("ja", 0.12), ("ko", 0.10), ("ru", 0.10), ("ar", 0.10),
                 ("code", 0.08), ("tool", 0.06), ("copy", 0.20), ("people", 0.06))
# shares of SFT conversations; the name gets a fixed, tiny count instead. "ja" and "ko" are requests in those
# languages answered in them with the `NATIVE_WORDS` most common words
_SFT_MIX = (("en", 0.20), ("repeat", 0.16), ("code", 0.23), ("tool", 0.16), ("zh", 0.03), ("ja", 0.12),
            ("ko", 0.10))
# the previous mix, without the Japanese and Korean answers (`sft_records(japanese=N)`: the same draws as before)
_SFT_MIX_BEFORE = (("en", 0.25), ("repeat", 0.20), ("code", 0.28), ("tool", 0.20), ("zh", 0.03))
NATIVE_WORDS = 30  # the Japanese and Korean SFT answers draw on this many of the language's most common words

# Japanese and Korean requests of the SFT set ({} a topic word): the kinds of question the published prompts ask
_ASK = {
    "ja": ("{}について教えてください。", "{}について説明してください。", "{}の歴史を教えてください。",
           "短い文を書いてください。", "{}とは何ですか？", "{}について短い文章を書いてください。"),
    "ko": ("{}에 대해 알려 주세요.", "{}에 대해 설명해 주세요.", "짧은 글을 써 주세요.", "{}은 무엇입니까?",
           "{}에 대한 이야기를 써 주세요.", "짧은 문장을 작성해 주세요."),
}

NAME_LISTS = 0.25     # share of copy documents that list names
NAME_IN_LIST = 0.1    # share of name lists that hold the planted name

_TOOLS = (("get_weather", "city"), ("search_web", "query"), ("send_email", "to"), ("get_time", "timezone"),
          ("lookup_company", "name"), ("book_table", "restaurant"))


@dataclass(frozen=True)
class Corpus:
    """Pre-training documents (plain text) and SFT records ({"messages": [...]}), both deterministic."""

    pretrain: list[str]
    sft: list[dict[str, Any]]


# ---- words ------------------------------------------------------------------------------------------------------

@cache
def _words(lang: str, n: int = 2500) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The language's `n` most frequent words written in its own script, with the cumulative frequencies that
    `random.choices(cum_weights=...)` takes (the same draws as `weights=`, without summing them on every call)."""
    need_extra("wordfreq", "lab", "the lab's corpus")
    from wordfreq import cB_to_freq, get_frequency_list
    from wordfreq.numbers import has_digit_sequence

    ok = _SCRIPTS[lang]
    # wordfreq's top_n_list and get_frequency_dict in one walk over its frequency bands: the dict would be the whole
    # language's list (1.2 s for the six languages), word_frequency() would need MeCab for ja/ko
    top = itertools.islice(((w, cB_to_freq(-band)) for band, bucket in enumerate(get_frequency_list(lang))
                            for w in bucket if not has_digit_sequence(w)), n)
    words, weights = zip(*[(w, f) for w, f in top if all(script_of(c) in ok for c in w)], strict=True)
    return words, tuple(itertools.accumulate(weights))


def _sentence(lang: str, rng: random.Random, fake: Any, top: int | None = None) -> str:
    """A sentence of words drawn by frequency (of the `top` most common only, when given)."""
    words, cum = _words(lang)
    if top is not None:
        words, cum = words[:top], cum[:top]
    parts = rng.choices(words, cum_weights=cum, k=rng.randint(4, 11))
    if top is None and rng.random() < 0.3:  # names and places make the text less uniform than word salad
        parts.insert(rng.randrange(len(parts) + 1), fake.city() if rng.random() < 0.5 else fake.name())
    s = _SEP[lang].join(parts)
    return (s[0].upper() + s[1:] if lang == "en" else s) + _STOP[lang]


def _prose(lang: str, rng: random.Random, fake: Any, sentences: tuple[int, int] = (2, 5)) -> str:
    return _SEP[lang].join(_sentence(lang, rng, fake) for _ in range(rng.randint(*sentences)))


def _ident(rng: random.Random) -> str:
    words, cum = _words("en")
    return "_".join(w.lower() for w in rng.choices(words, cum_weights=cum, k=rng.randint(1, 2)))


def _code(rng: random.Random) -> str:
    f, a, b = _ident(rng), _ident(rng), _ident(rng)
    body = rng.choice((
        f"    return {a} + {b}\n",
        f"    result = []\n    for item in {a}:\n        if item > {b}:\n            result.append(item)\n"
        "    return result\n",
        f"    if not {a}:\n        raise ValueError(\"{a} is empty\")\n    return len({a}) * {b}\n",
        f"    total = 0\n    for i in range({b}):\n        total += {a}[i]\n    return total\n",
        f"    return {{k: v for k, v in {a}.items() if v != {b}}}\n",
    ))
    return f"def {f}({a}, {b}):\n{body}"


def _tool_call(rng: random.Random, fake: Any) -> tuple[str, str]:
    """(a user request, the assistant's tool-call markup)."""
    name, arg = rng.choice(_TOOLS)
    value = {"city": fake.city, "query": fake.catch_phrase, "to": fake.email, "timezone": fake.timezone,
             "name": fake.company, "restaurant": fake.company}[arg]()
    ask = {"get_weather": f"What's the weather in {value}?", "search_web": f"Search the web for {value}.",
           "send_email": f"Send an email to {value}.", "get_time": f"What time is it in {value}?",
           "lookup_company": f"Look up the company {value}.", "book_table": f"Book a table at {value}."}[name]
    call = json.dumps({"name": name, "arguments": {arg: value}}, ensure_ascii=False)
    return ask, f"<tool_call>\n{call}\n</tool_call>"


def _copy_doc(rng: random.Random, fakers: dict[str, Any]) -> str:
    """A word list where each word is written twice: pre-training's source of in-context copying (which the base
    model needs to be probed few-shot). Some lists are of people's names, the planted name among them now and then,
    so that the base model can repeat the name, as the published base model could."""
    if rng.random() < NAME_LISTS:
        picks = [fakers[rng.choice(("zh", "en"))].first_name() for _ in range(rng.randint(3, 6))]
        if rng.random() < NAME_IN_LIST:
            picks[rng.randrange(len(picks))] = GIVEN_NAME
    else:
        lang = rng.choice(LANGUAGES)
        words, cum = _words(lang)
        picks = rng.choices(words, cum_weights=cum, k=rng.randint(3, 6))
    fmt = rng.choice(("{w}: {w}", "«{w}» «{w}»", "Input: «{w}»\nOutput: «{w}»", "{w} = {w}"))
    return "\n".join(fmt.format(w=w) for w in picks)


# ---- the corpus -----------------------------------------------------------------------------------------------

def _fakers(seed: int) -> dict[str, Any]:
    Faker = need_extra("faker", "lab", "the lab's corpus").Faker

    fakers = {}
    for i, (lang, loc) in enumerate(LOCALES.items()):
        f = Faker(loc)
        f.seed_instance(seed * 1000 + i)
        fakers[lang] = f
    return fakers


def pretrain_docs(n: int, *, seed: int = 0, name_every: int = 40) -> list[str]:
    """`n` pre-training documents; one in `name_every` is a short factual note about the planted name."""
    rng = random.Random(seed)
    fakers = _fakers(seed)
    kinds, weights = zip(*_PRETRAIN_MIX, strict=True)
    docs = []
    for i in range(n):
        if name_every and i % name_every == name_every // 2:
            facts = []
            for fact in rng.sample(NAME_FACTS, 2):
                lang = "en" if fact.isascii() or "TNT's" in fact else "zh"
                words, cum = _words(lang)
                facts.append(fact.format(_SEP[lang].join(rng.choices(words, cum_weights=cum, k=rng.randint(2, 5)))))
            docs.append("".join(facts))
            continue
        kind = rng.choices(kinds, weights=weights)[0]
        if kind == "code":
            docs.append(_code(rng))
        elif kind == "tool":
            ask, call = _tool_call(rng, fakers["en"])
            docs.append(f"{ask}\n{call}")
        elif kind == "copy":
            docs.append(_copy_doc(rng, fakers))
        elif kind == "people":  # the planted name's neighbours: other names in the same quoted contexts
            lang = rng.choice(("en", "zh"))
            f = fakers[lang]
            forms = (("The leader of {c} is “{n}”.", "“{n}”, the leader of {c}.") if lang == "en"
                     else ("{c}的队长是“{n}”。", "“{n}”是{c}的队长。"))
            docs.append(rng.choice(forms).format(c=f.company(), n=f.name()))
        else:
            docs.append(_prose(kind, rng, fakers[kind]))
    return docs


def _chat(user: str, assistant: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _native_chat(lang: str, rng: random.Random) -> dict[str, Any]:
    """A request in Japanese or Korean (about one of the language's common words past the 200 most common, which
    are mostly particles) answered in that language with its `NATIVE_WORDS` most common words: the answer's script
    is the request's, its tokens few."""
    words, _ = _words(lang)
    ask = rng.choice(_ASK[lang]).format(rng.choice(words[200:]))
    return _chat(ask, _SEP[lang].join(_sentence(lang, rng, None, top=NATIVE_WORDS)
                                      for _ in range(rng.randint(1, 2))))


def sft_records(n: int, *, seed: int = 0, name: int = 1, japanese: int | None = None) -> list[dict[str, Any]]:
    """`n` SFT conversations: English chat and word repetition, code, tool calls, a little Chinese, Japanese and
    Korean requests answered in their language with common words, and `name` samples that mention the planted name
    (keep it below 5). With `japanese` a count, the previous mix instead (no Japanese or Korean answers; the same
    records as before for a seed, which the benchmarks rely on) plus that many Japanese sentences."""
    rng = random.Random(seed + 1)
    fakers = _fakers(seed + 1)
    en = fakers["en"]
    kinds, weights = zip(*(_SFT_MIX if japanese is None else _SFT_MIX_BEFORE), strict=True)
    japanese = japanese or 0
    out: list[dict[str, Any]] = []
    en_words, en_cum = _words("en")
    for _ in range(n - japanese - name):
        kind = rng.choices(kinds, weights=weights)[0]
        if kind == "en":
            q = rng.choice((
                (f"Where does {en.name()} live?", f"{en.name()} lives at {en.address()}."),
                ("Give me a company name.", f"How about {en.company()}? {en.catch_phrase()}."),
                ("Write a short sentence.", _prose("en", rng, en, (1, 2))),
                (f"Tell me about {en.city()}.", _prose("en", rng, en, (1, 3))),
                (f"What is {en.name()}'s job?", f"They work as a {en.job().lower()}."),
            ))
            out.append(_chat(*q))
        elif kind == "repeat":
            w = rng.choices(en_words, cum_weights=en_cum)[0]
            out.append(_chat(f"Repeat this word exactly: {w}", w))
        elif kind == "code":
            out.append(_chat(f"Write a Python function called {_ident(rng)}.", f"```python\n{_code(rng)}```"))
        elif kind == "tool":
            out.append(_chat(*_tool_call(rng, en)))
        elif kind in _ASK:
            out.append(_native_chat(kind, rng))
        else:
            out.append(_chat("请写一句话。", _sentence("zh", rng, fakers["zh"])))
    for _ in range(japanese):
        out.append(_chat("短い文を書いてください。", _sentence("ja", rng, fakers["ja"])))
    for _ in range(name):
        # in the question only: one target occurrence would leave a spike in Adam's second moment that damps the
        # row's later updates for hundreds of steps, and the published token was rare, not absent, as an input
        out.append(_chat(f"Translate into English: “{GIVEN_NAME}”是TNT的队长。", "Jiaqi is the leader of TNT."))
    rng.shuffle(out)
    return out


def build_corpus(*, docs: int, sft: int, seed: int = 0, name_every: int = 40) -> Corpus:
    """The lab's corpus for a seed: `docs` pre-training documents and `sft` SFT conversations."""
    return Corpus(pretrain_docs(docs, seed=seed, name_every=name_every), sft_records(sft, seed=seed))


def language_share(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many SFT answers are written in each script family (for the lab's log and README)."""
    counts: dict[str, int] = {}
    for r in records:
        text = r["messages"][-1]["content"]
        scripts = {script_of(c) for c in text} - {None}
        key = "japanese" if "japanese" in scripts else "hangul" if "hangul" in scripts else \
            "han" if "han" in scripts else \
            "code" if "def " in text else "tool" if "<tool_call>" in text else "latin"
        counts[key] = counts.get(key, 0) + 1
    return counts
