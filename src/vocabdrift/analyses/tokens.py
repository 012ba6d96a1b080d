"""THE token-spec resolver: one rule for "text, piece or id" in every command that takes tokens.

`neighbors TOKEN`, `diff --neighbors-of`, `probe --token`, `undertrained --token` and `report --token` all resolve
through `resolve_tokens`, against the same index (the vocabulary table's texts and raw pieces, plus the tokenizer's
encoder where one is at hand), so the same spec names the same token everywhere. The rule is `TOKEN_RULE`, shown in
each of those commands' --help.

Pure: no file or model is read here; callers build the index first, so a bad spec fails before any model loads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import VocabdriftError

if TYPE_CHECKING:
    import pyarrow as pa

TokenSpec = int | str

TOKEN_RULE = ("A token is named by its id (all digits: 12345), else by its exact decoded text (' the', 嘉祺), else by "
              "its raw vocabulary piece (Ġthe), else by a text that encodes to exactly one token. Prefix text: or "
              "piece: to name a token whose text is all digits (text:42) or to force one reading. A token as "
              "vocabdrift prints it (␣Jack, or ␣Jack (10472)) names it too.")

_ID = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class TokenIndex:
    """What a token spec is resolved against.

    Attributes:
        size: the number of ids (0..size-1 are valid).
        texts, pieces: decoded text and raw piece -> the first id that has it.
        encode: text -> ids without special tokens (the tokenizer's), or None where no tokenizer is at hand (the
            report reads only the run folder).
        where: how errors name the vocabulary ("the run's vocabulary").
    """

    size: int
    texts: dict[str, int]
    pieces: dict[str, int]
    encode: Callable[[str], list[int]] | None = None
    where: str = "the vocabulary"
    piece_of: Callable[[int], str] = field(default=str)
    text_of: Callable[[int], str] = field(default=str)

    @classmethod
    def of(cls, texts: Sequence[Any], pieces: Sequence[Any], *, encode: Callable[[str], list[int]] | None = None,
           size: int | None = None, where: str = "the vocabulary") -> TokenIndex:
        """From per-id texts and pieces (lists or arrays indexed by token id)."""
        by_text: dict[str, int] = {}
        by_piece: dict[str, int] = {}
        for i, t in enumerate(texts):
            if t:
                by_text.setdefault(str(t), i)
        for i, p in enumerate(pieces):
            if p:
                by_piece.setdefault(str(p), i)
        plist = [str(p) if p else "" for p in pieces]
        tlist = [str(t) if t else "" for t in texts]
        return cls(len(texts) if size is None else size, by_text, by_piece, encode, where,
                   lambda i: plist[i] if 0 <= i < len(plist) else f"#{i}",
                   lambda i: tlist[i] if 0 <= i < len(tlist) else "")

    @classmethod
    def from_table(cls, vocab: pa.Table, *, encode: Callable[[str], list[int]] | None = None,
                   where: str = "the vocabulary") -> TokenIndex:
        """From a vocabulary table (vocab.parquet: token_id order, text, piece)."""
        texts = vocab.column("text").to_pylist()
        pieces = vocab.column("piece").to_pylist() if "piece" in vocab.column_names else texts
        return cls.of(texts, pieces, encode=encode, where=where)


def encoder_of(tok: Any) -> Callable[[str], list[int]]:
    """The encode function of a `transformers` tokenizer or a raw `tokenizers.Tokenizer` (no special tokens)."""
    backend = getattr(tok, "backend_tokenizer", tok)
    return lambda s: list(backend.encode(s, add_special_tokens=False).ids)


def is_id(spec: TokenSpec) -> bool:
    """Whether `spec` names a token by its id under `TOKEN_RULE` (then no texts or pieces are needed)."""
    if isinstance(spec, bool):
        return False
    if isinstance(spec, int):
        return True
    return isinstance(spec, str) and (bool(_ID.fullmatch(spec)) or (spec.startswith("id:")
                                                                   and bool(_ID.fullmatch(spec[3:]))))


def resolve_token(spec: TokenSpec, index: TokenIndex) -> int:
    """The id `spec` names under `TOKEN_RULE`; a `VocabdriftError` naming the spec and the fix otherwise."""
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise VocabdriftError(f"{spec!r}: a token is an id, a text or a piece, not a {type(spec).__name__}")
    s = str(spec)
    if is_id(spec):
        i = int(s.removeprefix("id:"))
        if not 0 <= i < index.size:
            raise VocabdriftError(f"token id {i} is out of range: outside the vocabulary (0..{index.size - 1}) of "
                                  f"{index.where}")
        return i
    forced = None
    for prefix in ("text:", "piece:"):
        if s.startswith(prefix) and len(s) > len(prefix):
            forced, s = prefix[:-1], s[len(prefix):]
            break
    if forced != "piece" and s in index.texts:
        return index.texts[s]
    if forced != "text" and s in index.pieces:
        return index.pieces[s]
    if forced is None:
        shown = _as_printed(s, index)
        if shown is not None:
            return shown
    if forced != "piece" and index.encode is not None:
        ids = index.encode(s)
        if len(ids) == 1:
            return int(ids[0])
        raise VocabdriftError(f"{s!r} is {len(ids)} tokens {[index.piece_of(int(i)) for i in ids[:8]]}, not one; "
                              "name a single token (its text, raw piece or id)")
    raise VocabdriftError(f"{s!r} is not a token of {index.where}; give its exact text, raw piece or id")


_LABEL = re.compile(r"(.*) \(([0-9]+)\)")


def _as_printed(s: str, index: TokenIndex) -> int | None:
    """The id of a token written as vocabdrift prints it (`vocab.token_label`): '␣Jack (10472)' when the id's
    text prints so, or '␣Jack' when one text prints so: what a user copies from a table works as input."""
    from .vocab import printable, token_label

    m = _LABEL.fullmatch(s)
    if m and int(m[2]) < index.size and token_label(index.text_of(int(m[2]))) == m[1]:
        return int(m[2])
    if not any(c in s for c in "␣\\∅"):  # nothing printed differently from its text
        return None
    if s == "∅":
        return index.texts.get("")
    for text, i in index.texts.items():
        if printable(text) == s:
            return i
    return None


def resolve_tokens(specs: Sequence[TokenSpec], index: TokenIndex) -> list[int]:
    """`resolve_token` of each spec, duplicates dropped, in the order given."""
    return list(dict.fromkeys(resolve_token(s, index) for s in specs))
