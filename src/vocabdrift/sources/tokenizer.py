"""Tokenizers, read-only: a model folder, a tokenizer-only folder, a `tokenizer.json`, a GGUF's embedded
vocabulary, or a hub id. Everything is returned as a `transformers` fast tokenizer so that chat templates,
special tokens and the raw `tokenizers` backend are all at hand.
"""

from __future__ import annotations

import codecs
import itertools
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import VocabdriftError
from .spec import has_tokenizer_files, parse_model_spec

if TYPE_CHECKING:
    import numpy as np
    import tokenizers
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def _quiet_transformers() -> None:
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()


def load_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a model folder, a tokenizer folder, a `tokenizer.json`, a `.gguf` file or a hub id.

    Example:
        >>> tok = load_tokenizer("runs/lab/models/base")
    """
    _quiet_transformers()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ms = parse_model_spec(spec)  # the one parser: `~` expanded, a hub id only when no such path exists
    try:
        if ms.kind == "hub":
            return AutoTokenizer.from_pretrained(str(ms.hub_id), trust_remote_code=trust_remote_code)
        src = ms.tokenizer_source()
        p = Path(src)
        if ms.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        if p.is_file() and p.name.endswith(".json"):
            return PreTrainedTokenizerFast(tokenizer_file=str(p))
        if p.is_dir():
            if has_tokenizer_files(p):
                return AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return AutoTokenizer.from_pretrained(str(p), gguf_file=ggufs[0].name)
            raise VocabdriftError(f"{p}: no tokenizer here (no tokenizer.json, tokenizer_config.json or .gguf); "
                                  "pass the model folder or its tokenizer.json")
        raise VocabdriftError(f"{p}: not a tokenizer; pass a model folder, a tokenizer.json or a .gguf file")
    except VocabdriftError:
        raise
    except (OSError, ValueError, json.JSONDecodeError, KeyError, TypeError, AttributeError, IndexError) as e:
        # (TypeError and the like: transformers reading a tokenizer file of the wrong shape, e.g. a JSON list)
        raise VocabdriftError(f"{spec}: could not load a tokenizer ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]}); "
                              "check the path, or that the hub is reachable for a hub id") from e


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode map (`Ġ` -> 0x20, `Ċ` -> 0x0A)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _piece_style(backend: tokenizers.Tokenizer) -> str:
    """'bytelevel', 'sentencepiece' or 'plain', read from the decoder's serialised form."""
    dec = backend.decoder
    state = json.dumps(json.loads(dec.__getstate__())) if dec is not None else ""
    if "ByteLevel" in state:
        return "bytelevel"
    if "ByteFallback" in state or "Metaspace" in state or "\u2581" in state:
        return "sentencepiece"
    return "plain"


@lru_cache(maxsize=1)
def _byte_table() -> dict[int, str]:
    """`_byte_decoder` as a `str.translate` table to Latin-1: each of GPT-2's 256 stand-in characters becomes the
    character of its byte, and the 68 Latin-1 characters that are not stand-ins become U+FFFE, which Latin-1
    cannot encode (so a piece outside the alphabet fails as it should). One C call per piece instead of a Python
    loop per character: a third of a 152K vocabulary's reading time."""
    table: dict[int, str] = {cp: "\ufffe" for cp in range(256)}
    table.update({ord(c): chr(b) for c, b in _byte_decoder().items()})
    return table


def piece_bytes(piece: str, style: str) -> bytes | None:
    """The raw bytes a vocabulary piece stands for, or None when the piece is not in that style's alphabet."""
    if style == "bytelevel":
        try:
            return piece.translate(_byte_table()).encode("latin-1")
        except UnicodeEncodeError:
            return None
    if style == "sentencepiece":
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                return None
        return piece.replace("\u2581", " ").encode("utf-8")
    return None


def pieces_bytes(pieces: list[str], style: str) -> list[bytes | None]:
    """`piece_bytes` of many pieces. A byte-level vocabulary is translated in one call: each piece's characters
    stand for one byte each, so the pieces' bytes are slices of the whole's."""
    if style == "bytelevel":
        try:
            whole = "".join(pieces).translate(_byte_table()).encode("latin-1")
        except UnicodeEncodeError:  # a piece outside the alphabet: piece by piece
            return [piece_bytes(p, style) for p in pieces]
        ends = list(itertools.accumulate(map(len, pieces)))
        return [whole[e - len(p):e] for p, e in zip(pieces, ends, strict=True)]
    return [piece_bytes(p, style) for p in pieces]


def _partial_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def _hex_bytes(e: UnicodeError) -> tuple[str, int]:
    """A codec error handler: bytes that are not UTF-8 on their own become `<0xE5>` (see `show_bytes`)."""
    if not isinstance(e, UnicodeDecodeError):
        raise e
    return "".join(f"<0x{x:02X}>" for x in e.object[e.start:e.end]), e.end


codecs.register_error("vocabdrift.hex", _hex_bytes)


def show_bytes(b: bytes) -> str:
    """Decode, writing bytes that are not UTF-8 on their own as `<0xE5>` (a partial character stays visible)."""
    return b.decode("utf-8", "vocabdrift.hex")


@dataclass(frozen=True)
class Vocabulary:
    """Everything the vocabulary table needs, read from a tokenizer. Lists are indexed by token id."""

    pieces: list[str]
    texts: list[str]
    raw: list[bytes | None]
    is_special: np.ndarray  # bool (V,)
    reachable: np.ndarray  # bool (V,)
    tokens: int | None = None  # the tokenizer's entries; rows past them are padding
    token_type: np.ndarray | None = None  # GGUF token types (V,) when the vocabulary came from a GGUF


def gguf_of(spec: str | os.PathLike) -> Path | None:
    """The GGUF file a tokenizer would be read from (`load_tokenizer`'s choice), or None: a `.gguf` file, or a folder
    holding one and no tokenizer files."""
    try:
        ms = parse_model_spec(spec)
    except VocabdriftError:
        return None
    if not ms.local or ms.path is None:
        return None
    if ms.kind == "gguf":
        return ms.path
    p = Path(ms.tokenizer_source())
    if p.is_dir() and not has_tokenizer_files(p):
        ggufs = sorted(p.glob("*.gguf"))
        return ggufs[0] if ggufs else None
    return None


def gguf_token_types(path: str | os.PathLike) -> np.ndarray | None:
    """`tokenizer.ggml.token_type` of a GGUF file (int32 per token id: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4,
    UNUSED 5, BYTE 6), or None when the file has none.

    Why: `transformers` reads a GGUF's tokens but not their types, and a Qwen-family GGUF's `[PAD151665]` rows
    (UNUSED) would otherwise be classified by their text as Latin words."""
    import gguf
    import numpy as np

    try:
        field = gguf.GGUFReader(str(path), "r").fields.get("tokenizer.ggml.token_type")
    except (ValueError, OSError, IndexError) as e:
        raise VocabdriftError(f"{path}: not a readable GGUF file ({e}); re-download or re-convert it") from e
    if field is None or not field.data:
        return None
    return np.asarray([int(field.parts[i][0]) for i in field.data], dtype=np.int32)


def load_vocabulary_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False
                               ) -> tokenizers.Tokenizer | PreTrainedTokenizerBase:
    """The quickest tokenizer that can list a vocabulary: a `tokenizer.json` read by `tokenizers` directly (about
    five times faster than `transformers` on a 150K vocabulary), else `load_tokenizer`."""
    from tokenizers import Tokenizer

    ms = parse_model_spec(spec)
    p = Path(ms.tokenizer_source())
    f = p / "tokenizer.json" if p.is_dir() else p
    if ms.local and f.is_file() and f.name.endswith(".json"):
        try:
            return Tokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise VocabdriftError(f"{f}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from e
    return load_tokenizer(spec, trust_remote_code=trust_remote_code)


def tokenizer_json(spec: str | os.PathLike) -> Path | None:
    """The local tokenizer.json a model or tokenizer spec stands for, or None (a GGUF, a hub id, none there)."""
    try:
        ms = parse_model_spec(spec)
    except VocabdriftError:
        return None
    p = Path(ms.tokenizer_source())
    f = p / "tokenizer.json" if p.is_dir() else p
    return f if ms.local and f.is_file() and f.name == "tokenizer.json" else None


def pieces_by_id(f: Path) -> dict[int, str] | None:
    """id -> piece of a tokenizer.json (its vocabulary and its added tokens), read by `tokenizers`; None when it
    cannot be read (the readers that need it say why)."""
    from tokenizers import Tokenizer

    try:
        return {i: t for t, i in Tokenizer.from_file(str(f)).get_vocab(with_added_tokens=True).items()}
    except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file; its readers report it
        return None


def read_vocabulary(tok: PreTrainedTokenizerBase | tokenizers.Tokenizer, *, size: int | None = None) -> Vocabulary:
    """Read every token's piece, bytes, text, special flag and reachability.

    `tok` is a `transformers` tokenizer or a raw `tokenizers.Tokenizer` (special tokens are then the added tokens
    marked special). `size` pads to a model's row count: ids the tokenizer does not know (padding rows in lm_head)
    get an empty piece and are marked special and unreachable.
    """
    import numpy as np

    backend: tokenizers.Tokenizer = getattr(tok, "backend_tokenizer", tok)
    n_tok = backend.get_vocab_size(with_added_tokens=True)
    n = max(n_tok, size or 0)
    style = _piece_style(backend)
    added = backend.get_added_tokens_decoder()  # id -> AddedToken
    special_ids = {i for i, t in added.items() if t.special} | set(getattr(tok, "all_special_ids", []) or [])

    pieces = [backend.id_to_token(i) if i < n_tok else None for i in range(n)]
    special_ids |= {i for i, piece in enumerate(pieces) if piece is None}
    pieces = [piece or "" for piece in pieces]
    raw: list[bytes | None] = [None] * n
    for i in added:
        if i not in special_ids:
            raw[i] = pieces[i].encode("utf-8")
    plain = [i for i in range(n) if i not in special_ids and i not in added]
    for i, b in zip(plain, pieces_bytes([pieces[i] for i in plain], style), strict=True):
        raw[i] = b
    # a piece with known bytes is shown from them; the tokenizer decodes only the others (special and added
    # tokens, unknown piece styles): decoding all 152K ids of a Qwen vocabulary cost 0.5 s
    texts = [show_bytes(b) if b is not None else "" for b in raw]
    rest = [i for i in range(n_tok) if raw[i] is None]
    for i, d in zip(rest, backend.decode_batch([[i] for i in rest], skip_special_tokens=False), strict=True):
        texts[i] = d
    is_special = np.zeros(n, dtype=bool)
    is_special[sorted(special_ids)] = True

    # Reachable: the token's text, encoded alone, gives back exactly this id.
    reachable = np.zeros(n, dtype=bool)
    # (only a text showing "<0x" can come from bytes that are not UTF-8 alone)
    idx = [i for i in range(n_tok)
           if texts[i] and not ("<0x" in texts[i] and raw[i] is not None and _partial_utf8(raw[i]))]
    encs = backend.encode_batch([texts[i] for i in idx], add_special_tokens=False)
    retry = []
    for i, e in zip(idx, encs, strict=True):
        if len(e) == 1 and e.ids[0] == i:
            reachable[i] = True
        elif texts[i].startswith(" ") and style == "sentencepiece":
            retry.append(i)  # SentencePiece prepends "▁" itself: " the" is reached by encoding "the"
    if retry:
        for i, e in zip(retry, backend.encode_batch([texts[i][1:] for i in retry], add_special_tokens=False),
                        strict=True):
            reachable[i] = e.ids == [i]
    return Vocabulary(pieces, texts, raw, is_special, reachable, tokens=n_tok)


def tokenizer_from_tiktoken(path: str | os.PathLike, *, pattern: str,
                            special_tokens: dict[str, int] | None = None) -> tokenizers.Tokenizer:
    """Build a byte-level BPE `tokenizers.Tokenizer` from a tiktoken rank file (base64 token, rank per line).

    tiktoken vocabularies (Qwen, OpenAI) ship ranks, not merges; the merges are recovered from the ranks the
    way `transformers` does it. Takes about a minute for 150K ranks; cache the result with `.save()`.
    """
    from transformers.convert_slow_tokenizer import TikTokenConverter

    conv = TikTokenConverter(vocab_file=str(path), pattern=pattern,
                             extra_special_tokens=list((special_tokens or {}).keys()))
    tok = conv.converted()
    return tok
