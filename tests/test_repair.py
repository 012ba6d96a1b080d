"""`vocabdrift repair` end to end on a tiny Llama: the remedies reach training, and the run folder is complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from factory import make_llama

from vocabdrift.composites.repair import repair
from vocabdrift.composites.train import CHAT_TEMPLATE
from vocabdrift.errors import VocabdriftError

pytestmark = pytest.mark.slow

ENGLISH = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x + 1",
           "numbers 12345 and 67890", "The fox and the dog are friends."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repair")
    base = make_llama(root / "base", dtype="float32")
    cfg = json.loads((base / "tokenizer_config.json").read_text())  # sft needs a chat template and a pad token
    cfg.update(chat_template=CHAT_TEMPLATE, pad_token="<|endoftext|>")
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = root / "sft.jsonl"
    with data.open("w") as f:
        for i in range(24):
            msg = [{"role": "user", "content": f"Say something {i}"},
                   {"role": "assistant", "content": ENGLISH[i % len(ENGLISH)]}]
            f.write(json.dumps({"messages": msg}) + "\n")
        f.write("{not json\n")  # a malformed line is skipped and counted, not fatal
    replay = root / "pretrain.jsonl"
    replay.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Привет, как дела?", "مرحبا بكم")))
    return {"root": root, "base": base, "data": data, "replay": replay}


def _run(setup: dict[str, Path], name: str, **kw: object) -> tuple[Path, dict]:
    out = setup["root"] / name
    repair(setup["base"], setup["data"], out=out, steps=kw.pop("steps", 6), batch_size=4, max_length=64,
           progress=False, **kw)  # type: ignore[arg-type]
    return out, json.loads((out / "summary.json").read_text())


def _arabic_cos(out: Path) -> np.ndarray:
    d = pq.read_table(out / "drift.parquet").to_pandas()
    v = pq.read_table(out / "vocab.parquet").to_pandas()
    j = d.merge(v, on="token_id")
    j = j[(j.category == "arabic") & j.reachable & ~j.is_special]
    assert len(j) > 0
    return j.lm_head_cos.to_numpy()


def test_repair_with_coverage_writes_a_complete_run(setup: dict[str, Path]) -> None:
    out, s = _run(setup, "cov", coverage="auto", min_per_token=1, every=3)
    for f in ("model/config.json", "model/tokenizer.json", "coverage.jsonl", "vocab.parquet", "drift.parquet",
              "summary.json", "manifest.json"):
        assert (out / f).exists(), f
    rep = s["repair"]
    assert rep["cost"]["sft_records"] == 24 and rep["cost"]["coverage_records"] > 0
    assert rep["cost"]["coverage_tokens"] > 0 and rep["remedies"]["coverage"]["source"] == "auto"
    assert [h["step"] for h in rep["callback"]["history"]] == [0, 3, 6]
    # the callback's last numbers are diff's numbers: the same rows, read back from the saved model
    last = rep["callback"]["history"][-1]
    assert last["vocabdrift/lm_head/mean_cos"] == pytest.approx(s["reachable"]["lm_head"]["mean_cos"], abs=1e-4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["commands"][-1]["command"] == "repair"


def test_freeze_and_gate_reach_training(setup: dict[str, Path]) -> None:
    frozen, s = _run(setup, "frozen", coverage=None, freeze=["lm_head"])
    cos = pq.read_table(frozen / "drift.parquet").column("lm_head_cos").to_numpy()
    assert np.nanmin(cos) > 0.999999  # lm_head did not move at all
    assert s["overall"]["embed"]["min_cos"] < 0.9999  # while the rest trained
    plain_out, _ = _run(setup, "plain", coverage=None, lr=5e-3)
    gated_out, _ = _run(setup, "gated", coverage=None, lr=5e-3, gate=True)
    # Arabic never appears in the data: plain SFT pushes its rows down, gating leaves their direction alone
    assert _arabic_cos(plain_out).min() < 0.999
    assert _arabic_cos(gated_out).min() > 0.99999


def test_replay_and_anchor_are_recorded(setup: dict[str, Path]) -> None:
    out, s = _run(setup, "replay", coverage=None, replay=setup["replay"], replay_ratio=0.2, anchor=0.1)
    rep = s["repair"]["remedies"]
    assert rep["replay"] == {"source": str(setup["replay"]), "ratio": 0.2} and rep["anchor"] == 0.1


def test_bad_input(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(VocabdriftError, match="choose from"):
        repair(setup["base"], setup["data"], out=tmp_path / "a", freeze=["norm"], coverage=None)
    with pytest.raises(VocabdriftError, match="no such file"):
        repair(setup["base"], setup["data"], out=tmp_path / "b", coverage=tmp_path / "missing.jsonl")
    for kw, what in ((dict(anchor=float("nan")), "--anchor"), (dict(lr=float("inf")), "--lr"),
                     (dict(coverage_share=1.0), "--coverage-share"), (dict(stop_below=2.0), "--stop-below"),
                     (dict(replay_ratio=float("nan")), "--replay-ratio")):
        with pytest.raises(VocabdriftError, match=what):
            repair(setup["base"], setup["data"], out=tmp_path / "n", coverage=None, **kw)  # type: ignore[arg-type]
        assert not (tmp_path / "n").exists()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    r = subprocess.run([sys.executable, "-m", "vocabdrift.cli", "repair", str(setup["base"]),
                        str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "c"), "--coverage", "none"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("vocabdrift: error:") and "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists()


def test_cli_repair(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "vocabdrift.cli", "repair", str(setup["base"]), str(setup["data"]),
                        "-o", str(out), "--coverage", "none", "--steps", "2", "--batch-size", "4",
                        "--max-length", "64", "--anchor", "0.01", "--gate"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}/" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["repair"]["remedies"]["gate"] is True and (out / "model" / "config.json").exists()


def test_callback_stops_a_hot_repair(setup: dict[str, Path]) -> None:
    out, s = _run(setup, "hot", coverage=None, lr=0.5, steps=20, every=1, stop_below=0.5)
    stopped = s["repair"]["training"]["stopped"]
    assert stopped and "stop_below=0.5" in stopped
    steps = [h["step"] for h in s["repair"]["callback"]["history"]]
    assert steps[-1] < 20 and (out / "model" / "config.json").exists()  # stopped early, model still saved
    assert s["overall"]["lm_head"]["min_cos"] < 0.5


def test_repair_under_torchrun_trains_on_two_processes_and_writes_once(setup: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """Several GPUs go through torchrun / `accelerate launch`: the same code on 2 CPU processes (DDP over gloo)."""
    from safetensors.numpy import load_file

    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "vocabdrift.cli", "repair",
                        str(setup["base"]), str(setup["data"]), "-o", str(out), "--coverage", "auto",
                        "--min-per-token", "1", "--steps", "3", "--batch-size", "2", "--max-length", "64",
                        "--anchor", "0.01", "--gate"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["repair"]["training"]["processes"] == 2
    assert s["repair"]["cost"]["coverage_records"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # one run folder, nothing half-written beside it
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    # the model the processes trained together, measured by the main process: equal to numpy on the files
    base = load_file(setup["base"] / "model.safetensors")["lm_head.weight"].astype(np.float64)
    post = load_file(out / "model" / "model.safetensors")["lm_head.weight"].astype(np.float64)
    assert not np.array_equal(base, post)
    cos = (base * post).sum(1) / (np.linalg.norm(base, axis=1) * np.linalg.norm(post, axis=1))
    d = pq.read_table(out / "drift.parquet")
    np.testing.assert_allclose(d.column("lm_head_cos").to_numpy(), cos[d.column("token_id").to_numpy()], atol=1e-5)


def test_a_lower_coverage_weight_keeps_that_share_of_targets(setup: dict[str, Path]) -> None:
    """`coverage_weight` (encode_records' weights): each target of a weighted record stays a target with that
    probability, seeded; other records and a weight of 1 are untouched."""
    from vocabdrift.composites.train import encode_records
    from vocabdrift.sources.tokenizer import load_tokenizer

    tok = load_tokenizer(setup["base"])
    recs = [{"messages": [{"role": "user", "content": f"Repeat {i}"},
                          {"role": "assistant", "content": " ".join(ENGLISH) * 2}]} for i in range(40)]
    full = encode_records(tok, recs, max_length=512)
    half = encode_records(tok, recs, max_length=512, weights=[1.0] * 20 + [0.5] * 20, seed=3)
    again = encode_records(tok, recs, max_length=512, weights=[1.0] * 20 + [0.5] * 20, seed=3)
    n = [sum(x != -100 for x in r["labels"][1:]) for r in full]
    m = [sum(x != -100 for x in r["labels"][1:]) for r in half]
    assert m[:20] == n[:20] and half == again  # unweighted records unchanged; the same seed, the same mask
    kept = sum(m[20:]) / sum(n[20:])
    assert 0.4 < kept < 0.6  # about half of the weighted records' targets
    # a kept label is the token itself, a dropped one -100: the inputs never change
    assert all(a["input_ids"] == b["input_ids"] for a, b in zip(full, half, strict=True))
    with pytest.raises(VocabdriftError, match="coverage-weight"):
        repair(setup["base"], setup["data"], out=setup["root"] / "w", coverage_weight=0.0)
