"""diff on tiny real checkpoints with drift planted on known rows, checked against an independent numpy computation."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from factory import cosine_rows, evict, make_gpt2, make_llama, plant_drift, read_matrix, train_bpe

import vocabdrift
from vocabdrift.analyses.drift import bf16_row_sums as _bf16_row_sums
from vocabdrift.errors import VocabdriftError
from vocabdrift.sources.checkpoint import open_checkpoint

PLANTED = {7: 0.9, 42: 0.7, 101: 0.8}


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama")
    base = make_llama(root / "base", shard=True, dtype="bfloat16")
    post = plant_drift(base, root / "post", rows=PLANTED, tensor_suffix="lm_head.weight", noise=0.01)
    return base, post


def _drift(run: Path) -> dict[str, np.ndarray]:
    t = pq.read_table(run / "drift.parquet")
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}


@pytest.mark.parametrize(("fused", "cold"), [(False, False), (True, False), (False, True), (True, True)],
                         ids=["float32-pass", "fused-bf16-pass", "float32-pass-from-disk", "fused-bf16-pass-from-disk"])
def test_llama_sharded_bf16_matches_numpy(llama_pair: tuple[Path, Path], tmp_path: Path, monkeypatch,
                                          fused: bool, cold: bool) -> None:
    import vocabdrift.analyses.drift as D

    base, post = llama_pair
    if cold:  # out of the page cache: the rows are read around it (O_DIRECT) where the file system allows
        for f in [*base.glob("*.safetensors"), *post.glob("*.safetensors")]:
            evict(f)
    assert (base / "model.safetensors.index.json").exists() and len(list(base.glob("*.safetensors"))) > 1
    # the fused pass is for large vocabularies; here it is forced on (threshold 0) or off
    monkeypatch.setattr("vocabdrift.api.diff.FUSED_MIN_ELEMENTS", 0 if fused else 1 << 62)
    calls = []
    monkeypatch.setattr(D, "bf16_row_sums", lambda b, p: calls.append(len(b)) or _bf16_row_sums(b, p))
    run = vocabdrift.diff(base, post, out=tmp_path / "run", block_rows=37)  # odd block size: blocks cross shards
    rows = open_checkpoint(base).vocab_size
    assert sum(calls) == (2 * rows if fused else 0)  # both matrices, every row, when fused
    d = _drift(run)
    for kind, name in (("lm_head", "lm_head.weight"), ("embed", "model.embed_tokens.weight")):
        a, b = read_matrix(base, name), read_matrix(post, name)
        np.testing.assert_allclose(d[f"{kind}_cos"], cosine_rows(a, b), atol=1e-5)
        np.testing.assert_allclose(d[f"{kind}_l2"], np.linalg.norm(b - a, axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d[f"{kind}_norm_base"], np.linalg.norm(a, axis=1), rtol=1e-5)
        np.testing.assert_allclose(d[f"{kind}_norm_post"], np.linalg.norm(b, axis=1), rtol=1e-5)
    worst = np.argsort(d["lm_head_cos"])[: len(PLANTED)]
    assert set(worst.tolist()) == set(PLANTED)
    assert d["embed_cos"][list(PLANTED)].min() > 0.99  # the input rows were only lightly noised
    summary = json.loads((run / "summary.json").read_text())
    lm = summary["overall"]["lm_head"]
    assert lm["below_0.95"] >= len(PLANTED) and lm["min_cos"] == pytest.approx(d["lm_head_cos"].min(), abs=1e-6)
    assert {"lm_head", "embed"} <= set(summary["categories"]["latin"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["commands"][0]["command"] == "diff"
    assert manifest["commands"][0]["inputs"]["base"]["quick_sha256"]
    vocab = pq.read_table(run / "vocab.parquet")
    assert vocab.num_rows == len(d["token_id"])
    nb = pq.read_table(run / "neighbors.parquet").to_pylist()
    assert {r["token_id"] for r in nb} >= set(PLANTED)
    # each stored neighbour is the brute-force numpy answer (the pass reuses the drift table's row norms)
    mats = {"base": read_matrix(base, "lm_head.weight"), "post": read_matrix(post, "lm_head.weight")}
    for r in nb:
        w = mats[r["model"]]
        sims = w @ w[r["token_id"]] / (np.linalg.norm(w, axis=1) * np.linalg.norm(w[r["token_id"]]))
        sims[r["token_id"]] = -np.inf
        assert r["neighbor_id"] == int(np.argsort(-sims, kind="stable")[r["rank"] - 1])
        assert r["cos"] == pytest.approx(sims[r["neighbor_id"]], abs=1e-5)


def test_fold_norm_and_center_match_numpy(llama_pair: tuple[Path, Path]) -> None:
    from vocabdrift.api.diff import measure

    base, post = llama_pair
    m = measure(base, post, fold_norm=True, center=True)
    a, b = read_matrix(base, "lm_head.weight"), read_matrix(post, "lm_head.weight")
    ga, gb = read_matrix(base, "model.norm.weight"), read_matrix(post, "model.norm.weight")
    got = m.drift.column("lm_head_cos").to_numpy()
    np.testing.assert_allclose(got, cosine_rows(a * ga, b * gb), atol=1e-5)
    centered = m.drift.column("lm_head_cos_centered").to_numpy()
    np.testing.assert_allclose(centered, cosine_rows(a * ga - (a * ga).mean(0), b * gb - (b * gb).mean(0)), atol=1e-5)


def test_gpt2_tied(tmp_path: Path) -> None:
    base = make_gpt2(tmp_path / "base")
    post = plant_drift(base, tmp_path / "post", rows={11: 0.9, 12: 0.6}, tensor_suffix="wte.weight")
    ck = open_checkpoint(base)
    assert ck.tied and ck.tensor_name("embed").endswith("wte.weight")
    run = vocabdrift.diff(base, post, out=tmp_path / "run")
    d = _drift(run)
    a, b = read_matrix(base, ck.tensor_name("embed")), read_matrix(post, ck.tensor_name("embed"))
    np.testing.assert_allclose(d["lm_head_cos"], cosine_rows(a, b), atol=1e-5)
    np.testing.assert_allclose(d["lm_head_cos"], d["embed_cos"])  # tied: one matrix plays both roles
    assert set(np.argsort(d["lm_head_cos"])[:2].tolist()) == {11, 12}


def _write_gguf(path: Path, embed: np.ndarray, output: np.ndarray, qtype: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    for name, arr in (("token_embd.weight", embed), ("output.weight", output)):
        t = getattr(gguf.GGMLQuantizationType, qtype)
        if qtype in ("F32",):
            w.add_tensor(name, arr.astype(np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), t), raw_dtype=t)
    w.add_tensor("output_norm.weight", np.ones(embed.shape[1], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_matches_numpy(tmp_path: Path, qtype: str) -> None:
    import gguf

    rng = np.random.default_rng(0)
    tok = make_llama(tmp_path / "tok")  # only for its tokenizer
    v = open_checkpoint(tok).vocab_size
    e = rng.standard_normal((v, 64)).astype(np.float32)
    o = rng.standard_normal((v, 64)).astype(np.float32)
    o2 = o.copy()
    o2[[5, 77]] = rng.standard_normal((2, 64))
    _write_gguf(tmp_path / "base.gguf", e, o, qtype)
    _write_gguf(tmp_path / "post.gguf", e, o2, qtype)
    run = vocabdrift.diff(tmp_path / "base.gguf", tmp_path / "post.gguf", out=tmp_path / "run",
                          tokenizer=tok / "tokenizer.json", block_rows=50)
    d = _drift(run)
    t = getattr(gguf.GGMLQuantizationType, qtype)

    def deq(x: np.ndarray) -> np.ndarray:
        return x if qtype == "F32" else gguf.quants.dequantize(gguf.quants.quantize(x, t), t).astype(np.float64)

    np.testing.assert_allclose(d["lm_head_cos"], cosine_rows(deq(o), deq(o2)), atol=1e-5)
    assert set(np.argsort(d["lm_head_cos"])[:2].tolist()) == {5, 77}


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_gguf_k_quants_read_by_rows(tmp_path: Path, qtype: str) -> None:
    """k-quants (which gguf cannot quantize): random blocks with sane scales, read in row blocks, equal the
    whole-tensor dequantization."""
    import gguf

    t = getattr(gguf.GGMLQuantizationType, qtype)
    block, size = gguf.GGML_QUANT_SIZES[t]
    rows, cols = 30, 512
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    half = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == "Q4_K":
        raw[..., 0:2] = half  # d
        raw[..., 2:4] = half  # dmin
    else:
        raw[..., size - 2:size] = half  # d is the last field
    raw = raw.reshape(rows, -1)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("token_embd.weight", raw, raw_shape=(rows, raw.shape[1]), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = open_checkpoint(tmp_path / "k.gguf")
    assert ck.tied and ck.vocab_size == rows and ck.hidden_size == cols
    whole = gguf.quants.dequantize(raw, t)
    got = np.concatenate([b.numpy() for _, b in ck.iter_blocks("embed", block_rows=7)])
    np.testing.assert_allclose(got, whole, rtol=1e-6)
    assert np.isfinite(got).all()


def test_added_tokens_and_nan_rows(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    base = make_llama(tmp_path / "base", dtype="float32")
    v = open_checkpoint(base).vocab_size
    post = make_llama(tmp_path / "post", dtype="float32", vocab=v + 3, tokenizer_from=base)
    sd_b = load_file(str(base / "model.safetensors"))
    sd = load_file(str(post / "model.safetensors"))
    for k in sd_b:  # same weights, plus 3 new rows; one row broken
        if sd[k].shape == sd_b[k].shape:
            sd[k] = sd_b[k].clone()
        else:
            sd[k] = torch.cat([sd_b[k], torch.randn(3, sd_b[k].shape[1])])
    sd["lm_head.weight"][9, 3] = float("nan")
    sd["lm_head.weight"][21] *= -1
    save_file(sd, str(post / "model.safetensors"), metadata={"format": "pt"})
    run = vocabdrift.diff(base, post, out=tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["added_tokens"] == [v, v + 1, v + 2]
    assert summary["nonfinite_rows"] == [9]
    d = _drift(run)
    assert np.isnan(d["lm_head_cos"][9]) and d["nonfinite"][9]
    assert summary["overall"]["lm_head"]["min_cos"] == pytest.approx(-1.0, abs=1e-5)
    # the broken row is counted, below every threshold (not dropped: a destroyed row must fail a gate)
    assert summary["overall"]["lm_head"]["tokens"] == int((~pq.read_table(run / "vocab.parquet")
                                                            .column("is_special").to_numpy()).sum())
    assert summary["overall"]["lm_head"]["undefined"] == 1 and summary["undefined_rows"]["lm_head"] == [9]


def test_neighbors_before_and_after(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from vocabdrift.api.diff import neighbors

    base = make_llama(tmp_path / "base", dtype="float32")
    post = Path(str(tmp_path / "post"))
    import shutil

    shutil.copytree(base, post)
    sd = load_file(str(post / "model.safetensors"))
    sd["lm_head.weight"][50] = sd["lm_head.weight"][2] * 3  # token 50 now points where the special token 2 points
    save_file(sd, str(post / "model.safetensors"), metadata={"format": "pt"})
    nt = neighbors(post, "50", base=base, k=3).to_pylist()
    after = [r for r in nt if r["model"] == "post"]
    assert after[0]["neighbor_id"] == 2 and after[0]["cos"] == pytest.approx(1.0, abs=1e-5)
    assert after[0]["is_special"]
    before = [r for r in nt if r["model"] == "base"]
    assert before[0]["neighbor_id"] != 2 or before[0]["cos"] < 0.9


def test_smollm2_gguf_reads(smollm2_gguf: Path) -> None:
    ck = open_checkpoint(smollm2_gguf)
    assert ck.tied and ck.vocab_size == 49152 and ck.hidden_size == 576
    rows = ck.rows("embed", 100, 110)
    assert rows.shape == (10, 576) and bool(rows.isfinite().all())
    table = vocabdrift.vocab(smollm2_gguf)
    assert table.num_rows == 49152
    hello = table.column("text").to_pylist().index("hello")
    assert table.column("category")[hello].as_py() == "latin"


def test_help_does_not_import_torch() -> None:
    """`vocabdrift --help` and every command's --help stay instant: no torch, transformers or pyarrow import; each
    shows flags as flags and has --json and --quiet."""
    code = """
import sys, typer.main, typer.testing
from vocabdrift.cli import app
runner = typer.testing.CliRunner()
assert runner.invoke(app, ["--help"]).exit_code == 0
names = sorted(typer.main.get_command(app).commands)
for name in names:
    r = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert r.exit_code == 0, (name, r.output)
    assert "<bool>" not in r.output, (name, "a flag shown as a <bool> to type")  # flags are shown bare
    assert "--json" in r.output and "--quiet" in r.output, (name, "every command has --json and --quiet")
bad = [m for m in ("torch", "transformers", "pyarrow") if m in sys.modules]
print(names, bad)
sys.exit(1 if bad or "diff" not in names else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gpt_neox_names(tmp_path: Path) -> None:
    import torch
    from factory import train_bpe
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    train_bpe(tmp_path / "base")
    v = len(json.loads((tmp_path / "base" / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=v, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, tie_word_embeddings=False)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "base")
    post = plant_drift(tmp_path / "base", tmp_path / "post", rows={3: 0.9}, tensor_suffix="embed_out.weight")
    ck = open_checkpoint(post)
    assert ck.tensor_name("embed").endswith("embed_in.weight") and ck.tensor_name("lm_head") == "embed_out.weight"
    d = _drift(vocabdrift.diff(tmp_path / "base", post, out=tmp_path / "run"))
    assert int(np.argmin(d["lm_head_cos"])) == 3 and d["embed_cos"].min() > 0.999


def test_fp8_and_lm_head_bias(tmp_path: Path) -> None:
    """A bare .safetensors file in float8 with an lm_head bias, next to a tokenizer."""
    import shutil

    import torch
    from safetensors.torch import save_file

    tok = make_llama(tmp_path / "tok")
    v = open_checkpoint(tok).vocab_size
    g = torch.Generator().manual_seed(0)
    w = torch.randn(v, 16, generator=g)
    w2 = w.clone()
    w2[4] = -w2[4]
    for name, lm in (("base", w), ("post", w2)):
        (tmp_path / name).mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok / f, tmp_path / name / f)
        save_file({"model.embed_tokens.weight": w.to(torch.float8_e4m3fn), "lm_head.weight": lm.to(torch.float8_e4m3fn),
                   "lm_head.bias": torch.full((v,), 1.0 if name == "base" else 1.5)},
                  str(tmp_path / name / "weights.safetensors"))
    d = _drift(vocabdrift.diff(tmp_path / "base" / "weights.safetensors", tmp_path / "post" / "weights.safetensors",
                               out=tmp_path / "run"))
    ref = cosine_rows(w.to(torch.float8_e4m3fn).double().numpy(), w2.to(torch.float8_e4m3fn).double().numpy())
    np.testing.assert_allclose(d["lm_head_cos"], ref, atol=1e-5)
    assert d["lm_head_cos"][4] == pytest.approx(-1.0, abs=1e-5)
    np.testing.assert_allclose(d["lm_head_bias_delta"], 0.5)


def test_fused_bf16_sums_match_float64_with_zero_and_broken_rows() -> None:
    import torch

    from vocabdrift.analyses.drift import bf16_row_sums, stats_from_sums

    g = torch.Generator().manual_seed(0)
    b = (torch.randn(9, 300, generator=g) * 0.02).bfloat16()
    p = (b.float() + 0.001 * torch.randn(9, 300, generator=g)).bfloat16()
    p[1] = -b[1]           # turned around: cosine -1
    b[2] = 0               # a zero row: cosine undefined (NaN), not 0
    p[3, 5] = float("nan")  # a broken row
    p[4] = b[4]            # unchanged: cosine 1, distance 0
    sums = bf16_row_sums(b.view(torch.int16).numpy().view(np.uint16), p.view(torch.int16).numpy().view(np.uint16))
    x, y = b.double().numpy(), p.double().numpy()
    np.testing.assert_allclose(sums[:, 0], (x * x).sum(1), rtol=1e-12)
    ok = np.isfinite(y).all(1)
    np.testing.assert_allclose(sums[ok, 1], (y[ok] ** 2).sum(1), rtol=1e-12)
    np.testing.assert_allclose(sums[ok, 2], ((y[ok] - x[ok]) ** 2).sum(1), rtol=1e-12, atol=1e-30)
    np.testing.assert_allclose(sums[ok, 3], (x[ok] * y[ok]).sum(1), rtol=1e-10, atol=1e-20)
    st = stats_from_sums(sums)
    assert st["cos"][1] == pytest.approx(-1.0) and np.isnan(st["cos"][2]) and st["cos"][4] == pytest.approx(1.0)
    assert not np.isfinite(st["norm_post"][3]) and st["l2"][4] == 0.0
    with pytest.raises(ValueError, match="uint16"):
        bf16_row_sums(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))


def test_row_stats_law_of_cosines_matches_float64() -> None:
    """The cosine comes from three norms (one pass fewer than a dot product); rows whose norm changed by orders of
    magnitude take the direct dot. Both kinds must agree with float64 numpy to 1e-6."""
    import torch

    from vocabdrift.analyses.drift import row_stats

    rng = np.random.default_rng(0)
    h = 3584
    base = rng.standard_normal((64, h)).astype(np.float32) * 0.02
    post = base.copy()
    post[:16] += rng.standard_normal((16, h)).astype(np.float32) * 2e-5   # near-identical (cos ~ 1 - 5e-7)
    post[16:32] = rng.standard_normal((16, h)).astype(np.float32) * 0.02  # unrelated (cos ~ 0)
    post[32:40] = -base[32:40]                                             # reversed
    post[40:48] *= 1e-4                                                    # shrank 10,000x: the direct path
    post[48:56] = base[48:56] * 300 + rng.standard_normal((8, h)).astype(np.float32)  # grew 300x
    post[56] = 0.0                                                         # zero row: NaN, not 0
    st = {k: v.numpy() for k, v in row_stats(torch.from_numpy(base), torch.from_numpy(post)).items()}
    b, p = base.astype(np.float64), post.astype(np.float64)
    nb, npo = np.linalg.norm(b, axis=1), np.linalg.norm(p, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (b * p).sum(1) / (nb * npo)
    ok = np.arange(64) != 56
    np.testing.assert_allclose(st["cos"][ok], cos[ok], atol=1e-6, rtol=0)
    np.testing.assert_allclose(st["l2"], np.linalg.norm(p - b, axis=1), rtol=1e-5)
    np.testing.assert_allclose(st["norm_post"], npo, rtol=1e-5)
    assert np.isnan(st["cos"][56])
    assert (1 - st["cos"][:16]).max() < 1e-5 and (st["cos"][:16] < 1).any()  # small drift is not rounded away


def test_prefetched_stream_splits_torch_threads_and_restores_them() -> None:
    """While a read-ahead stream is open, the reader and the main thread each get half of torch's threads."""
    import torch

    from vocabdrift.api.diff import _prefetched

    before = torch.get_num_threads()
    seen = [torch.get_num_threads() for _ in _prefetched(iter(range(3)))]
    assert seen == [max(1, before // 2)] * 3
    assert torch.get_num_threads() == before


def test_large_vocabulary_table_is_built_in_a_child_process(tmp_path: Path) -> None:
    """From 32,768 rows on, measure builds or reads back the vocabulary table in its own process (tokenizers holds
    the GIL while it parses): the same table as in-process, and a bad tokenizer's one-line error comes back through
    it."""
    import shutil

    import pyarrow as pa

    from vocabdrift.api import diff as D
    from vocabdrift.api.diff import measure, vocab_table
    from vocabdrift.errors import VocabdriftError
    from vocabdrift.sources import vocabulary as V

    rows = D._CHILD_ROWS
    base = make_llama(tmp_path / "base", vocab=rows, hidden=8, dtype="float32")
    post = plant_drift(base, tmp_path / "post", rows={3: 0.5}, tensor_suffix="lm_head.weight")
    m = measure(base, post)
    assert m.vocab.equals(vocab_table(post, size=rows, cache=False))
    assert m.vocab.num_rows == rows and int(m.drift.column("lm_head_cos").to_numpy().argmin()) == 3
    # the child filled the vocabulary cache, and the next measure's child reads it back: a planted change returns
    hit = V._cache_path(post, rows)
    planted = m.vocab.set_column(m.vocab.schema.get_field_index("text"), "text", pa.array(["x"] * rows))
    pq.write_table(planted, hit)
    assert measure(base, post).vocab.equals(planted)
    # a tokenizer that knows more tokens than the model has rows: the child's error, one line, in this process
    big = tmp_path / "big"
    shutil.copytree(post, big)
    train_bpe(big, vocab_size=500)
    with pytest.raises(VocabdriftError, match="the tokenizer has .* tokens but the model has only"):
        V._vocab_in_child([(str(big), 300)])


def test_vocabulary_child_given_up_leaves_nothing(tmp_path: Path) -> None:
    """When the pass fails, measure gives up the table's child process: it is ended and its folder removed."""
    from vocabdrift.sources import vocabulary as D

    train_bpe(tmp_path / "tok")
    job = D._VocabChild([(str(tmp_path / "tok"), 400)])
    assert job._proc.poll() is None and job._dir.is_dir()
    job.cancel()
    assert job._proc.poll() is not None and not job._dir.exists()
    done = D._VocabChild([(str(tmp_path / "tok"), 400)])
    assert done.result().num_rows == 400 and not done._dir.exists()


def test_neighbors_of_one_token_read_without_torch_equal_the_streaming_pass(smollm2_hf: Path) -> None:
    """`neighbors` of one token is a matrix-vector product: numpy, without torch's start-up; its answer equals
    the torch pass `diff` streams (ids exactly, cosines to float32 rounding). Tokens as vocabdrift prints them
    (`␣Paul`, `␣Paul (id)`) name them too."""
    from vocabdrift.api.diff import neighbors
    from vocabdrift.sources.tokenizer import load_tokenizer

    pid = load_tokenizer(smollm2_hf).convert_tokens_to_ids("ĠPaul")
    fast = neighbors(smollm2_hf, " Paul", k=15)
    slow = neighbors(smollm2_hf, " Paul", k=15, device="cpu")
    assert fast.column("neighbor_id").to_pylist() == slow.column("neighbor_id").to_pylist()
    assert np.allclose(fast.column("cos").to_numpy(), slow.column("cos").to_numpy(), atol=1e-6)
    assert pid not in fast.column("neighbor_id").to_pylist()
    for spec in ("␣Paul", f"␣Paul ({pid})", pid):
        assert neighbors(smollm2_hf, spec, k=3).column("token_id")[0].as_py() == pid
    with pytest.raises(VocabdriftError, match="not one"):  # a label whose id does not match its text
        neighbors(smollm2_hf, f"␣Paul ({pid + 1})", k=3)
    code = f"""
import sys
from vocabdrift.api.diff import neighbors
t = neighbors({str(smollm2_hf)!r}, " Paul", k=3)
assert t.num_rows == 3, t
sys.exit(1 if "torch" in sys.modules or "transformers" in sys.modules else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, "neighbors of one token imported torch or transformers: " + r.stderr[-500:]


def test_neighbors_never_lists_rows_without_direction(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """NaN, infinite and zero rows have no direction: never a neighbour (no id -1 at cos -2 either), and a token
    whose own row is broken has none, said in a warning; a finite row of 1e30s keeps its cosine."""
    from safetensors.numpy import load_file, save_file

    from vocabdrift.api.diff import neighbors

    m = make_llama(tmp_path / "m", dtype="float32")
    f = m / "model.safetensors"
    t = load_file(str(f))
    w = t["lm_head.weight"]
    w[5], w[6], w[7] = np.nan, np.inf, 0.0
    w[9] = w[8] * 1e30  # huge but finite: the same direction as row 8
    save_file(t, str(f), metadata={"format": "pt"})
    n = w.shape[0]
    got = neighbors(m, 8, k=n)
    ids = got.column("neighbor_id").to_pylist()
    assert not {5, 6, 7, -1} & set(ids) and len(ids) == n - 4  # every row but itself and the three broken ones
    assert ids[0] == 9 and got.column("cos")[0].as_py() == pytest.approx(1.0, abs=1e-6)
    assert all(-1.0 <= c <= 1.0 for c in got.column("cos").to_pylist())
    with caplog.at_level(logging.WARNING):
        assert neighbors(m, 5, k=3).num_rows == 0
    assert "no direction" in caplog.text


def test_a_rerun_of_diff_says_only_what_it_did(tmp_path: Path, cli, caplog: pytest.LogCaptureFixture) -> None:
    """The same diff again recomputes nothing, writes nothing and does not claim to; --force does both."""
    base = make_llama(tmp_path / "base", dtype="float32")
    post = plant_drift(base, tmp_path / "post", rows={40: 0.8}, tensor_suffix="lm_head.weight")
    run = tmp_path / "run"
    code, out, err = cli("diff", base, post, "-o", run)
    assert code == 0 and f"wrote {run}/" in out, err
    stamp = (run / "summary.json").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        code, out, err = cli("diff", base, post, "-o", run)
    assert code == 0 and "nothing recomputed" in caplog.text and "wrote" not in out, out
    assert (run / "summary.json").stat().st_mtime_ns == stamp
    caplog.clear()
    code, out, err = cli("diff", base, post, "-o", run, "--force")
    assert code == 0 and f"wrote {run}/" in out and "nothing recomputed" not in caplog.text
