"""synth: every reachable, non-special token becomes a generation target at least --min-per-token times, verified
by re-tokenizing the output file; --run on a coverage run fills exactly the floor it found."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factory import TEXTS, train_bpe
from test_coverage import EXTRA, make_records, write_dataset

from vocabdrift.api.coverage import coverage, synth
from vocabdrift.errors import VocabdriftError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bpe")
    train_bpe(d, vocab_size=600, texts=[*TEXTS, *EXTRA])
    return d


def answers(path: Path) -> list[str]:
    """The assistant text of every record, whatever the format."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if "messages" in r:
            out += [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        elif "conversations" in r:
            out += [m["value"] for m in r["conversations"] if m["from"] == "gpt"]
        else:
            out.append(r.get("output", r.get("completion")))
    return out


def retokenized_counts(tokenizer_json: Path, texts: list[str]) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = [i for e in tok.encode_batch(texts, add_special_tokens=False) for i in e.ids]
    return np.bincount(np.asarray(ids, dtype=np.int64), minlength=tok.get_vocab_size(with_added_tokens=True))


@pytest.mark.slow
def test_synth_covers_every_reachable_qwen_token(qwen_tokenizer_json: Path, tmp_path: Path) -> None:
    from vocabdrift.api.diff import vocab_table

    r = synth(qwen_tokenizer_json, out=tmp_path / "cov.jsonl", min_per_token=2)
    vocab = vocab_table(qwen_tokenizer_json)
    want = vocab.column("reachable").to_numpy() & ~vocab.column("is_special").to_numpy()
    assert want.sum() > 145_000  # Qwen2: 151,643 ranks, most reachable alone
    counts = retokenized_counts(qwen_tokenizer_json, answers(tmp_path / "cov.jsonl"))[:len(want)]
    short = np.nonzero(want & (counts < 2))[0]
    assert short.size == 0, f"{short.size} reachable tokens placed < 2 times, e.g. {short[:10]}"
    assert r.stats["covered"] == int(want.sum()) and r.stats["skipped"] == []
    assert r.stats["unreachable"]["count"] == int((~vocab.column("reachable").to_numpy()
                                                   & ~vocab.column("is_special").to_numpy()).sum())
    # several tokens per sample keeps the set small
    assert r.stats["samples"] < want.sum() / 4
    stats = json.loads((tmp_path / "cov.stats.json").read_text())
    assert stats["covered"] == r.stats["covered"] and set(stats["samples_by_language"]) >= {"en", "zh", "ja", "ko"}


def test_synth_small_vocab_formats_and_loaders(tok_dir: Path, tmp_path: Path) -> None:
    from datasets import load_dataset
    from trl.data_utils import is_conversational

    from vocabdrift.api.diff import vocab_table

    vocab = vocab_table(tok_dir)
    want = vocab.column("reachable").to_numpy() & ~vocab.column("is_special").to_numpy()
    for fmt in ("messages", "sharegpt", "alpaca", "prompt-completion"):
        out = tmp_path / f"{fmt}.jsonl"
        r = synth(tok_dir, out=out, min_per_token=3, tokens_per_sample=4, format=fmt)
        counts = retokenized_counts(tok_dir / "tokenizer.json", answers(out))[:len(want)]
        assert (counts[want] >= 3).all() and r.stats["skipped"] == []
        ds = load_dataset("json", data_files=str(out), split="train")
        assert len(ds) == r.stats["samples"]
        if fmt == "messages":
            assert is_conversational(ds[0]) and [m["role"] for m in ds[0]["messages"]] == ["user", "assistant"]
        if fmt == "sharegpt":
            assert ds[0]["conversations"][1]["from"] == "gpt"


def test_synth_deterministic_and_accepts_tokenizer_objects(tok_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    a = synth(tok_dir, out=tmp_path / "a.jsonl", seed=3)
    b = synth(Tokenizer.from_file(str(tok_dir / "tokenizer.json")), out=tmp_path / "b.jsonl", seed=3)
    c = synth(AutoTokenizer.from_pretrained(str(tok_dir)), out=tmp_path / "c.jsonl", seed=3)
    d = synth(tok_dir, out=tmp_path / "d.jsonl", seed=4)
    text = a.path.read_bytes()
    assert text == b.path.read_bytes() == c.path.read_bytes()
    assert text != d.path.read_bytes()
    with pytest.raises(VocabdriftError, match="--format"):
        synth(tok_dir, out=tmp_path / "e.jsonl", format="csv")
    with pytest.raises(VocabdriftError, match="is a folder"):
        synth(tok_dir, out=tmp_path)
    with pytest.raises(VocabdriftError, match="coverage.parquet: not found"):
        synth(tok_dir, out=tmp_path / "f.jsonl", run=tmp_path)
    assert not (tmp_path / "e.jsonl").exists() and not (tmp_path / "f.jsonl").exists()


def test_only_below_floor_fills_exactly_the_floor(tok_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", make_records(n=40))
    run = tmp_path / "run"
    before = coverage(data, tokenizer=tok_dir, out=run, floor=4)
    r = synth(tok_dir, out=tmp_path / "fill.jsonl", run=run)
    below = before.below_floor
    assert r.stats["targets"] == below.num_rows and r.stats["floor"] == 4 and r.stats["skipped"] == []
    # each below-floor token is placed (floor - count) times; tokens already at the floor are not targeted
    placed = retokenized_counts(tok_dir / "tokenizer.json", answers(tmp_path / "fill.jsonl"))
    for tid, cnt in zip(below.column("token_id").to_pylist(), below.column("count").to_pylist(), strict=True):
        assert placed[tid] >= 4 - cnt
    assert r.stats["occurrences"]["total"] >= sum(4 - c for c in below.column("count").to_pylist())
    # and the SFT data plus the fill reaches the floor for every reachable token
    after = coverage([data, tmp_path / "fill.jsonl"], tokenizer=tok_dir, floor=4)
    assert after.below_floor.num_rows == 0, after.below_floor.slice(0, 10).to_pylist()


def test_synth_cli(tok_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vocabdrift.cli import app

    out = tmp_path / "cov.jsonl"
    res = CliRunner().invoke(app, ["synth", str(tok_dir), "-o", str(out), "--min-per-token", "2",
                                   "--format", "sharegpt"])
    assert res.exit_code == 0, res.output
    stats = json.loads((tmp_path / "cov.stats.json").read_text())
    assert f"covered {stats['covered']:,} of {stats['targets']:,} tokens" in res.output
    assert json.loads(out.read_text().splitlines()[0])["conversations"][0]["from"] == "human"


def test_unplaceable_token_is_reported_with_reason(tmp_path: Path) -> None:
    """A BPE (no pre-tokenizer) where "x" merges with every separator's edge characters and with itself:
    "x" alone is one token, but no repeated layout keeps it whole, so synth must skip it and say why."""
    from tokenizers import Tokenizer, models

    from vocabdrift.analyses.synth import SEPARATORS

    chars = sorted({c for sep in SEPARATORS for c in sep} | {"x", "y"})
    merges = [("x", "x")] + [p for c in chars if c != "x" for p in (("x", c), (c, "x"))]
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    assert tok.encode("x").ids == [vocab["x"]] and tok.encode("y").ids == [vocab["y"]]

    r = synth(tok, out=tmp_path / "s.jsonl", min_per_token=2)
    skipped = {s["token_id"]: s for s in r.stats["skipped"]}
    assert vocab["x"] in skipped and "no layout of" in skipped[vocab["x"]]["reason"]
    assert vocab["y"] not in skipped  # "y" has no merges with separators: placed
    counts = retokenized_counts_obj(tok, answers(tmp_path / "s.jsonl"))
    assert counts[vocab["y"]] >= 2 and r.stats["covered"] == r.stats["targets"] - len(skipped)


def retokenized_counts_obj(tok, texts: list[str]) -> np.ndarray:
    ids = [i for e in tok.encode_batch(texts, add_special_tokens=False) for i in e.ids]
    return np.bincount(np.asarray(ids, dtype=np.int64), minlength=tok.get_vocab_size())
