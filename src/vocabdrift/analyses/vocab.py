"""The vocabulary table: one row per token id, with its text and category.

Pure: it takes the pieces, their raw bytes and flags (read by `sources.tokenizer`) and returns a pyarrow table.
Categories follow docs/ARCHITECTURE.md ("Categories"). A token is classified by the script of its letters after
decoding; any kana makes it Japanese (kana is what tells Japanese from Chinese), Han alone is Chinese.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

CATEGORIES: tuple[str, ...] = (
    "special", "unused", "padding", "byte", "whitespace", "number", "punctuation", "latex", "markup", "emoji",
    "latin", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai", "hangul", "japanese", "han", "other",
)
# The languages reported on their own, in the order of the reference table of docs/ARCHITECTURE.md.
LANGUAGES: tuple[str, ...] = ("japanese", "hangul", "arabic", "cyrillic", "han", "latin")
LANGUAGE_NAMES = {"japanese": "Japanese", "hangul": "Korean", "arabic": "Arabic", "cyrillic": "Russian",
                  "han": "Chinese", "latin": "English/Latin"}
# Rows that are never ordinary tokens: "unused" (reserved names, GGUF type UNUSED) and "padding" (matrix rows past
# the tokenizer's entries). Both are marked special, so `overall`, `reachable` and every "non-special" set leave them
# out; they are counted on their own in the drift summary.
NOT_TOKENS: tuple[str, ...] = ("unused", "padding")

# Reserved or unused token names per tokenizer family (full matches against the vocabulary piece): the reference
# rows of the tied-model indicator in `undertrained`, and category "unused" in the vocabulary table. A caller may
# pass its own table (`reserved_ids(..., names=...)`); `undertrained --unused` adds ids.
RESERVED_NAMES: dict[str, str] = {
    "llama3": r"<\|reserved_special_token_\d+\|>",
    "gemma": r"<unused\d+>",
    "qwen": r"\[PAD\d+\]|<\|extra_\d+\|>",
    "mistral": r"<SPECIAL_\d+>|\[control_\d+\]",
}

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's enum, as the `gguf` package's TokenType).
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6

# (first, last, script) code point ranges for letters; checked in order.
_SCRIPT_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x3040, 0x309F, "japanese"), (0x30A0, 0x30FF, "japanese"), (0x31F0, 0x31FF, "japanese"),
    (0xFF66, 0xFF9F, "japanese"), (0x1B000, 0x1B16F, "japanese"),
    (0xAC00, 0xD7AF, "hangul"), (0x1100, 0x11FF, "hangul"), (0x3130, 0x318F, "hangul"), (0xA960, 0xA97F, "hangul"),
    (0xD7B0, 0xD7FF, "hangul"),
    (0x4E00, 0x9FFF, "han"), (0x3400, 0x4DBF, "han"), (0xF900, 0xFAFF, "han"), (0x20000, 0x323AF, "han"),
    (0x2E80, 0x2FDF, "han"), (0x3005, 0x3007, "han"),
    (0x0400, 0x052F, "cyrillic"), (0x1C80, 0x1C8F, "cyrillic"), (0x2DE0, 0x2DFF, "cyrillic"),
    (0xA640, 0xA69F, "cyrillic"),
    (0x0370, 0x03FF, "greek"), (0x1F00, 0x1FFF, "greek"),
    (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"), (0x08A0, 0x08FF, "arabic"), (0xFB50, 0xFDFF, "arabic"),
    (0xFE70, 0xFEFF, "arabic"),
    (0x0590, 0x05FF, "hebrew"), (0xFB1D, 0xFB4F, "hebrew"),
    (0x0900, 0x097F, "devanagari"), (0xA8E0, 0xA8FF, "devanagari"),
    (0x0E00, 0x0E7F, "thai"),
    (0x0041, 0x005A, "latin"), (0x0061, 0x007A, "latin"), (0x00C0, 0x024F, "latin"), (0x1E00, 0x1EFF, "latin"),
    (0x2C60, 0x2C7F, "latin"), (0xA720, 0xA7FF, "latin"), (0xFF21, 0xFF3A, "latin"), (0xFF41, 0xFF5A, "latin"),
)
_EMOJI_RANGES = ((0x1F000, 0x1FAFF), (0x2600, 0x27BF), (0x2B00, 0x2BFF), (0x1F900, 0x1F9FF))
_EMOJI_JOINERS = {0x200D, 0xFE0F, 0xFE0E, 0x20E3}

_LATEX = re.compile(r"\\[A-Za-z]+|\\[{}\[\]()]|\$\$|\^\{|_\{|\\\\")
_ASCII_LETTER, _ASCII_DIGIT = re.compile(r"[A-Za-z]"), re.compile(r"[0-9]")
_MARKUP = re.compile(r"</?[A-Za-z!?][\w:-]*|/>|&[A-Za-z]+;|&#\d+;|<!--|-->|\]\(|^```")


def script_of(ch: str) -> str | None:
    """The script of one character, or None when it is not a letter of a known script."""
    cp = ord(ch)
    for lo, hi, name in _SCRIPT_RANGES:
        if lo <= cp <= hi:
            return name
    return None


def _is_emoji(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _EMOJI_RANGES)


@functools.cache
def _char_kind(ch: str) -> str | None:
    """"emoji", a script's name, "digit", "letter" (of no known script) or None (punctuation, symbols).

    Cached: a vocabulary has a few thousand distinct characters over ~10^6 occurrences, and the range scan per
    character was most of the cost of a 152K-token table.
    """
    cp = ord(ch)
    if _is_emoji(cp) or cp in _EMOJI_JOINERS:
        return "emoji"
    sc = script_of(ch)
    if sc is not None:
        return sc
    cat = unicodedata.category(ch)
    if cat[0] == "N":
        return "digit"
    if cat[0] in "LM":
        return "letter"
    return None


def classify(text: str, raw: bytes | None, *, is_special: bool = False) -> str:
    """The category of one token.

    Args:
        text: the decoded text of the token alone.
        raw: the token's raw bytes, or None when unknown (special tokens, some SentencePiece pieces).
        is_special: the tokenizer marks it special (control, added special tokens).
    """
    if is_special:
        return "special"
    if raw is not None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "byte"
    if "\ufffd" in text:
        return "byte"
    s = text.strip()
    if not s:
        return "whitespace"
    if _LATEX.search(s):
        return "latex"
    if _MARKUP.search(s):
        return "markup"
    if s.isascii():  # most of a vocabulary: the loop below would find Latin letters, digits or neither
        return "latin" if _ASCII_LETTER.search(s) else "number" if _ASCII_DIGIT.search(s) else "punctuation"
    scripts: dict[str, int] = {}
    emoji = digits = other_letters = 0
    for ch in s:
        kind = _char_kind(ch)
        if kind is None:
            continue
        if kind == "emoji":
            emoji += 1
        elif kind == "digit":
            digits += 1
        elif kind == "letter":
            other_letters += 1
        else:
            scripts[kind] = scripts.get(kind, 0) + 1
    if scripts:
        if "japanese" in scripts:  # any kana: Japanese (Han with kana is Japanese writing)
            return "japanese"
        top = max(scripts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if other_letters > scripts[top]:
            return "other"
        return top
    if other_letters:
        return "other"
    if emoji:
        return "emoji"
    if digits:
        return "number"
    return "punctuation"


# classify_many's per-character kinds: the scripts in descending name order (so that argmax over equal counts
# picks the greater name, as classify's max over (count, name) does), then the other kinds.
_SCRIPTS = tuple(sorted({name for _, _, name in _SCRIPT_RANGES}, reverse=True))
_KINDS = (*_SCRIPTS, "emoji", "digit", "letter", None)
# A token holding none of these characters cannot match _LATEX or _MARKUP: only those few thousand are searched.
_REGEX_TRIGGERS = frozenset("\\$^_{<>&]`-")


def classify_many(texts: Sequence[str], raw: Sequence[bytes | None], is_special: Sequence[bool]) -> np.ndarray:
    """`classify` for a whole vocabulary: int8 indices into CATEGORIES, one per token.

    Why: classify's Python loop costs ~5 µs a token, most of a 152K-token table's CPU. Here every character is
    looked up once per distinct code point and counted per token with numpy; only tokens holding a LaTeX or markup
    character go through the regular expressions. Equal to classify on every token (tests/test_vocab.py).
    """
    import numpy as np

    n = len(texts)
    # raw bytes that are not UTF-8 keep their bad bytes as lone surrogates (U+DC80-U+DCFF), found below
    eff = [t if b is None else b.decode("utf-8", "surrogateescape") for t, b in zip(texts, raw, strict=True)]
    has_raw = np.fromiter((b is not None for b in raw), bool, n)
    lens = np.fromiter(map(len, eff), np.int64, n)
    cps = np.frombuffer("".join(eff).encode("utf-32-le", "surrogatepass"), np.uint32)
    tok = np.repeat(np.arange(n), lens)
    # per-character facts, computed once per distinct code point and looked up by code point
    present = np.flatnonzero(np.bincount(cps)) if len(cps) else np.zeros(0, np.int64)
    chars = [chr(c) for c in present.tolist()]
    k_none = len(_KINDS) - 1

    def lookup(values: list, dtype: type) -> np.ndarray:
        table = np.zeros(int(present[-1]) + 1 if len(present) else 1, dtype)
        table[present] = values
        return table[cps]

    kind = lookup([k_none if c.isspace() else _KINDS.index(_char_kind(c)) for c in chars], np.int64)
    space = lookup([c.isspace() for c in chars], bool)
    fffd = lookup([c == "\ufffd" for c in chars], bool)
    escaped = lookup(["\udc80" <= c <= "\udcff" for c in chars], bool)
    trig = lookup([c in _REGEX_TRIGGERS for c in chars], bool)

    nk = len(_KINDS)
    counts = np.bincount(tok * nk + kind, minlength=n * nk).reshape(n, nk)
    nonspace = np.bincount(tok[~space], minlength=n)
    has_fffd = np.bincount(tok[fffd], minlength=n) > 0
    bad_raw = has_raw & (np.bincount(tok[escaped], minlength=n) > 0)
    latex = np.zeros(n, bool)
    markup = np.zeros(n, bool)
    for i in np.unique(tok[trig]).tolist():
        s = eff[i].strip()
        latex[i] = _LATEX.search(s) is not None
        markup[i] = not latex[i] and _MARKUP.search(s) is not None

    scripts = counts[:, :len(_SCRIPTS)]
    top = scripts.argmax(1)
    top_count = scripts[np.arange(n), top]
    letters, emoji, digits = (counts[:, _KINDS.index(k)] for k in ("letter", "emoji", "digit"))
    code = {c: i for i, c in enumerate(CATEGORIES)}
    script_code = np.array([code[s] for s in _SCRIPTS], np.int8)
    has_script = top_count > 0
    return np.select(
        [np.asarray(is_special, bool), bad_raw | has_fffd, nonspace == 0, latex, markup,
         has_script & (scripts[:, _SCRIPTS.index("japanese")] > 0), has_script & (letters > top_count), has_script,
         letters > 0, emoji > 0, digits > 0],
        [code["special"], code["byte"], code["whitespace"], code["latex"], code["markup"], code["japanese"],
         code["other"], script_code[top], code["other"], code["emoji"], code["number"]],
        code["punctuation"]).astype(np.int8)


def _strings(values: Sequence[str]) -> pa.Array:
    """A string array built from its buffers. Why not `pa.array`: on a list it imports pandas (0.6 s) only to ask
    whether the list is a pandas object, and the vocabulary table is often built in a process of its own."""
    import numpy as np
    import pyarrow as pa

    data = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(data) + 1, np.int32)
    np.cumsum(np.fromiter(map(len, data), np.int64, len(data)), out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def arrow_numbers(values: np.ndarray) -> pa.Array:
    """A numeric or bool array from numpy, without `pa.array`'s pandas import (see `_strings`; the drift table is
    built this way too)."""
    import numpy as np
    import pyarrow as pa

    if values.dtype == bool:
        bits = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def reserved_ids(pieces: Sequence[str], names: dict[str, str] | None = None) -> np.ndarray:
    """Ids whose piece is a reserved or unused name of any family in `names` (default `RESERVED_NAMES`): int64,
    sorted. Full matches only, so a real word containing "unused" is never taken for a reserved row."""
    import numpy as np

    table = RESERVED_NAMES if names is None else names
    if not table:
        return np.zeros(0, np.int64)
    rx = re.compile("|".join(f"(?:{p})" for p in table.values()))
    return np.asarray([i for i, p in enumerate(pieces) if p and rx.fullmatch(p)], dtype=np.int64)


def build_vocab_table(pieces: Sequence[str], texts: Sequence[str], raw: Sequence[bytes | None],
                      is_special: np.ndarray, reachable: np.ndarray, *, token_type: np.ndarray | None = None,
                      tokens: int | None = None, reserved: dict[str, str] | None = None) -> pa.Table:
    """Columns token_id, piece, text, category, is_special, reachable, token_type; one row per id, in id order.

    The category column is dictionary-encoded over CATEGORIES, in that order. What the tokenizer says about a
    token outranks its text: GGUF CONTROL and UNKNOWN tokens are special, UNUSED ones and reserved names
    (`reserved`, default `RESERVED_NAMES`) are "unused", BYTE ones are "byte", and rows past the tokenizer's
    `tokens` entries are "padding"; unused and padding rows are marked special, so that no "non-special" figure
    counts them.

    Args:
        pieces: the raw vocabulary strings (e.g. "Ġthe", "▁the", "<0xE3>").
        texts: the decoded text of each token alone.
        raw: each token's bytes (None where unknown).
        is_special: bool (V,).
        reachable: bool (V,): decoding then re-encoding gives back this single id.
        token_type: int (V,) GGUF token types, when the source is a GGUF (0 where unknown).
        tokens: how many entries the tokenizer has (the rest of the V rows are padding); default V.
    """
    import numpy as np
    import pyarrow as pa

    n = len(pieces)
    if not (len(texts) == len(raw) == len(is_special) == len(reachable) == n):
        raise ValueError("pieces, texts, raw, is_special and reachable must have one entry per token")
    special = np.array(is_special, dtype=bool)
    tt = np.zeros(n, np.int8) if token_type is None else np.asarray(token_type, np.int8)[:n]
    if len(tt) < n:
        tt = np.concatenate([tt, np.zeros(n - len(tt), np.int8)])
    unused = tt == GGUF_UNUSED
    unused[reserved_ids(pieces, reserved)] = True
    padding = np.arange(n) >= (n if tokens is None else tokens)
    unused &= ~padding
    special |= (tt == GGUF_CONTROL) | (tt == GGUF_UNKNOWN) | unused | padding
    cats = classify_many(texts, raw, special)
    code = {c: i for i, c in enumerate(CATEGORIES)}
    cats[(tt == GGUF_BYTE) & ~special] = code["byte"]
    cats[unused] = code["unused"]
    cats[padding] = code["padding"]
    return pa.table({
        "token_id": arrow_numbers(np.arange(n, dtype=np.int64)),
        "piece": _strings(pieces),
        "text": _strings(texts),
        "category": pa.DictionaryArray.from_arrays(arrow_numbers(cats), _strings(CATEGORIES)),
        "is_special": arrow_numbers(special),
        "reachable": arrow_numbers(np.asarray(reachable, dtype=bool) & ~(unused | padding)),
        "token_type": arrow_numbers(tt),
    })


def category_counts(vocab: pa.Table) -> dict[str, int]:
    """Tokens per category, in CATEGORIES order (categories with no token left out)."""
    import pyarrow.compute as pc

    counts = pc.value_counts(vocab.column("category").combine_chunks().cast("string")).to_pylist()
    got = {d["values"]: d["counts"] for d in counts}
    return {c: got[c] for c in CATEGORIES if c in got}


def printable(text: str) -> str:
    """Show a token so that whitespace and control characters are visible: ' ' -> '␣', newline -> '\\n'."""
    out = []
    for ch in text.replace("\\", "\\\\"):
        if ch == " ":
            out.append("␣")
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch not in "\u200d":
            out.append(f"\\u{ord(ch):04x}" if ord(ch) > 0xFF else f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def token_label(text: str, token_id: int | None = None) -> str:
    """The one way a token is shown, on the console, in report.html, report.md and log lines: its text with
    whitespace and control characters made visible (`printable`: ' Jack' -> '␣Jack', the empty text -> '∅'),
    and its id beside it when given: '␣Jack (10472)'."""
    shown = printable(text) if text else "∅"
    return shown if token_id is None else f"{shown} ({int(token_id)})"


def category_label(category: str) -> str:
    """The one way a category is shown: its key (the name in summary.json, the vocabulary table, `check
    --category` and the report), with a language's everyday name beside it: 'cyrillic (Russian)', 'number'."""
    name = LANGUAGE_NAMES.get(category)
    return f"{category} ({name})" if name else category
