"""coverage: counts as a generation target equal a direct count with the tokenizer, on a generated data set with
planted rare tokens (a BPE trained here splits the name 马嘉祺 as ['马', '嘉祺']); malformed lines are reported
with file:line; the join with drift gives the Spearman correlation."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factory import SPECIALS, TEXTS, train_bpe

from vocabdrift.api.coverage import coverage, prune_suggest
from vocabdrift.errors import VocabdriftError

WORDS = ("the model says every token it has read during training and some it has not seen since the corpus "
         "was small quick brown fox jumps over lazy dog weather search numbers").split()
EXTRA = ["王嘉祺 和 李嘉祺 都叫嘉祺。嘉祺很好。", "马上 马路 骑马 马车 白马 马上就到。"]
CHATML_GEN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
              "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
              "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML = CHATML_GEN.replace("{% generation %}", "").replace("{% endgeneration %}", "")
PLANTED = 3  # assistant turns that carry 马嘉祺 (split as 马 + 嘉祺 at the start of a turn)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bpe")
    train_bpe(d, vocab_size=600, texts=[*TEXTS, *EXTRA])
    return d


def _with_template(src: Path, dst: Path, template: str) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.update(chat_template=template, eos_token="<|im_end|>")
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "."


def make_records(seed: int = 0, n: int = 40) -> list[dict]:
    """Conversations of four shapes; 马嘉祺 in exactly PLANTED assistant turns and in some user turns."""
    rng = random.Random(seed)
    recs: list[dict] = []
    for i in range(n):
        answer = ("马嘉祺 sings. " if i in (0, 1, 3) else "") + _sentence(rng)  # kinds 0, 1 and 3
        question = ("马嘉祺是谁？" if i % 5 == 0 else "") + _sentence(rng)
        kind = i % 4
        if kind == 0:
            recs.append({"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": question}, {"role": "assistant", "content": answer},
                                      {"role": "user", "content": _sentence(rng)},
                                      {"role": "assistant", "content": _sentence(rng)}]})
        elif kind == 1:
            recs.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
        elif kind == 2:
            recs.append({"prompt": question, "completion": " " + answer})
        else:
            recs.append({"text": answer})
    return recs


def write_dataset(root: Path, recs: list[dict]) -> Path:
    """Spread the records over JSONL, a JSON array, Parquet and a saved HF data set in one folder."""
    from datasets import Dataset

    root.mkdir(parents=True, exist_ok=True)
    by = {k: [r for r in recs if k in r] for k in ("messages", "conversations", "prompt", "text")}
    with open(root / "a.jsonl", "w") as f:
        for r in by["messages"]:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (root / "b.json").write_text(json.dumps(by["conversations"], ensure_ascii=False))
    (root / "sub").mkdir()
    pq.write_table(pa.Table.from_pylist(by["prompt"]), root / "sub" / "c.parquet")
    Dataset.from_list(by["text"]).save_to_disk(str(root / "saved"))
    return root


def direct_counts(tokenizer_json: Path, recs: list[dict], eos: str) -> tuple[Counter, Counter]:
    """Count targets by encoding each assistant turn / completion / text on its own, plus EOS: the plain layout."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    eos_id = tok.token_to_id(eos)
    count: Counter = Counter()
    samples: Counter = Counter()
    for r in recs:
        if "messages" in r:
            turns = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        elif "conversations" in r:
            turns = [m["value"] for m in r["conversations"] if m["from"] == "gpt"]
        else:
            turns = [r.get("completion", r.get("text"))]
        ids = [i for t in turns for i in [*tok.encode(t, add_special_tokens=False).ids, eos_id]]
        count.update(ids)
        samples.update(set(ids))
    return count, samples


def test_counts_equal_direct_count_plain_layout(tok_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    recs = make_records()
    data = write_dataset(tmp_path / "data", recs)
    r = coverage(data, tokenizer=tok_dir, out=tmp_path / "run", floor=5)

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert [tok.decode([i]) for i in tok.encode("马嘉祺").ids] == ["马", "嘉祺"]
    jiaqi = tok.encode("嘉祺").ids
    assert len(jiaqi) == 1 and tok.decode(jiaqi) == "嘉祺"

    want_c, want_s = direct_counts(tok_dir / "tokenizer.json", recs, SPECIALS[0])
    got = pq.read_table(tmp_path / "run" / "coverage.parquet")
    c, s = got.column("count").to_numpy(), got.column("samples").to_numpy()
    assert dict(want_c) == {i: int(c[i]) for i in np.nonzero(c)[0]}
    assert dict(want_s) == {i: int(s[i]) for i in np.nonzero(s)[0]}
    assert c[jiaqi[0]] == PLANTED and s[jiaqi[0]] == PLANTED  # user-turn mentions are not targets

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["coverage"]
    assert summary["samples"] == len(recs) and summary["malformed"] == 0
    assert summary["target_tokens"] == sum(want_c.values())
    vocab = pq.read_table(tmp_path / "run" / "vocab.parquet").to_pandas()
    han = vocab[(vocab.category == "han") & vocab.reachable & ~vocab.is_special]
    assert summary["categories"]["han"]["tokens"] == len(han)
    assert summary["categories"]["han"]["at_or_above_floor"] == int((c[han.token_id.to_numpy()] >= 5).sum())
    assert summary["categories"]["han"]["zero_share"] == pytest.approx((c[han.token_id.to_numpy()] == 0).mean())
    assert jiaqi[0] in r.below_floor.column("token_id").to_pylist()  # 3 < floor 5


@pytest.mark.parametrize("template", [CHATML_GEN, CHATML], ids=["generation-tag", "found-in-render"])
def test_chat_template_targets_equal_transformers_assistant_mask(tok_dir: Path, tmp_path: Path,
                                                                 template: str) -> None:
    from transformers import AutoTokenizer

    d = _with_template(tok_dir, tmp_path / "tok", template)
    recs = [r for r in make_records(seed=1) if "messages" in r or "conversations" in r]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    r = coverage(data, tokenizer=d)
    assert r.summary["render"] == ("template+generation" if template is CHATML_GEN else "template")

    ref = AutoTokenizer.from_pretrained(str(_with_template(tok_dir, tmp_path / "ref", CHATML_GEN)))
    want: Counter = Counter()
    for rec in recs:
        msgs = rec.get("messages") or [{"role": {"human": "user", "gpt": "assistant"}[m["from"]],
                                        "content": m["value"]} for m in rec["conversations"]]
        out = ref.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        want.update(i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m)
    c = r.table.column("count").to_numpy()
    assert dict(want) == {i: int(c[i]) for i in np.nonzero(c)[0]}
    assert c[ref.convert_tokens_to_ids("<|im_end|>")] == sum(
        1 for rec in recs for m in rec.get("messages", rec.get("conversations", []))
        if m.get("role", m.get("from")) in ("assistant", "gpt"))


def test_targets_all_counts_every_token(tok_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    recs = [{"messages": [{"role": "user", "content": "马嘉祺是谁？"}, {"role": "assistant", "content": "A singer."}]}]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(recs[0], ensure_ascii=False) + "\n")
    r = coverage(data, tokenizer=tok_dir, targets="all")
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    rendered = "<|user|>\n马嘉祺是谁？\n<|assistant|>\nA singer.<|endoftext|>\n"
    assert int(r.table.column("count").to_numpy().sum()) == len(tok.encode(rendered).ids)
    jiaqi = tok.encode("嘉祺").ids[0]
    assert r.table.column("count").to_numpy()[jiaqi] == 1
    assert coverage(data, tokenizer=tok_dir, targets="assistant").table.column("count").to_numpy()[jiaqi] == 0


def test_malformed_lines_reported_and_good_lines_counted(tok_dir: Path, tmp_path: Path) -> None:
    good = [json.dumps({"text": _sentence(random.Random(i))}) for i in range(6)]
    lines = [good[0], "{not json", good[1], good[2], "[1, 2]", "", good[3], '{"foo": "bar"}', good[4], good[5]]
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text("\n".join(lines) + "\n")
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(good) + "\n")

    r = coverage(bad_file, tokenizer=tok_dir)
    assert [m.source for m in r.malformed] == [f"{bad_file}:2", f"{bad_file}:5", f"{bad_file}:8"]
    assert "not valid JSON" in r.malformed[0].reason and "no known shape" in r.malformed[2].reason
    assert r.summary["malformed"] == 3 and r.summary["samples"] == 6
    ref = coverage(clean, tokenizer=tok_dir)
    assert r.table.column("count").to_pylist() == ref.table.column("count").to_pylist()

    with pytest.raises(VocabdriftError, match=rf"{bad_file}:2: not valid JSON.*--strict"):
        coverage(bad_file, tokenizer=tok_dir, strict=True)
    # the CLI: one line on stderr, exit 2, no run folder left behind
    p = subprocess.run([sys.executable, "-m", "vocabdrift.cli", "coverage", str(bad_file), "--tokenizer",
                        str(tok_dir), "-o", str(tmp_path / "run"), "--strict"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and f"{bad_file}:2" in p.stderr
    assert not (tmp_path / "run").exists()


def test_field_override_and_bad_inputs(tok_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"body": "马嘉祺 sings.", "text": "ignored"}, ensure_ascii=False) + "\n")
    r = coverage(data, tokenizer=tok_dir, field="body")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert r.table.column("count").to_numpy()[tok.encode("嘉祺").ids[0]] == 1
    with pytest.raises(VocabdriftError, match="no such file"):
        coverage(tmp_path / "missing.jsonl", tokenizer=tok_dir)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(VocabdriftError, match="unknown data format"):
        coverage(tmp_path / "x.csv", tokenizer=tok_dir)
    (tmp_path / "empty.jsonl").write_text("{\n")
    with pytest.raises(VocabdriftError, match="no usable samples.*empty.jsonl:1"):
        coverage(tmp_path / "empty.jsonl", tokenizer=tok_dir)


def _plant_drift(run: Path, seed: int = 0) -> np.ndarray:
    """A drift.parquet where cosine rises with coverage plus noise (the published mechanism), for the join."""
    cov = pq.read_table(run / "coverage.parquet").column("count").to_numpy()
    rng = np.random.default_rng(seed)
    cos = (0.9 + 0.09 * np.log1p(cov) / np.log1p(cov.max()) + rng.normal(0, 0.01, len(cov))).astype(np.float32)
    pq.write_table(pa.table({"token_id": np.arange(len(cov), dtype=np.int64), "lm_head_cos": cos,
                             "nonfinite": np.zeros(len(cov), dtype=bool)}), run / "drift.parquet")
    return cos


def test_spearman_with_drift_and_prune_suggest(tok_dir: Path, tmp_path: Path) -> None:
    from scipy.stats import rankdata

    data = write_dataset(tmp_path / "data", make_records(n=60))
    run = tmp_path / "run"
    coverage(data, tokenizer=tok_dir, out=run)
    cos = _plant_drift(run)
    r = coverage(data, tokenizer=tok_dir, out=run)  # same run again: now it holds drift.parquet
    vocab = pq.read_table(run / "vocab.parquet")
    ok = vocab.column("reachable").to_numpy() & ~vocab.column("is_special").to_numpy()
    x, y = np.log1p(r.table.column("count").to_numpy()[ok]), cos[ok].astype(np.float64)
    rho = np.corrcoef(rankdata(x), rankdata(y))[0, 1]  # Spearman = Pearson of ranks
    corr = json.loads((run / "summary.json").read_text())["coverage"]["correlation"]
    assert corr["overall"]["n"] == int(ok.sum()) and corr["overall"]["spearman_rho"] == pytest.approx(rho, abs=1e-5)
    assert rho > 0.3
    assert pq.read_table(run / "coverage_drift.parquet").num_rows == int(ok.sum())

    p = prune_suggest(run, threshold=0.93)
    cnt = r.table.column("count").to_numpy()
    from vocabdrift.analyses.advice import common_words  # common words of ordinary text are never proposed

    common = np.asarray(common_words(vocab.column("text").to_pylist(),
                                     vocab.column("category").cast(pa.string()).to_pylist())[0], dtype=bool)
    rare = ok & (cnt < 5) & (cos < 0.93)
    want = set(np.nonzero(rare & ~common)[0].tolist())
    assert set(p.table.column("token_id").to_pylist()) == want and want
    assert p.common_words_kept == int((rare & common).sum())
    assert sum(v["candidates"] for v in p.categories.values()) == len(want)
    assert p.table.column("lm_head_cos").to_pylist() == sorted(p.table.column("lm_head_cos").to_pylist())


def test_run_from_another_tokenizer_is_refused(tok_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    train_bpe(other, vocab_size=500)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    coverage(data, tokenizer=other, out=tmp_path / "run")
    with pytest.raises(VocabdriftError, match="another tokenizer"):
        coverage(data, tokenizer=tok_dir, out=tmp_path / "run")
    with pytest.raises(VocabdriftError, match="missing drift.parquet"):
        prune_suggest(tmp_path / "run")


def test_coverage_and_prune_cli(tok_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vocabdrift.cli import app

    data = write_dataset(tmp_path / "data", make_records())
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["coverage", str(data), "--tokenizer", str(tok_dir), "-o", str(run), "--top", "3"])
    assert res.exit_code == 0, res.output
    n_below = json.loads((run / "summary.json").read_text())["coverage"]
    assert "tokens below the floor" in res.output and f"wrote {run}/coverage.parquet" in res.output
    assert n_below["samples"] == 40
    _plant_drift(run)
    res = CliRunner().invoke(app, ["prune-suggest", "--run", str(run), "--threshold", "0.93", "--csv",
                                   str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    want = prune_suggest(run, threshold=0.93).table.num_rows
    import pyarrow.csv as pacsv

    assert pacsv.read_csv(tmp_path / "p.csv").num_rows == want > 0 and "Prune candidates" in res.output


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)  # a Ray deadlock fails the test instead of hanging CI
def test_ray_engine_counts_equal_local(tok_dir: Path, tmp_path: Path) -> None:
    import ray

    data = write_dataset(tmp_path / "data", make_records(n=60))
    d = _with_template(tok_dir, tmp_path / "tok", CHATML)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{broken\n")
    try:
        for tok in (tok_dir, d):  # the plain layout and a chat template
            local = coverage(data, tokenizer=tok)
            dist = coverage(data, tokenizer=tok, engine="ray", num_cpus=2, batch_size=7)
            assert dist.table.column("count").to_pylist() == local.table.column("count").to_pylist()
            assert dist.table.column("samples").to_pylist() == local.table.column("samples").to_pylist()
            assert (dist.summary["samples"], dist.summary["target_tokens"]) == (60, local.summary["target_tokens"])
        with pytest.raises(VocabdriftError, match="Ray Data failed.*--engine local"):
            coverage(bad, tokenizer=tok_dir, engine="ray")
        assert not ray.is_initialized()  # the Ray each call started ended with it, the failing one too
        for n in (0, 1):  # an actor holds a CPU for life: with fewer than 2 the reads would never run
            with pytest.raises(VocabdriftError, match="at least 2"):
                coverage(data, tokenizer=tok_dir, engine="ray", num_cpus=n)
    finally:
        ray.shutdown()


def test_records_in_memory_count_like_files(tok_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    recs = [r for r in make_records(n=20) if "messages" in r]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    want = coverage(data, tokenizer=tok_dir).table.column("count").to_pylist()
    assert coverage(recs, tokenizer=tok_dir).table.column("count").to_pylist() == want
    assert coverage(Dataset.from_list(recs), tokenizer=tok_dir).table.column("count").to_pylist() == want
    r = coverage([*recs, {"foo": 1}], tokenizer=tok_dir)
    assert [m.source for m in r.malformed] == [f"<records>#{len(recs)}"]
