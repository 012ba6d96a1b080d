"""probe, cases and undertrained on tiny models trained in the test, and on SmolLM2 (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_engines import make_tiny_model
from test_engines import tiny_model as tiny_model  # the fixture

from vocabdrift.errors import VocabdriftError

TRAIN_TEMPLATES = ("repeat_en", "quoted_en")


def train_copier(folder: Path, *, steps: int = 300, seed: int = 0, base: Path | None = None
                 ) -> tuple[list[int], int, int]:
    """Train the tiny model at `folder` to answer the probe templates with the token asked for; then destroy one
    token's lm_head row: point it against what lm_head reads when the model is asked for that token.
    Returns (trained ids, good, bad)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vocabdrift.analyses.probe import TEMPLATES, encode_template

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    special = set(tok.all_special_ids)
    # tokens whose text encodes back to themselves, so that `cases` can ask for them in plain text
    words = [i for i in range(3, len(tok)) if i not in special and tok.decode([i]).strip() == tok.decode([i])
             and tok(tok.decode([i]), add_special_tokens=False)["input_ids"] == [i]][:120]
    encs = [encode_template(TEMPLATES[n], tok) for n in TRAIN_TEMPLATES]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        enc = encs[step % len(encs)]
        batch = torch.tensor(words)[torch.randperm(len(words))[:32]]
        ids = torch.tensor([enc.with_token(int(w)) for w in batch])
        logits = model(input_ids=ids).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if base is not None:  # the model before its row is destroyed: the "pre-trained" side of a LOST test
        model.save_pretrained(base)
        tok.save_pretrained(base)
    good, bad = words[0], words[1]
    with torch.no_grad():
        seen: list[torch.Tensor] = []
        hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0][:, -1]))
        for e in encs:
            model(input_ids=torch.tensor([e.with_token(bad)]))
        hook.remove()
        h = torch.cat(seen).mean(dim=0)  # (H,) what lm_head reads when the model is asked to say `bad`
        w = model.lm_head.weight
        w[bad] = -h / h.norm() * w.norm(dim=1).max()
    model.save_pretrained(folder)
    return words, good, bad


# ---- probe --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_probe_finds_the_sayable_and_the_lost_token(copier, tmp_path: Path) -> None:
    from vocabdrift.api.probe import probe

    post, base, words, good, bad = copier
    r = probe(post, base=base, tokens=words[:20], templates=TRAIN_TEMPLATES, base_templates=TRAIN_TEMPLATES,
              out=tmp_path / "run")
    rows = {(x["model"], x["template"], x["token_id"]): x for x in r.table.to_pylist()}
    for t in TRAIN_TEMPLATES:
        assert rows[("post", t, good)]["rank"] == 1 and rows[("post", t, good)]["sayable"]
        assert rows[("post", t, bad)]["p_target"] < 1e-3 and not rows[("post", t, bad)]["sayable"]
        assert rows[("post", t, bad)]["outcome"] == "unsayable"
        assert rows[("base", t, bad)]["sayable"]
    assert bad in r.summary["lost"] and good not in r.summary["lost"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["probe"]["lost"] == r.summary["lost"]
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "run" / "probe.parquet")
    assert table.num_rows == 2 * 2 * 20
    assert {"token_id", "model", "template", "p_target", "logprob", "rank", "in_top_p", "sayable"} <= set(
        table.column_names)


@pytest.mark.slow
def test_probe_resumes_after_a_kill_with_identical_results(tiny_model: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    import pyarrow.parquet as pq

    from vocabdrift.api.probe import probe

    ids = list(range(3, 243))
    args = dict(tokens=ids, templates=["repeat_en", "repeat_ja"], block_tokens=8, batch_size=8)
    whole = probe(tiny_model, out=tmp_path / "whole", **args).table

    out = tmp_path / "resumed"
    part = tmp_path / ".resumed.probe-partial"
    code = (f"from vocabdrift.api.probe import probe\n"
            f"probe({str(tiny_model)!r}, out={str(out)!r}, **{args!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(list(part.glob("*.parquet"))) < 3:
            assert proc.poll() is None, "the probe finished or died before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    done = sorted(p.name for p in part.glob("*.parquet"))
    assert done and not out.exists()  # killed: blocks kept beside RUN, no half-written run folder
    total_blocks = 2 * len(ids) // 8
    assert len(done) < total_blocks
    resumed = probe(tiny_model, out=out, **args).table
    assert resumed.equals(whole)
    assert pq.read_table(out / "probe.parquet").equals(whole)
    assert not part.exists()


def test_probe_uses_few_shot_for_a_model_without_chat_template(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    from vocabdrift.api.probe import probe

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model, plain)
    (plain / "chat_template.jinja").unlink()
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = probe(plain, tokens=[5, 6, 7], out=tmp_path / "run")
    assert set(r.table["template"].to_pylist()) == {"fewshot_en", "fewshot_zh"}
    with pytest.raises(VocabdriftError, match="needs a chat template"):
        probe(plain, tokens=[5], templates=["repeat_en"], out=tmp_path / "run2")


def test_prompt_is_built_around_the_token_id(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from vocabdrift.analyses.probe import TEMPLATES, encode_template

    tok = AutoTokenizer.from_pretrained(tiny_model)
    enc = encode_template(TEMPLATES["repeat_en"], tok)
    full = tok.apply_chat_template([{"role": "user", "content": TEMPLATES["repeat_en"].text.format(word="cat")}],
                                   add_generation_prompt=True, tokenize=False)
    ids = enc.with_token(123)
    assert ids.count(123) >= 1 and ids[len(enc.before)] == 123
    # the text around the token is the chat-templated request
    assert tok.decode(list(enc.before)) + "cat" + tok.decode(list(enc.after)) == full


def test_token_specs_resolve_or_fail_clearly(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from vocabdrift.api.probe import resolve_tokens

    tok = AutoTokenizer.from_pretrained(tiny_model)
    piece = tok.convert_ids_to_tokens(50)
    assert resolve_tokens(tok, [50, "50", piece]) == [50]
    with pytest.raises(VocabdriftError, match="not one"):
        resolve_tokens(tok, ["cat dog bird fish"])
    with pytest.raises(VocabdriftError, match="outside the vocabulary"):
        resolve_tokens(tok, [10**6])
    from vocabdrift.api.probe import probe

    with pytest.raises(VocabdriftError, match="say which tokens to probe"):
        probe(tiny_model, out="/nonexistent/run")


# ---- cases --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cases_pass_and_fail_on_the_trained_model(copier, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from vocabdrift.api.probe import cases

    post, _, _, good, bad = copier
    tok = AutoTokenizer.from_pretrained(post)
    g, b = tok.decode([good]), tok.decode([bad])
    f = tmp_path / "cases.jsonl"
    f.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in [
        {"name": "good", "prompt": f"Repeat this word three times:\n{g}", "expected": g},
        {"name": "bad", "prompt": f"Repeat this word three times:\n{b}", "expected": b},
        {"name": "forbidden", "prompt": f"Repeat this word three times:\n{g}", "expected": g, "forbidden": [g]},
    ]) + "\n")
    r = cases(post, f, out=tmp_path / "run", max_tokens=3)
    assert [c["passed"] for c in r.cases] == [True, False, False]
    assert r.cases[0]["output"].startswith(g)
    written = json.loads((tmp_path / "run" / "cases.json").read_text())
    assert written["passed"] == 1 and written["total"] == 3 and written["model"] == "post"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["cases"]["post"] == {"passed": 1, "total": 3}


def test_shipped_cases_and_bad_case_files(tmp_path: Path) -> None:
    from vocabdrift.api.probe import read_cases

    shipped = read_cases()
    texts = {c.expected for c in shipped}
    assert {"无痛人流", "据介绍", "地税", "きちんと", "それほど", "色々な", "相続税", "凄い", "马嘉祺"} <= texts
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "expected": "b"}\n{not json}\n')
    with pytest.raises(VocabdriftError, match="bad.jsonl:2"):
        read_cases(bad)
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(VocabdriftError, match="expected"):
        read_cases(bad)


def test_judge_reads_answers() -> None:
    from vocabdrift.analyses.probe import Case, judge

    c = Case("c", "Repeat: 地税", "地税", ("地利",))
    assert judge("地税 地税 地税", c)
    assert not judge("地利 地利", c)
    assert not judge("地税, 地利", c)
    assert judge("Hello hello HELLO", Case("h", "p", "hello"))
    assert judge("ｈｅｌｌｏ", Case("h", "p", "hello"))  # NFKC: full-width letters


# ---- undertrained -------------------------------------------------------------------------------------------------

def _planted_model(folder: Path, planted: list[int]) -> Path:
    """The tiny model with 8 padding rows beyond the tokenizer that share one untrained direction, and `planted`
    tokens made to look like them (output row along that direction, input row near zero)."""
    import torch
    from safetensors.torch import load_file, save_file

    make_tiny_model(folder)
    cfg = json.loads((folder / "config.json").read_text())
    sd = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    v, h = sd["lm_head.weight"].shape
    scale = float(sd["lm_head.weight"].std())  # the untrained direction is no bigger than a normal row
    c = torch.randn(h, generator=g) * scale
    lm = torch.cat([sd["lm_head.weight"], c + 0.1 * scale * torch.randn(8, h, generator=g)])
    emb = torch.cat([sd["model.embed_tokens.weight"], 0.001 * torch.randn(8, h, generator=g)])
    for t in planted:
        lm[t] = c + 0.1 * scale * torch.randn(h, generator=g)
        emb[t] = 0.001 * torch.randn(h, generator=g)
    sd["lm_head.weight"], sd["model.embed_tokens.weight"] = lm.contiguous(), emb.contiguous()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    cfg["vocab_size"] = v + 8
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.slow
def test_undertrained_finds_planted_tokens_and_verifies_them(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from vocabdrift.api.probe import undertrained

    planted = [40, 41, 42, 43]
    folder = _planted_model(tmp_path / "m", planted)
    tok = AutoTokenizer.from_pretrained(folder)
    r = undertrained(folder, out=tmp_path / "run", share=0.01, tokens=[tok.convert_ids_to_tokens(40), 100])
    s = r.summary
    assert s["reference"] == 8  # the padding rows
    assert sorted(s["top"][:4]) == planted
    rows = r.table.to_pylist()
    assert all(rows[t]["verified"] is not None for t in planted)
    assert rows[100]["verified"] is None  # not a candidate, not probed
    h1 = s["tokens"]
    assert h1[tok.convert_ids_to_tokens(40)]["embed_norm_percentile"] < 5
    assert h1["100"]["embed_norm_percentile"] > 5
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "run" / "undertrained.parquet")
    assert t.column_names == ["token_id", "unembed_score", "embed_norm", "embed_norm_percentile", "verified",
                              "lm_head_collapse_group", "lm_head_collapse_size", "embed_collapse_group",
                              "embed_collapse_size"]


def test_indicators_match_an_independent_computation() -> None:
    import numpy as np

    from vocabdrift.analyses.undertrained import indicators

    rng = np.random.default_rng(0)
    u = rng.standard_normal((300, 16)).astype(np.float32)
    u[:, 0] += 5  # a strong shared direction
    e = rng.standard_normal((300, 16)).astype(np.float32)
    ref = [290, 291, 292, 293]
    ind = indicators(u, e, reference=ref)
    c = u - u.mean(0)
    pc = np.linalg.svd(c, full_matrices=False)[2][0]
    ur = u - np.outer(u @ pc, pc)
    m = ur[ref].mean(0)
    want = ur @ m / (np.linalg.norm(ur, axis=1) * np.linalg.norm(m))
    assert np.allclose(ind.unembed_score, want, atol=1e-4)
    assert np.allclose(ind.embed_norm, np.linalg.norm(e, axis=1), atol=1e-5)
    assert ind.embed_norm_percentile[np.argmin(ind.embed_norm)] < 1


# ---- SmolLM2 ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_repeats_hello_and_probe_says_it_is_sayable(smollm2_gguf: Path, tmp_path: Path) -> None:
    from vocabdrift.api.probe import probe
    from vocabdrift.engines.hf import HFEngine

    eng = HFEngine(smollm2_gguf)
    answer = eng.generate(["Repeat this word three times: hello"], temperature=0, max_tokens=16)[0][0]
    assert answer.lower().count("hello") >= 2, answer
    r = probe(smollm2_gguf, tokens=["hello"], templates=["repeat_en"], engine=eng, out=tmp_path / "run")
    row = r.table.to_pylist()[0]
    assert row["sayable"] and row["rank"] <= 3, row


# ---- command line -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_probe_writes_the_run_and_bad_input_is_one_line(tiny_model: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    exe = [sys.executable, "-c", "from vocabdrift.cli import main; main()"]
    ok = subprocess.run([*exe, "probe", str(tiny_model), "--token", "5", "--token", "6", "--template",
                         "repeat_en", "-o", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "probe.parquet" in ok.stdout and (tmp_path / "run" / "probe.parquet").exists()
    bad = subprocess.run([*exe, "probe", str(tiny_model), "-o", str(tmp_path / "run2")], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "say which tokens to probe" in bad.stderr
    assert not (tmp_path / "run2").exists()


def test_cli_probe_off_a_terminal_says_how_far_it_is(tiny_model: Path, tmp_path: Path, cli,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`vocabdrift probe ... 2> log`: lines at a steady pace (here every block) and a last one, no bar."""
    monkeypatch.setenv("VOCABDRIFT_PROGRESS_EVERY", "0")
    code, out, err = cli("probe", tiny_model, "--token", "5", "--token", "6", "--template", "repeat_en",
                         "-o", tmp_path / "run")
    assert code == 0, err
    lines = [x for x in err.splitlines() if x.startswith("probing: ")]
    assert lines and lines[-1].startswith("probing: 2/2 done (") and "%|" not in err


def test_probe_from_a_diff_run_takes_the_most_drifted(tiny_model: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    from vocabdrift.api.probe import probe
    from vocabdrift.outputs.run import open_run

    cos = [1.0 - 0.001 * ((i * 37) % 101) for i in range(200)]
    with open_run(tmp_path / "run") as run:
        run.write_table("drift.parquet", pa.table({"token_id": list(range(200)), "lm_head_cos": cos}))
        run.write_table("vocab.parquet", pa.table({"token_id": list(range(200)),
                                                   "is_special": [i < 3 for i in range(200)]}))
    want = sorted((c, i) for i, c in enumerate(cos) if i >= 3)[:5]
    r = probe(tiny_model, run=tmp_path / "run", drifted=5, templates=["repeat_en"], out=tmp_path / "run")
    assert sorted(set(r.table["token_id"].to_pylist())) == sorted(i for _, i in want)
    assert (tmp_path / "run" / "probe.parquet").exists() and (tmp_path / "run" / "drift.parquet").exists()


def test_indicators_block_by_block_equal_the_whole_matrices() -> None:
    """undertrained reads blocks of rows: the blockwise indicators must not depend on the block size."""
    import numpy as np

    from vocabdrift.analyses.undertrained import indicators, indicators_blockwise

    rng = np.random.default_rng(1)
    u = rng.standard_normal((301, 12)).astype(np.float32)
    u[:, 3] -= 4
    e = rng.standard_normal((301, 12)).astype(np.float32)

    def blocks(x: np.ndarray, n: int):
        return lambda: ((s, x[s:s + n]) for s in range(0, len(x), n))

    whole = indicators(u, e, reference=[7, 150, 300])
    for n in (1, 7, 64):
        part = indicators_blockwise(blocks(u, n), blocks(e, n), reference=[7, 150, 300])
        np.testing.assert_allclose(part.unembed_score, whole.unembed_score, atol=1e-5)
        np.testing.assert_array_equal(part.embed_norm, whole.embed_norm)
        np.testing.assert_array_equal(part.reference, whole.reference)
    picked = indicators_blockwise(blocks(u, 7), blocks(e, 7))  # default reference: the smallest embedding norms
    np.testing.assert_array_equal(picked.reference, indicators(u, e).reference)
