"""The vocabulary table: one row per token id, with its text and category.

Pure: it takes the pieces, their raw bytes and flags (read by `sources.tokenizer`) and returns a pyarrow table.
Categories follow DESIGN.md. A token is classified by the script of its letters after decoding; any kana makes it
Japanese (kana is what tells Japanese from Chinese), Han alone is Chinese.
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
    "special", "byte", "whitespace", "number", "punctuation", "latex", "markup", "emoji",
    "latin", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai", "hangul", "japanese", "han", "other",
)
# The languages reported on their own, in the order of DESIGN.md's reference table.
LANGUAGES: tuple[str, ...] = ("japanese", "hangul", "arabic", "cyrillic", "han", "latin")
LANGUAGE_NAMES = {"japanese": "Japanese", "hangul": "Korean", "arabic": "Arabic", "cyrillic": "Russian",
                  "han": "Chinese", "latin": "English/Latin"}

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


def build_vocab_table(pieces: Sequence[str], texts: Sequence[str], raw: Sequence[bytes | None],
                      is_special: np.ndarray, reachable: np.ndarray) -> pa.Table:
    """Columns token_id, piece, text, category, is_special, reachable; one row per id, in id order.

    Args:
        pieces: the raw vocabulary strings (e.g. "Ġthe", "▁the", "<0xE3>").
        texts: the decoded text of each token alone.
        raw: each token's bytes (None where unknown).
        is_special: bool (V,).
        reachable: bool (V,): decoding then re-encoding gives back this single id.
    """
    import numpy as np
    import pyarrow as pa

    n = len(pieces)
    if not (len(texts) == len(raw) == len(is_special) == len(reachable) == n):
        raise ValueError("pieces, texts, raw, is_special and reachable must have one entry per token")
    cats = [classify(t, b, is_special=bool(s)) for t, b, s in zip(texts, raw, is_special, strict=True)]
    return pa.table({
        "token_id": pa.array(np.arange(n, dtype=np.int64)),
        "piece": pa.array(list(pieces), pa.string()),
        "text": pa.array(list(texts), pa.string()),
        "category": pa.array(cats, pa.string()).dictionary_encode(),
        "is_special": pa.array(np.asarray(is_special, dtype=bool)),
        "reachable": pa.array(np.asarray(reachable, dtype=bool)),
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
