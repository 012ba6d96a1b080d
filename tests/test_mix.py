"""mix: a deterministic, seeded, streaming shuffle of SFT records with a share of synthetic ones."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vocabdrift.api import coverage as api
from vocabdrift.api.coverage import mix
from vocabdrift.errors import VocabdriftError


def _msgs(tag: str, i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"{tag} question {i}"},
                         {"role": "assistant", "content": f"{tag} answer {i}"}]}


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Path]:
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(_msgs("sft", i)) + "\n" for i in range(190)))
    more = tmp_path / "more.parquet"  # a second SFT input in another format
    pq.write_table(pa.Table.from_pylist([_msgs("pq", i) for i in range(10)]), more)
    syn = tmp_path / "syn.jsonl"
    syn.write_text("".join(json.dumps(_msgs("syn", i)) + "\n" for i in range(7)))
    return sft, more, syn


def _lines(p: Path) -> list[str]:
    return p.read_text().splitlines()


def test_ratio_count_and_determinism(files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sft, more, syn = files
    r = mix([sft, more], syn, out=tmp_path / "m.jsonl", ratio=0.05, seed=1)
    lines = _lines(tmp_path / "m.jsonl")
    want_syn = round(0.05 * 200 / 0.95)  # synthetic share of the result = ratio
    assert (r.sft, r.synth) == (200, want_syn) and len(lines) == 200 + want_syn
    recs = [json.loads(x) for x in lines]
    tags = Counter(m["messages"][0]["content"].split()[0] for m in recs)
    assert tags == {"sft": 190, "pq": 10, "syn": want_syn}
    # every SFT record exactly once
    assert sorted(x for x in lines if '"sft ' in x or '"pq ' in x) == sorted(
        [json.dumps(_msgs("sft", i)) for i in range(190)] + [json.dumps(_msgs("pq", i)) for i in range(10)])
    # shuffled, not appended: synthetic records are spread through the file
    pos = [i for i, x in enumerate(lines) if '"syn ' in x]
    assert pos[-1] - pos[0] > len(lines) // 3
    # same seed, same bytes; other seed, other order; several buckets give the same multiset
    mix([sft, more], syn, out=tmp_path / "m2.jsonl", ratio=0.05, seed=1)
    assert (tmp_path / "m2.jsonl").read_bytes() == (tmp_path / "m.jsonl").read_bytes()
    mix([sft, more], syn, out=tmp_path / "m3.jsonl", ratio=0.05, seed=2)
    assert _lines(tmp_path / "m3.jsonl") != lines
    monkeypatch.setattr(api, "_BUCKET_BYTES", 2048)
    mix([sft, more], syn, out=tmp_path / "m4.jsonl", ratio=0.05, seed=1)
    assert sorted(_lines(tmp_path / "m4.jsonl")) == sorted(lines)

    # --count above the synthetic set's size repeats it whole first
    r = mix(sft, syn, out=tmp_path / "c.jsonl", count=16, seed=0)
    syn_lines = Counter(x for x in _lines(tmp_path / "c.jsonl") if '"syn ' in x)
    assert r.synth == 16 and sorted(syn_lines.values()) == [2] * 5 + [3] * 2


def test_malformed_sft_and_bad_arguments(files, tmp_path: Path) -> None:
    sft, _, syn = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(sft.read_text() + "{broken\n")
    r = mix(bad, syn, out=tmp_path / "m.jsonl", count=0)
    assert r.n_malformed == 1 and r.malformed[0].source == f"{bad}:191" and r.sft == 190
    assert len(_lines(tmp_path / "m.jsonl")) == 190
    with pytest.raises(VocabdriftError, match=f"{bad}:191"):
        mix(bad, syn, out=tmp_path / "s.jsonl", count=1, strict=True)
    with pytest.raises(VocabdriftError, match="at most one of --ratio"):
        mix(sft, syn, out=tmp_path / "x.jsonl", ratio=0.1, count=3)
    # by default the synthetic set is added whole, once: the recommendation's coverage set as `synth --run` wrote it
    r = mix(sft, syn, out=tmp_path / "whole.jsonl")
    n_syn = len(_lines(syn))
    assert r.synth == n_syn and Counter(x for x in _lines(tmp_path / "whole.jsonl") if '"syn ' in x) == \
        Counter(_lines(syn))
    with pytest.raises(VocabdriftError, match="between 0 and 1"):
        mix(sft, syn, out=tmp_path / "x.jsonl", ratio=1.5)
    with pytest.raises(VocabdriftError, match="also an input"):
        mix(sft, syn, out=sft, ratio=0.1)
    alp = tmp_path / "alpaca.jsonl"
    alp.write_text(json.dumps({"instruction": "Repeat", "input": "", "output": "x"}) + "\n")
    with pytest.raises(VocabdriftError, match="--format alpaca"):
        mix(alp, syn, out=tmp_path / "x.jsonl", ratio=0.1)
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "s.jsonl").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_mix_cli(files, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vocabdrift.cli import app

    sft, more, syn = files
    out = tmp_path / "m.jsonl"
    res = CliRunner().invoke(app, ["mix", str(sft), str(more), str(syn), "-o", str(out), "--ratio", "0.05"])
    assert res.exit_code == 0, res.output
    assert "200 SFT + 11 synthetic records" in res.output and len(_lines(out)) == 211
