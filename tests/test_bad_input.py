"""Bad input gets one clear line on stderr, exit code 2, no traceback, and no half-written run folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from factory import make_llama


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vocabdrift.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("good") / "m", dtype="float32")


def _assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("WARNING")]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vocabdrift: error: ") and "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _no_run(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def test_missing_file(tmp_path: Path, good: Path) -> None:
    out = tmp_path / "run"
    r = _cli("diff", good, tmp_path / "nope.safetensors", "-o", out)
    _assert_one_line_error(r, "nope.safetensors", "no such file")
    _no_run(out)


def test_truncated_safetensors(tmp_path: Path, good: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "run"
    _assert_one_line_error(_cli("diff", good, bad, "-o", out), "model.safetensors", "truncated")
    _no_run(out)


def test_header_that_lies(tmp_path: Path, good: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes((10**9).to_bytes(8, "little") + data[8:])
    out = tmp_path / "run"
    _assert_one_line_error(_cli("diff", good, bad, "-o", out), "header claims")
    _no_run(out)


def test_folder_without_weights(tmp_path: Path, good: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    out = tmp_path / "run"
    _assert_one_line_error(_cli("diff", good, empty, "-o", out), "no weights found")
    _no_run(out)


def test_hidden_size_mismatch(tmp_path: Path, good: Path) -> None:
    other = make_llama(tmp_path / "other", hidden=64, dtype="float32", tokenizer_from=good)
    out = tmp_path / "run"
    _assert_one_line_error(_cli("diff", good, other, "-o", out), "hidden sizes differ")
    _no_run(out)


def test_vocabulary_mismatch(tmp_path: Path, good: Path) -> None:
    """A tokenizer with more tokens than the model has rows belongs to another model."""
    big = tmp_path / "bigtok"
    from factory import TEXTS, train_bpe

    train_bpe(big, vocab_size=1500, texts=[*TEXTS, "zebra quokka axolotl narwhal " * 40,
                                           "".join(chr(0x4E00 + i) for i in range(900))])
    out = tmp_path / "run"
    _assert_one_line_error(_cli("diff", good, good, "-o", out, "--tokenizer", big / "tokenizer.json"),
                           "tokenizer has", "--tokenizer")
    _no_run(out)


def test_pickle_refused_then_allowed(tmp_path: Path, good: Path) -> None:
    import torch
    from safetensors.torch import load_file

    pk = tmp_path / "pk"
    pk.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(good / f, pk / f)
    torch.save(load_file(str(good / "model.safetensors")), pk / "pytorch_model.bin")
    out = tmp_path / "run"
    _assert_one_line_error(_cli("diff", good, pk, "-o", out), "pickle", "--allow-pickle")
    _no_run(out)
    r = _cli("diff", good, pk, "-o", out, "--allow-pickle")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["overall"]["lm_head"]["min_cos"] == pytest.approx(1.0, abs=1e-6)  # same weights


def test_existing_file_as_out(tmp_path: Path, good: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    _assert_one_line_error(_cli("diff", good, good, "-o", f), "not a folder")
