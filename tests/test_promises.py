"""Promises kept by construction (issue: one gate for every write): each case stands for a class — a path that
would write into a model folder, a data folder, a user's folder or over a run folder's own files is refused in
one line (exit 2) before any work, and nothing is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from factory import make_llama, plant_drift

from vocabdrift.errors import VocabdriftError


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("promises")
    base = make_llama(root / "base", dtype="float32")
    post = plant_drift(base, root / "post", rows={40: 0.8}, tensor_suffix="lm_head.weight")
    other = plant_drift(base, root / "other", rows={41: 0.8}, tensor_suffix="lm_head.weight", seed=3)
    return {"root": root, "base": base, "post": post, "other": other}


def _tree(p: Path) -> dict[str, bytes]:
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def filled(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with diff and coverage (what prune-suggest reads)."""
    import vocabdrift

    run = tmp_path_factory.mktemp("filled") / "run"
    vocabdrift.diff(models["base"], models["post"], out=run)
    vocabdrift.coverage([{"text": "The quick brown fox jumps over the lazy dog."}], tokenizer=models["base"],
                        out=run, targets="all")
    return run


def test_csv_never_overwrites_a_model_file_a_run_file_or_through_a_symlink(models: dict[str, Path], filled: Path,
                                                                           tmp_path: Path, cli) -> None:
    base = models["base"]
    before, run_before = _tree(base), _tree(filled)
    link = tmp_path / "innocent.csv"
    link.symlink_to(base / "config.json")
    for target in (base / "config.json", base / "tokenizer.json", base / "new.csv", filled / "drift.parquet",
                   filled / "manifest.json", link):
        code, out, err = cli("prune-suggest", "--run", filled, "--csv", target)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "vocabdrift: error:" in err, (target, err)
    assert _tree(base) == before and _tree(filled) == run_before and link.is_symlink()
    ok = tmp_path / "prune.csv"  # a CSV anywhere else, inside the run folder too, is written
    for target in (ok, filled / "prune.csv"):
        code, out, err = cli("prune-suggest", "--run", filled, "--csv", target, "--quiet")
        assert code == 0 and target.read_text().startswith('"token_id"'), err


def test_run_folders_are_only_new_empty_or_vocabdrifts(models: dict[str, Path], tmp_path: Path, cli) -> None:
    base, post = models["base"], models["post"]
    home = tmp_path / "home"  # a user's folder: their project, `/`, $HOME
    (home / "project").mkdir(parents=True)
    (home / "summary.json").write_text('{"mine": 1}')
    (home / "notes.txt").write_text("mine")
    before = _tree(home)
    for args in (("diff", base, post, "-o", home), ("vocab", base, "-o", home), ("vocab", base, "-o", "/"),
                 ("check", base, post, "-o", home), ("undertrained", base, "-o", home, "--no-verify"),
                 ("report", "--run", home), ("check", "--run", home), ("synth", base, "-o", home / "x.jsonl",
                                                                        "--run", home)):
        code, out, err = cli(*args)
        assert code == 2 and "vocabdrift: error:" in err and len(err.strip().splitlines()) == 1, (args, err)
    assert _tree(home) == before and sorted(p.name for p in home.iterdir()) == ["notes.txt", "project",
                                                                                  "summary.json"]
    assert not any(p.name.startswith(".") for p in Path("/").iterdir() if "vocabdrift" in p.name)
    with pytest.raises(VocabdriftError, match="not a vocabdrift run folder"):  # the Python API, the same gate
        __import__("vocabdrift").diff(base, post, out=home)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = cli("diff", base, post, "-o", empty, "--quiet")
    assert code == 0 and (empty / "manifest.json").is_file(), err


def test_repair_and_lab_never_write_into_a_model_or_data_folder(models: dict[str, Path], tmp_path: Path,
                                                                cli) -> None:
    base = models["base"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    before_base, before_data = _tree(base), _tree(data)
    for args in (("repair", base, data, "-o", base / "fixed"), ("repair", base, data, "-o", data / "fixed"),
                 ("repair", base, data / "sft.jsonl", "-o", data), ("lab", "-o", base / "lab", "--quick")):
        code, out, err = cli(*args)
        assert code == 2 and ("model folder" in err or "data folder" in err or "is also an input" in err
                              or "not a vocabdrift" in err), (args, err)
    assert _tree(base) == before_base and _tree(data) == before_data


def test_a_new_pair_removes_only_what_vocabdrift_wrote(models: dict[str, Path], tmp_path: Path, cli) -> None:
    import vocabdrift

    run = tmp_path / "run"
    vocabdrift.diff(models["base"], models["post"], out=run)
    vocabdrift.report(run)
    (run / "cases.json").write_text("my own notes")  # a user's files beside ours, named like ours
    (run / "mine.txt").write_text("mine")
    code, out, err = cli("diff", models["base"], models["other"], "-o", run, "--quiet")
    assert code == 0, err
    assert not (run / "report.html").exists() and not (run / "report_files").exists()  # the old pair's report
    assert (run / "cases.json").read_text() == "my own notes" and (run / "mine.txt").read_text() == "mine"


def test_one_of_two_commands_creating_one_folder_wins_the_other_says_so(tmp_path: Path) -> None:
    from vocabdrift.atomic import new_folder

    final = tmp_path / "run"
    with pytest.raises(VocabdriftError, match="another command created it meanwhile"):
        with new_folder(final) as tmp:
            (tmp / "a").write_text("mine")
            final.mkdir()  # the other command got there first
            (final / "b").write_text("theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (final / "b").read_text() == "theirs"


def test_a_killed_commands_partial_folder_is_swept(tmp_path: Path) -> None:
    from vocabdrift.outputs.run import open_run

    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".run.partial-{dead}-abcd"
    stale.mkdir()
    (stale / "vocab.parquet").write_bytes(b"half")
    alive = tmp_path / f".run.partial-{os.getpid() + 0}-efgh"  # this process: left alone
    alive.mkdir()
    with open_run(tmp_path / "run") as r:
        r.write_json("summary.json", {})
    assert not stale.exists() and alive.exists() and (tmp_path / "run" / "summary.json").exists()


# ---- verdicts on what the model would compute ----------------------------------------------------------------------

def _edit(folder: Path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    f = folder / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})


def test_check_fails_rows_the_tokenizer_can_emit_but_post_lacks(models: dict[str, Path], tmp_path: Path,
                                                                cli) -> None:
    import shutil

    short = tmp_path / "short"
    shutil.copytree(models["post"], short)
    _edit(short, lambda t: t.update({k: v[:-10] for k, v in t.items() if v.ndim == 2 and v.shape[0] > 300}))
    code, out, err = cli("check", models["base"], short)
    assert code == 1 and "tokens the tokenizer can emit have no row in both models" in out, out + err
    run = tmp_path / "run"
    code, out, err = cli("check", models["base"], short, "-o", run)
    assert code == 1
    code, out, err = cli("check", "--run", run)  # the run folder keeps the fact: the gate still fails
    assert code == 1 and "have no row" in out


def test_check_fails_a_final_norm_of_nan(models: dict[str, Path], tmp_path: Path, cli) -> None:
    import shutil

    import numpy as np

    nan = tmp_path / "nan"
    shutil.copytree(models["base"], nan)  # every lm_head row as in BASE: only the norm is broken
    _edit(nan, lambda t: t["model.norm.weight"].__setitem__(0, np.nan))
    code, out, err = cli("check", models["base"], nan)
    assert code == 1 and "final norm of POST holds NaN/Inf" in out, out + err


def test_weights_are_read_from_the_file_transformers_loads(models: dict[str, Path], tmp_path: Path, cli) -> None:
    """A stale shard index beside model.safetensors: transformers loads model.safetensors, and so does vocabdrift."""
    import shutil

    stale = tmp_path / "post"
    shutil.copytree(models["post"], stale)
    shutil.copy(models["base"] / "model.safetensors", stale / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(stale / "model.safetensors"), "np") as f:
        names = list(f.keys())
    (stale / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}))
    code, out, err = cli("check", models["base"], stale, "--max-below", "0.99:0")
    assert code == 1, "read the stale shards (BASE's rows) instead of model.safetensors (POST's)"


def test_tampered_run_tables_are_refused_not_passed(models: dict[str, Path], tmp_path: Path, cli) -> None:
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    import vocabdrift

    good = tmp_path / "good"
    vocabdrift.diff(models["base"], models["post"], out=good)
    for name, change in (("five", lambda t: t.set_column(t.column_names.index("lm_head_cos"), "lm_head_cos",
                                                        pa.array([5.0] * t.num_rows))),
                         ("strings", lambda t: t.set_column(t.column_names.index("lm_head_cos"), "lm_head_cos",
                                                           pa.array(["x"] * t.num_rows))),
                         ("nocol", lambda t: t.drop_columns(["lm_head_cos"])),
                         ("ids-past-the-vocab", lambda t: t.set_column(0, "token_id",
                                                                        pa.array(range(10**6, 10**6 + t.num_rows))))):
        run = tmp_path / name
        shutil.copytree(good, run)
        pq.write_table(change(pq.read_table(run / "drift.parquet")), run / "drift.parquet")
        code, out, err = cli("check", "--run", run)
        assert code == 2 and "vocabdrift: error:" in err and ("drift" in err), (name, code, out, err)


# ---- bounded, and bad input is exit 2 --------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_pipes_are_refused_never_read(models: dict[str, Path], tmp_path: Path, cli) -> None:
    import shutil

    fifo_model = tmp_path / "fifo_model"
    shutil.copytree(models["post"], fifo_model)
    (fifo_model / "model.safetensors").unlink()
    os.mkfifo(fifo_model / "model.safetensors")
    for args in (("check", models["base"], fifo_model), ("diff", models["base"], fifo_model, "-o", tmp_path / "r"),
                 ("vocab", fifo_model, "-o", tmp_path / "v")):
        code, out, err = cli(*args)
        assert code == 2 and "not a regular file" in err, (args, err)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    os.mkfifo(data / "b.jsonl")
    code, out, err = cli("coverage", data, "--tokenizer", models["base"], "-o", tmp_path / "c", "--json")
    assert code == 0 and json.loads(out)["samples"] == 1, err  # the pipe among the files is not data
    code, out, err = cli("coverage", data / "b.jsonl", "--tokenizer", models["base"], "-o", tmp_path / "d")
    assert code == 2 and "not a regular file" in err


def _dangling(tmp_path: Path) -> Path:
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere" / "run")
    return link


def test_bad_input_is_one_line_and_exit_2(models: dict[str, Path], filled: Path, tmp_path: Path, cli) -> None:
    sft = tmp_path / "sft.jsonl"  # a BOM, a 5000-digit integer, then a good record
    sft.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first record"}).encode() + b"\n"
                    + b'{"text": "x", "n": ' + b"9" * 5000 + b"}\n" + json.dumps({"text": "last"}).encode() + b"\n")
    code, out, err = cli("coverage", sft, "--tokenizer", models["base"], "-o", tmp_path / "cov", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["samples"] == 2 and doc["malformed"] == 1  # the BOM'd first record read, the huge number skipped
    tokens = tmp_path / "tokens.txt"
    tokens.write_bytes(b"\xef\xbb\xbf40\n41\n")
    from vocabdrift.api.probe import read_token_file

    assert read_token_file(tokens) == ["40", "41"]
    for args, words in ((("check", "--run", filled, "--top", str(2 ** 63)), "too large"),
                        (("mix", sft, sft, "-o", tmp_path / "m.jsonl.gz"), "plain JSON lines"),
                        (("synth", models["base"], "-o", tmp_path / "s.jsonl", "--min-per-token", "1000000000"),
                         "at most"),
                        (("diff", models["base"], models["post"], "-o", tmp_path / ("x" * 300)), "255 bytes"),
                        (("repair", models["base"], sft, "-o", tmp_path / "rep", "--device", "cuda:7"), "--device"),
                        (("diff", models["base"], models["post"], "-o", _dangling(tmp_path)), "does not exist"),
                        (("diff", "x" * 300, models["base"], "-o", tmp_path / "z"), "too long")):
        code, out, err = cli(*args)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "m.jsonl.gz").exists() and not (tmp_path / "rep").exists()


def test_a_command_of_another_model_never_poisons_a_run_folder(models: dict[str, Path], filled: Path, tmp_path: Path,
                                                               cli) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(filled, run)
    before = _tree(run)
    for args in (("undertrained", models["other"], "--run", run, "--no-verify"),
                 ("vocab", models["other"], "-o", run),
                 ("cases", models["other"], "--run", run, "--max-tokens", "2"),
                 ("probe", models["other"], "--run", run, "--token", "40")):
        code, out, err = cli(*args)
        assert code == 2 and "is neither" in err, (args, err)
    assert _tree(run) == before
    code, out, err = cli("report", "--run", run, "--quiet")  # still reportable
    assert code == 0, err
    code, out, err = cli("undertrained", models["post"], "--run", run, "--no-verify", "--quiet")  # its own: fine
    assert code == 0, err


@pytest.mark.timeout(300)
def test_generation_is_bounded_by_the_models_context(models: dict[str, Path], tmp_path: Path, cli) -> None:
    """--max-tokens 1e9 stops at the model's context (128 positions here); a prompt longer than it is refused."""
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"prompt": "Say hello.", "expected": "hello"}) + "\n")
    code, out, err = cli("cases", models["base"], cases, "--max-tokens", "1000000000", "--json")
    assert code in (0, 1), err  # pass or fail, the answer came back within the context
    answer = json.loads(out)["cases"][0]["output"]  # here at all: a billion tokens would never have come back
    from vocabdrift.engines.hf import HFEngine

    eng = HFEngine(models["base"])
    prompt = len(eng.render("Say hello."))
    ids = eng.model.generate(__import__("torch").tensor([eng.render("Say hello.")]), do_sample=False,
                             max_new_tokens=128 - prompt, pad_token_id=eng.tokenizer.eos_token_id)
    assert answer == eng.tokenizer.decode(ids[0, prompt:], skip_special_tokens=True)  # exactly the context's worth
    cases.write_text(json.dumps({"prompt": "word " * 200_000, "expected": "x"}) + "\n")
    code, out, err = cli("cases", models["base"], cases)
    assert code == 2 and "does not fit the model's context of 128" in err


@pytest.mark.timeout(120)
def test_an_endless_answer_from_an_endpoint_is_cut_not_read_whole() -> None:
    """A real HTTP server on 127.0.0.1 that streams without end: the client stops at its size limit."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from vocabdrift.engines import openai as O

    class Endless(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            chunk = b"x" * (1 << 20)
            try:
                while True:
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        eng = O.OpenAIEngine(f"http://127.0.0.1:{server.server_port}", model="m", timeout=60)
        with pytest.raises(VocabdriftError, match="larger than 64 MiB"):
            eng._post("/chat/completions", {"model": "m"})
    finally:
        server.shutdown()


def test_broken_rows_are_attributed_to_their_matrix_and_huge_finite_rows_measured(models: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    """Inf in an lm_head row is that row's lm_head, not its embedding; a finite row of 1e30s is measured (in
    float64), never called NaN/Inf."""
    import shutil

    import numpy as np

    post = tmp_path / "post"
    shutil.copytree(models["base"], post)

    def edit(t: dict) -> None:
        w = t["lm_head.weight"]
        w[8] = w[8] * np.float32(1e30)  # the same direction, far too large to square in float32
        w[9, 0] = np.inf
    _edit(post, edit)
    from vocabdrift.api.diff import measure

    m = measure(models["base"], post)
    d = m.drift.to_pydict()
    assert d["lm_head_cos"][8] == pytest.approx(1.0, abs=1e-6) and not d["lm_head_nonfinite"][8]
    assert d["lm_head_norm_post"][8] == pytest.approx(1e30 * d["lm_head_norm_base"][8], rel=1e-5)
    assert d["lm_head_nonfinite"][9] and d["nonfinite"][9] and np.isnan(d["lm_head_cos"][9])
    assert not d["embed_nonfinite"][9] and d["embed_cos"][9] == pytest.approx(1.0)
    from vocabdrift.analyses.drift import undefined_rows

    assert undefined_rows(m.drift, "lm_head")[9] and not undefined_rows(m.drift, "embed")[9]
    assert not undefined_rows(m.drift, "lm_head")[8]


def test_a_model_with_nan_logits_is_broken_in_every_verdict(models: dict[str, Path], tmp_path: Path, cli) -> None:
    """probe reports NaN logits as broken (never top1, never sayable; JSON null, not a bare NaN), confusion refuses
    to sample, check fails."""
    import shutil

    import numpy as np

    nan = tmp_path / "nan"
    shutil.copytree(models["base"], nan)
    _edit(nan, lambda t: t["model.norm.weight"].__setitem__(slice(None), np.nan))
    code, out, err = cli("probe", nan, "--token", "40", "-o", tmp_path / "p", "--template", "fewshot_en", "--json")
    assert code == 0, err
    assert "NaN" not in out
    doc = json.loads(out)
    assert doc["outcomes"]["nan"]["broken"] == 1 and doc["outcomes"]["nan"]["top1"] == 0
    assert not any(r["sayable"] for r in doc["per_token"])
    code, out, err = cli("confusion", nan, "-n", "1", "--max-tokens", "3")
    assert code == 2 and "NaN/Inf" in err, err
    code, out, err = cli("cases", nan, "--max-tokens", "3")  # greedy decoding would take an argmax of NaN
    assert code == 2 and "NaN/Inf" in err, err
    code, out, err = cli("check", models["base"], nan)
    assert code == 1


def test_base_and_post_with_different_tokenizers_are_refused(models: dict[str, Path], tmp_path: Path, cli) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(models["post"], other)
    doc = json.loads((other / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids name each other's token
    (other / "tokenizer.json").write_text(json.dumps(doc, indent=2))
    code, out, err = cli("check", models["base"], other)
    assert code == 2 and "different tokenizers" in err, err
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same vocabulary, saved another way: fine
    (other / "tokenizer.json").write_text(json.dumps(doc, indent=4))
    code, out, err = cli("check", models["base"], other, "--quiet")
    assert code in (0, 1), err


def test_a_damaged_manifest_is_one_line(models: dict[str, Path], filled: Path, tmp_path: Path, cli) -> None:
    import shutil

    for name, change in (("files-a-list", lambda m: m | {"files": [1, 2]}),
                         ("pair-a-string", lambda m: m | {"pair": "x"}),
                         ("stamp-a-number", lambda m: m | {"files": {"drift.parquet": 3}})):
        run = tmp_path / name
        shutil.copytree(filled, run)
        m = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps(change(m)))
        for args in (("check", "--run", run), ("report", "--run", run), ("diff", models["base"], models["post"],
                                                                          "-o", run)):
            code, out, err = cli(*args)
            assert code == 2 and "manifest" in err and len(err.strip().splitlines()) == 1, (name, args, err)


def test_the_fused_bf16_pass_attributes_and_measures_the_same(tmp_path: Path) -> None:
    """The same two rows through the fused bf16 pass (sums in float64): a row of 1e30s measured, Inf attributed."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from vocabdrift.api.diff import measure

    base = make_llama(tmp_path / "base")  # bfloat16: the fused pass on a CPU
    post = tmp_path / "post"
    shutil.copytree(base, post)
    t = load_file(str(post / "model.safetensors"))
    assert t["lm_head.weight"].dtype == torch.bfloat16
    t["lm_head.weight"][8] *= 1e30
    t["lm_head.weight"][9, 0] = float("inf")
    save_file(t, str(post / "model.safetensors"), metadata={"format": "pt"})
    d = measure(base, post, device="cpu").drift.to_pydict()
    assert d["lm_head_cos"][8] == pytest.approx(1.0, abs=1e-5) and not d["lm_head_nonfinite"][8]
    assert d["lm_head_nonfinite"][9] and not d["embed_nonfinite"][9] and d["embed_cos"][9] == pytest.approx(1.0)


def test_check_fails_a_nan_in_any_layer(models: dict[str, Path], tmp_path: Path, cli) -> None:
    """Every weight of POST is read (a chunk at a time): a NaN deep in a layer makes every logit NaN, whatever the
    vocabulary rows say."""
    import shutil

    import numpy as np

    nan = tmp_path / "nan"
    shutil.copytree(models["base"], nan)  # every vocabulary row and the norm as in BASE
    layer = "model.layers.0.mlp.down_proj.weight"
    _edit(nan, lambda t: t[layer].__setitem__((0, 0), np.nan))
    code, out, err = cli("check", models["base"], nan)
    assert code == 1 and f"POST's weights hold NaN/Inf in 1 tensor(s) (first: {layer}" in out, out + err
    run = tmp_path / "run"
    code, out, err = cli("check", models["base"], nan, "-o", run)
    code, out, err = cli("check", "--run", run)  # kept in the run folder: the gate still fails
    assert code == 1 and layer in out


def test_an_ascii_terminal_gets_escapes_not_a_crash(models: dict[str, Path]) -> None:
    """PYTHONIOENCODING=ascii (or a C locale): tokens that cannot be printed show as escapes; exit 0, not 70."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vocabdrift.cli", "vocab", models["base"], "-o", "/dev/null/x"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1  # bad input stays one line
    r = subprocess.run([sys.executable, "-m", "vocabdrift.cli", "neighbors", models["post"], "40", "--base",
                        models["base"], "-k", "20"], capture_output=True, env={**os.environ,
                                                                             "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0, r.stderr
    r.stdout.decode("ascii")  # every byte ASCII: what cannot be shown is escaped
    assert b"\\u2423" in r.stdout  # the visible space of a token label, escaped
