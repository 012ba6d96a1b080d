"""Every promise of the README under hostile or careless input, command by command, through the real CLI.

The promises: bad input gets one line on stderr and exit code 2; `check` exits 0 pass, 1 fail (and a destroyed
model fails); an unexpected error is a bug with its own code (70), never 1; run folders appear only on success;
model folders and inputs are never written to; pickles never run; SIGTERM cleans up like Ctrl-C.

Each row of a table below is one case: it builds its inputs, runs `vocabdrift ...` in a subprocess, and asserts
the exit code, a single stderr line without a traceback, and that nothing appeared where it must not (no run
folder, no partial folder, no change inside a model folder).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from factory import free_port, make_llama

EXE = [str(Path(sys.executable).with_name("vocabdrift"))]
if not Path(EXE[0]).exists():  # not installed as a script: the same entry point through the module
    EXE = [sys.executable, "-m", "vocabdrift.cli"]


def cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess[str]:
    """`vocabdrift ARGS...`: in this process (`conftest.run_cli`, no torch import per case) unless the case sets
    the environment, which libraries read when imported (the hub's address): then in a subprocess."""
    if env is None:
        from conftest import run_cli

        return run_cli(*args)
    full_env = {**os.environ, **(env or {})}
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)
    return subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=full_env)


def error_lines(stderr: str) -> list[str]:
    """stderr without the logging module's WARNING lines (libraries' and ours, which are not errors)."""
    return [x for x in stderr.strip().splitlines() if x.strip() and not x.startswith("WARNING")]


def assert_one_line(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    if code == 2:
        assert lines[0].startswith("vocabdrift: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under the folders with its size and modification time: equal before and after = untouched."""
    out = {}
    for f in folders:
        if not f.exists():
            continue
        for p in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if p.is_symlink() or not p.exists():
                out[str(p)] = (-1, -1)
                continue
            st = p.stat()
            out[str(p)] = (st.st_size if p.is_file() else -2, st.st_mtime_ns)
    return out


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    if out.parent.exists():
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not left, f"left behind: {left}"


# ---- the inputs -------------------------------------------------------------------------------------------------

@dataclass
class Models:
    root: Path
    base: Path  # float32 Llama folder, 400 tokens, hidden 32
    post: Path  # BASE with a few lm_head rows turned
    base16: Path  # the same in bf16
    data: Path  # a folder of good SFT data
    syn: Path  # a synthetic set in the same shape
    extra: dict[str, Path] = field(default_factory=dict)


GOOD = {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello there"}]}


def _copy_with(src: Path, dst: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> Path:
    """A copy of a model folder whose model.safetensors went through `edit` (tensors as numpy, changed in place)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("hostile")
    base = make_llama(root / "base", dtype="float32")

    def turn(sd: dict[str, np.ndarray]) -> None:
        sd["lm_head.weight"][[40, 41, 42]] *= -1

    post = _copy_with(base, root / "post", turn)
    base16 = make_llama(root / "base16", dtype="bfloat16", tokenizer_from=base)
    data = root / "sft"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(json.dumps(GOOD) + "\n" for _ in range(20)))
    syn = root / "syn.jsonl"
    syn.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Repeat: w{i}"},
                                                    {"role": "assistant", "content": f"w{i} w{i}"}]}) + "\n"
                           for i in range(10)))
    return Models(root, base, post, base16, data, syn)


# ---- 1. a destroyed model must fail the gate --------------------------------------------------------------------

def _zero_lm_head(sd: dict[str, np.ndarray]) -> None:
    sd["lm_head.weight"][:] = 0


def _nan_lm_head_rows(sd: dict[str, np.ndarray]) -> None:
    sd["lm_head.weight"][50:60, 3] = np.nan


def _nan_embed_rows(sd: dict[str, np.ndarray]) -> None:
    sd["model.embed_tokens.weight"][50:60] = np.nan


ZEROED = list(range(300, 310))  # merged pieces, reachable: judged by the default population


def _zero_some_rows(sd: dict[str, np.ndarray]) -> None:
    sd["lm_head.weight"][ZEROED] = 0


GATE_CASES = [
    # (id, which side is changed, edit, extra arguments, expected exit, words of the verdict)
    ("post-all-zero-min-cos", "post", _zero_lm_head, ["--min-cos", "0.99"], 1, ["FAIL", "became zero"]),
    ("post-all-zero-default-rule", "post", _zero_lm_head, [], 1, ["FAIL", "zero or NaN"]),
    ("post-all-zero-share-rule", "post", _zero_lm_head, ["--max-below", "0.5:50%"], 1, ["FAIL"]),
    ("post-ten-zero-rows", "post", _zero_some_rows, ["--max-below", "0.9:5"], 1,
     ["FAIL", "rows became zero (first id 300)"]),
    ("post-nan-rows", "post", _nan_lm_head_rows, ["--min-cos", "-1"], 1, ["FAIL", "NaN/Inf"]),
    ("post-nan-embed-rows", "post", _nan_embed_rows, ["--space", "embed", "--min-cos", "-1"], 1, ["FAIL", "NaN"]),
    ("base-all-zero", "base", _zero_lm_head, ["--min-cos", "0.5"], 1, ["FAIL", "became zero"]),
    ("zero-in-both-is-unchanged", "both", _zero_some_rows, ["--min-cos", "0.99"], 0, ["PASS"]),
]


@pytest.mark.parametrize(("side", "edit", "extra", "code", "words"), [c[1:] for c in GATE_CASES],
                         ids=[c[0] for c in GATE_CASES])
def test_check_fails_a_destroyed_model(m: Models, tmp_path: Path, side: str, edit: Callable, extra: list[str],
                                       code: int, words: list[str]) -> None:
    base = _copy_with(m.base, tmp_path / "b", edit) if side in ("base", "both") else m.base
    post = _copy_with(m.base, tmp_path / "p", edit) if side in ("post", "both") else m.base
    before = snapshot(base, post)
    r = cli("check", base, post, *extra)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and not error_lines(r.stderr), r.stderr
    verdict = r.stdout.strip().splitlines()[0]
    for w in words:
        assert w in verdict, verdict
    assert snapshot(base, post) == before


def test_diff_reports_zero_rows_with_a_count(m: Models, tmp_path: Path) -> None:
    post = _copy_with(m.base, tmp_path / "p", _zero_some_rows)
    out = tmp_path / "run"
    r = cli("diff", m.base, post, "-o", out, "--top", "5")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["overall"]["lm_head"]["undefined"] == 10 and s["undefined_rows"]["lm_head"] == ZEROED
    assert s["overall"]["lm_head"]["below_threshold"] >= 10 and s["overall"]["embed"]["undefined"] == 0
    assert "zero/NaN" in r.stdout and "undefined" in r.stdout  # the table's column, the drifted rows' cosine
    rep = cli("report", "--run", out)
    assert rep.returncode == 0, rep.stderr
    assert "became zero or NaN" in (out / "report.md").read_text()


@pytest.mark.parametrize("fused", [False, True], ids=["float32-pass", "fused-bf16-pass"])
def test_both_passes_count_destroyed_rows_alike(m: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                fused: bool) -> None:
    """The fused bf16 pass (numba) is for large matrices; forced on (threshold 0) or off, both judge alike."""
    from safetensors.torch import load_file, save_file

    import vocabdrift.api.diff as D
    from vocabdrift.api.check import check

    post = tmp_path / "p16"
    shutil.copytree(m.base16, post)
    sd = load_file(str(post / "model.safetensors"))
    sd["lm_head.weight"][100:110] = 0
    sd["lm_head.weight"][200:203, 1] = float("nan")
    save_file(sd, str(post / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(D, "FUSED_MIN_ELEMENTS", 0 if fused else 1 << 62)
    m16 = D.measure(m.base16, post)
    fused_step = D.FUSED_BLOCK_BYTES // (2 * 32)  # the fused pass's own block: proof it ran (or did not)
    assert (m16.info["block_rows"]["lm_head"] == fused_step) == fused
    s = m16.summary()
    assert s["undefined_rows"]["lm_head"] == [*range(100, 110), 200, 201, 202]
    assert s["nonfinite_rows"] == [200, 201, 202]
    r = check(m.base16, post, min_cos=-1.0, population="all")
    assert not r.passed and set(r.undefined) == {*range(100, 110), 200, 201, 202}
    assert r.verdict.startswith("FAIL lm_head: 3 rows hold NaN/Inf (first id 200); 10 rows became zero")


# ---- 2. headers and folders that lie ----------------------------------------------------------------------------

def _st_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_write(path: Path, header: object, data: bytes, *, raw_header: bytes | None = None) -> None:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


def _header_edit(fn: Callable[[dict, bytes], tuple[object, bytes] | bytes]) -> Callable[[Path], None]:
    """A case that rewrites POST's model.safetensors: `fn(header, data)` gives (new header, data) or raw bytes of
    a header that is not JSON."""

    def make(folder: Path) -> None:
        f = folder / "model.safetensors"
        header, data = _st_parts(f)
        got = fn(header, data)
        if isinstance(got, bytes):
            _st_write(f, None, data, raw_header=got)
        else:
            _st_write(f, got[0], got[1])

    return make


def _lm(h: dict) -> dict:
    return h["lm_head.weight"]


def _negative_offsets(h: dict, d: bytes) -> tuple[dict, bytes]:
    _lm(h)["data_offsets"] = [-64, _lm(h)["data_offsets"][1] - 64]
    return h, d


def _ten_times_the_rows(h: dict, d: bytes) -> tuple[dict, bytes]:
    _lm(h)["shape"] = [_lm(h)["shape"][0] * 10, _lm(h)["shape"][1]]
    return h, d


def _overlap(h: dict, d: bytes) -> tuple[dict, bytes]:
    e = h["model.embed_tokens.weight"]
    _lm(h)["data_offsets"] = list(e["data_offsets"])  # the same bytes twice: and another range never read
    return h, d


def _set(key: str, value: object, name: str = "lm_head.weight") -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def fn(h: dict, d: bytes) -> tuple[dict, bytes]:
        if value is _DROP:
            del h[name][key]
        else:
            h[name][key] = value
        return h, d
    return fn


_DROP = object()


def _st_is_a_folder(f: Path) -> None:
    (f / "model.safetensors").unlink()
    (f / "model.safetensors").mkdir()


def _st_symlink_loop(f: Path) -> None:
    (f / "model.safetensors").unlink()
    (f / "loop-a.safetensors").symlink_to(f / "loop-b.safetensors")
    (f / "loop-b.safetensors").symlink_to(f / "loop-a.safetensors")
    (f / "model.safetensors").symlink_to(f / "loop-a.safetensors")


def _index_to(target: str) -> Callable[[Path], None]:
    def make(f: Path) -> None:
        header, _ = _st_parts(f / "model.safetensors")
        (f / "model.safetensors").rename(f / "model-00001-of-00001.safetensors")
        wm = {k: "model-00001-of-00001.safetensors" for k in header if k != "__metadata__"}
        wm["lm_head.weight"] = target
        (f / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return make


def _write(name: str, text: str) -> Callable[[Path], None]:
    def make(f: Path) -> None:
        (f / name).write_text(text)
    return make


def _index_only(text: str) -> Callable[[Path], None]:
    def make(f: Path) -> None:
        (f / "model.safetensors").rename(f / "model-00001-of-00001.safetensors")
        (f / "model.safetensors.index.json").write_text(text)
    return make


def _bin_index(text: str) -> Callable[[Path], None]:
    def make(f: Path) -> None:
        (f / "model.safetensors").unlink()
        (f / "pytorch_model.bin").write_bytes(b"not a pickle")
        (f / "pytorch_model.bin.index.json").write_text(text)
    return make


def _truncate(f: Path) -> None:
    p = f / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


POST_CASES = [
    # (id, how POST is broken, words of the error)
    ("header-a-list", _header_edit(lambda h, d: b"[1, 2, 3]"), ["is a JSON list, not an object"]),
    ("header-a-number", _header_edit(lambda h, d: b"42"), ["is a JSON int"]),
    ("header-not-json", _header_edit(lambda h, d: b"{not json"), ["not valid JSON"]),
    ("header-deeply-nested", _header_edit(lambda h, d: b"[" * 100_000 + b"]" * 100_000), ["not valid JSON"]),
    ("header-claims-more-bytes", lambda f: (f / "model.safetensors").write_bytes(
        (10**9).to_bytes(8, "little") + (f / "model.safetensors").read_bytes()[8:]), ["header claims"]),
    ("entry-not-an-object", _header_edit(lambda h, d: ({**h, "lm_head.weight": "weights"}, d)),
     ["'lm_head.weight' is a str, not an object"]),
    ("missing-dtype", _header_edit(_set("dtype", _DROP)), ["has no dtype"]),
    ("offsets-are-strings", _header_edit(_set("data_offsets", ["0", "10"])), ["not two integers"]),
    ("negative-shape", _header_edit(_set("shape", [-400, 32])), ["not a list of non-negative integers"]),
    ("negative-offsets", _header_edit(_negative_offsets), ["do not make a range"]),
    ("ten-times-the-rows", _header_edit(_ten_times_the_rows), ["claims shape", "holds"]),
    ("overlapping-tensors", _header_edit(_overlap), ["overlap"]),
    ("offsets-past-the-end", _header_edit(_set("data_offsets", [0, 10**12])), ["truncated"]),
    ("truncated-file", _truncate, ["truncated"]),
    ("safetensors-is-a-folder", _st_is_a_folder, ["cannot be read"]),
    ("safetensors-symlink-loop", _st_symlink_loop, ["cannot be read"]),
    ("config-a-list", _write("config.json", "[1, 2]"), ["config.json", "not an object"]),
    ("config-not-json", _write("config.json", "{oops"), ["config.json", "not valid JSON"]),
    ("shard-outside-the-folder", _index_to("../../../../etc/passwd"), ["outside the model folder"]),
    ("shard-absolute-path", _index_to("/etc/passwd"), ["outside the model folder"]),
    ("shard-missing", _index_to("model-00002-of-00002.safetensors"), ["is missing"]),
    # a broken index with the shards it names (beside a model.safetensors, transformers loads that file instead)
    ("index-not-an-object", _index_only("[]"), ["not an object"]),
    ("index-without-weight-map", _index_only('{"weight_map": [1]}'), ["not a valid shard index"]),
    ("bin-index-garbage", _bin_index("{garbage"), ["pytorch_model.bin.index.json", "not valid JSON"]),
    ("bin-index-a-list", _bin_index("[]"), ["pytorch_model.bin.index.json", "not an object"]),
]


@pytest.mark.parametrize(("make", "needles"), [c[1:] for c in POST_CASES], ids=[c[0] for c in POST_CASES])
def test_lying_checkpoints_are_one_line(m: Models, tmp_path: Path, make: Callable[[Path], None],
                                        needles: list[str]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(m.base, bad)
    make(bad)
    out = tmp_path / "run"
    before = snapshot(bad, m.base)
    for cmd in (["diff", m.base, bad, "-o", out], ["check", m.base, bad, "--min-cos", "0.9"]):
        r = cli(*cmd)
        assert_one_line(r, 2, *needles)
        assert_nothing_written(out)
    assert snapshot(bad, m.base) == before


def test_a_lying_header_never_gives_numbers(m: Models, tmp_path: Path) -> None:
    """The two lies that used to pass `check` with exit 0 (made-up cosines, thousands of fake added tokens)."""
    for name, fn in (("neg", _negative_offsets), ("ten", _ten_times_the_rows)):
        bad = tmp_path / name
        shutil.copytree(m.base, bad)
        _header_edit(fn)(bad)
        r = cli("check", m.base, bad, "--min-cos", "-1")
        assert r.returncode == 2 and "PASS" not in r.stdout, (r.stdout, r.stderr)


def _pickle_payload(f: Path, marker: Path) -> None:
    """A pickle whose loading would run `touch MARKER`: with --allow-pickle it is still loaded weights-only."""
    import pickle

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    (f / "model.safetensors").unlink()
    with open(f / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"lm_head.weight": Evil()}, fh)


def test_pickles_are_refused_and_never_run(m: Models, tmp_path: Path) -> None:
    bad = tmp_path / "pk"
    shutil.copytree(m.base, bad)
    marker = tmp_path / "ran"
    _pickle_payload(bad, marker)
    out = tmp_path / "run"
    assert_one_line(cli("diff", m.base, bad, "-o", out), 2, "pickle", "--allow-pickle")
    assert_one_line(cli("diff", m.base, bad, "-o", out, "--allow-pickle"), 2, "could not be loaded safely")
    assert not marker.exists(), "the pickle's code ran"
    assert_nothing_written(out)


def test_corrupt_gguf_is_one_line(smollm2_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src:
        cut.write_bytes(src.read(200_000))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 4000)
    out = tmp_path / "run"
    for f in (cut, junk):
        assert_one_line(cli("diff", f, f, "-o", out), 2, f.name)
        assert_nothing_written(out)


# ---- 3. output locations: checked first, never inside a model folder or onto an input ---------------------------

def _out_cases(m: Models, t: Path) -> list[tuple[str, list, list[str], list[Path]]]:
    """(id, argv, words of the error, folders that must stay untouched)."""
    a_file = t / "a-file"
    a_file.write_text("x")
    tok = m.base / "tokenizer.json"
    bad = t / "badbase"
    shutil.copytree(m.base, bad)
    _header_edit(lambda h, d: b"[1]")(bad)
    return [
        ("diff-into-post", ["diff", m.base, m.post, "-o", m.post], ["inside the model folder"], [m.post]),
        ("diff-under-post", ["diff", m.base, m.post, "-o", m.post / "run"], ["inside the model folder"], [m.post]),
        ("diff-into-base", ["diff", m.base, m.post, "-o", m.base / "sub" / "run"], ["model folder"], [m.base]),
        ("diff-onto-weights", ["diff", m.base, m.post / "model.safetensors", "-o", m.post / "model.safetensors"],
         ["model folder"], [m.post]),
        ("check-into-post", ["check", m.base, m.post, "-o", m.post / "run"], ["model folder"], [m.post]),
        ("vocab-into-model", ["vocab", m.base, "-o", m.base], ["model folder"], [m.base]),
        ("synth-onto-tokenizer", ["synth", m.base, "-o", tok], ["model folder"], [m.base]),
        ("synth-onto-tokenizer-given-as-file", ["synth", tok, "-o", tok], ["model folder"], [m.base]),
        ("coverage-into-model", ["coverage", m.data, "--tokenizer", m.base, "-o", m.base / "run"],
         ["model folder"], [m.base]),
        ("coverage-into-data", ["coverage", m.data, "--tokenizer", m.base, "-o", m.data / "run"],
         ["data folder"], [m.data]),
        ("mix-onto-input", ["mix", m.data / "a.jsonl", m.syn, "-o", m.data / "a.jsonl", "--ratio", "0.1"],
         ["is also an input"], [m.data]),
        ("mix-onto-synth", ["mix", m.data, m.syn, "-o", m.syn, "--ratio", "0.1"], ["is also an input"], [m.syn]),
        ("mix-into-data-folder", ["mix", m.data, m.syn, "-o", m.data / "mixed.jsonl", "--ratio", "0.1"],
         ["data folder"], [m.data]),
        ("out-is-a-file", ["diff", m.base, m.post, "-o", a_file], ["not a folder"], []),
        ("out-under-a-file", ["diff", m.base, m.post, "-o", a_file / "run"], ["is a file"], []),
        ("synth-out-is-a-folder", ["synth", m.base, "-o", t], ["is a folder"], []),
        ("out-under-proc", ["diff", m.base, m.post, "-o", "/proc/self/run"], ["/proc"], []),
        ("out-under-sys", ["diff", m.base, m.post, "-o", "/sys/kernel/vocabdrift-run"], ["/sys"], []),
        ("mix-under-proc", ["mix", m.data, m.syn, "-o", "/proc/mixed.jsonl", "--ratio", "0.1"], ["/proc"], []),
        # the location is checked before anything is read: a broken BASE is not even opened
        ("checked-before-reading", ["diff", bad, m.post, "-o", m.post / "run"], ["model folder"], [m.post]),
    ]


OUT_IDS = ["diff-into-post", "diff-under-post", "diff-into-base", "diff-onto-weights", "check-into-post",
           "vocab-into-model", "synth-onto-tokenizer", "synth-onto-tokenizer-given-as-file", "coverage-into-model",
           "coverage-into-data", "mix-onto-input", "mix-onto-synth", "mix-into-data-folder", "out-is-a-file",
           "out-under-a-file", "synth-out-is-a-folder", "out-under-proc", "out-under-sys", "mix-under-proc",
           "checked-before-reading"]


@pytest.mark.parametrize("case", OUT_IDS)
def test_outputs_never_land_where_they_must_not(m: Models, tmp_path: Path, case: str) -> None:
    cases = {c[0]: c for c in _out_cases(m, tmp_path)}
    _, argv, needles, watched = cases[case]
    before = snapshot(m.base, m.post, m.data, m.syn, *watched)
    t0 = time.monotonic()
    r = cli(*argv)
    assert_one_line(r, 2, *needles)
    assert snapshot(m.base, m.post, m.data, m.syn, *watched) == before
    assert time.monotonic() - t0 < 60


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; /proc and /sys cases cover it")
def test_read_only_folder(m: Models, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_one_line(cli("diff", m.base, m.post, "-o", ro / "run"), 2, "cannot write")
        assert not (ro / "run").exists()
    finally:
        ro.chmod(0o755)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_engines import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


PROBE_CASES = [
    # (id, argv after `probe MODEL --tokens 5`, words): each fails before anything is probed, and leaves no
    # `.RUN.probe-partial` behind
    ("bogus-template", ["--template", "bogus", "-o", "{out}"], ["bogus"]),
    ("out-an-existing-file", ["-o", "{file}"], ["not a folder"]),
    ("out-in-the-model-folder", ["-o", "{model}/run"], ["model folder"]),
    ("top-p-nan", ["--top-p", "nan", "-o", "{out}"], ["--top-p"]),
    ("device-cuda", ["--device", "cuda:99", "-o", "{out}"], ["--device"]),
]


@pytest.mark.parametrize(("argv", "needles"), [c[1:] for c in PROBE_CASES], ids=[c[0] for c in PROBE_CASES])
def test_probe_fails_before_probing(tiny: Path, tmp_path: Path, argv: list[str], needles: list[str]) -> None:
    out, file = tmp_path / "run", tmp_path / "file"
    file.write_text("x")
    subs = {"{out}": str(out), "{file}": str(file), "{model}": str(tiny)}
    before = snapshot(tiny)
    r = cli("probe", tiny, "--token", "5", *[subs.get(a, a).replace("{model}", str(tiny)) for a in argv])
    assert_one_line(r, 2, *needles)
    assert snapshot(tiny) == before
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name]
    assert not [p.name for p in tiny.iterdir() if "partial" in p.name or p.name == "run"]
    assert_nothing_written(out)


MODEL_OUT_CASES = [
    # (id, argv with {model}): each would write into the model folder; refused before the model runs
    ("undertrained-into-model", ["undertrained", "{model}", "-o", "{model}/run", "--no-verify"]),
    ("cases-into-model", ["cases", "{model}", "-o", "{model}"]),
    ("confusion-into-model", ["confusion", "{model}", "--prompt", "hi", "--language", "en", "-n", "1", "-o",
                              "{model}/run"]),
    ("probe-into-model", ["probe", "{model}", "--token", "5", "-o", "{model}"]),
]

MODEL_OPTION_CASES = [
    # (id, argv with {model} and {out}, words): nonsense numbers refused before the model runs (they were bugs, 70)
    ("confusion-temperature-nan", ["confusion", "{model}", "--prompt", "hi", "--language", "en", "-n", "1",
                                   "--temperature", "nan"], ["--temperature"]),
    ("confusion-top-p-nan", ["confusion", "{model}", "--prompt", "hi", "--language", "en", "-n", "1", "--top-p",
                             "nan"], ["--top-p"]),
    ("confusion-max-tokens-negative", ["confusion", "{model}", "--prompt", "hi", "--language", "en", "-n", "1",
                                       "--max-tokens", "-5"], ["--max-tokens"]),
    ("cases-max-tokens-zero", ["cases", "{model}", "--max-tokens", "0"], ["--max-tokens"]),
    ("probe-batch-size-zero", ["probe", "{model}", "--token", "5", "-o", "{out}", "--batch-size", "0"],
     ["--batch-size"]),
    ("undertrained-share-nan", ["undertrained", "{model}", "-o", "{out}", "--share", "nan"], ["--share"]),
]


@pytest.mark.parametrize("argv", [c[1] for c in MODEL_OPTION_CASES], ids=[c[0] for c in MODEL_OPTION_CASES])
def test_model_commands_refuse_nonsense_numbers(tiny: Path, tmp_path: Path, argv: list[str],
                                                request: pytest.FixtureRequest) -> None:
    needles = {c[0]: c[2] for c in MODEL_OPTION_CASES}[request.node.callspec.id]
    out = tmp_path / "out"
    assert_one_line(cli(*[{"{model}": str(tiny), "{out}": str(out)}.get(a, a) for a in argv]), 2, *needles)
    assert_nothing_written(out)
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name]


@pytest.mark.parametrize("argv", [c[1] for c in MODEL_OUT_CASES], ids=[c[0] for c in MODEL_OUT_CASES])
def test_model_commands_never_write_into_the_model(tiny: Path, argv: list[str]) -> None:
    before = snapshot(tiny)
    assert_one_line(cli(*[a.replace("{model}", str(tiny)) for a in argv]), 2, "model folder")
    assert snapshot(tiny) == before


# ---- 4. data: a bad line is skipped and counted, a corrupt file is one line ------------------------------------

def _data(t: Path, name: str, lines: list[str] | bytes) -> Path:
    p = t / name
    if isinstance(lines, bytes):
        p.write_bytes(lines)
    else:
        p.write_text("".join(x + "\n" for x in lines))
    return p


def _gz_cut(t: Path) -> Path:
    data = gzip.compress(("".join(json.dumps(GOOD) + "\n" for _ in range(2000))).encode())
    return _data(t, "cut.jsonl.gz", data[: len(data) // 2])


def _gz_flipped(t: Path) -> Path:
    data = bytearray(gzip.compress(("".join(json.dumps(GOOD) + "\n" for _ in range(2000))).encode()))
    data[len(data) // 2] ^= 0xFF
    return _data(t, "flipped.jsonl.gz", bytes(data))


def _parquet_damaged(t: Path) -> Path:
    """A Parquet file whose footer is intact but whose row groups are zeroed: it opens, then fails mid-way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = t / "d.parquet"
    pq.write_table(pa.table({"messages": [GOOD["messages"]] * 20_000}), p, row_group_size=2000)
    b = bytearray(p.read_bytes())
    b[2000:len(b) // 2] = bytes(len(b) // 2 - 2000)
    p.write_bytes(bytes(b))
    return p


G = json.dumps(GOOD)
DATA_CASES = [
    # (id, make the data file, --strict, exit, words of the one stderr line)
    ("deeply-nested-line", lambda t: _data(t, "n.jsonl", [G, "[" * 100_000 + "]" * 100_000, G]), False, 0,
     ["1 malformed", "nested too deeply"]),
    ("deeply-nested-line-strict", lambda t: _data(t, "n.jsonl", [G, "[" * 100_000 + "]" * 100_000, G]), True, 2,
     ["n.jsonl:2", "nested too deeply", "--strict"]),
    ("lone-surrogate", lambda t: _data(t, "s.jsonl", [G, '{"text": "a\\ud800b"}', G]), False, 0,
     ["1 malformed", "surrogate"]),
    ("lone-surrogate-in-a-json-array", lambda t: _data(t, "s.json", ["[" + G + ', {"text": "\\udfff"}]']), False,
     0, ["1 malformed", "surrogate"]),
    ("surrogate-pair-is-fine", lambda t: _data(t, "ok.jsonl", [G, '{"text": "\\ud83d\\ude00 smile"}']), False, 0,
     []),
    ("junk-records", lambda t: _data(t, "j.jsonl", [G, "null", "[1,2,3]", '{"foo": 1}', '{"messages": []}',
                                                     "not json", G]), False, 0, ["5 malformed"]),
    ("cut-gzip", _gz_cut, False, 2, ["cut.jsonl.gz", "gzip"]),
    ("flipped-gzip", _gz_flipped, False, 2, ["flipped.jsonl.gz", "gzip"]),
    ("not-gzip", lambda t: _data(t, "x.jsonl.gz", b"plain text, not gzip\n"), False, 2, ["x.jsonl.gz", "gzip"]),
    ("json-array-nested", lambda t: _data(t, "a.json", ["[" * 100_000 + "]" * 100_000]), False, 2,
     ["nested too deeply"]),
    ("damaged-parquet", _parquet_damaged, False, 2, ["d.parquet", "not a readable Parquet file"]),
    ("json-array-invalid", lambda t: _data(t, "o.json", ["[" + G + "]]"]), False, 2, ["not valid JSON"]),
]


@pytest.mark.parametrize(("make", "strict", "code", "needles"), [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_coverage_on_hostile_data(m: Models, tmp_path: Path, make: Callable[[Path], Path], strict: bool,
                                  code: int, needles: list[str]) -> None:
    f = make(tmp_path)
    out = tmp_path / "run"
    r = cli("coverage", f, "--tokenizer", m.base, "-o", out, *(["--strict"] if strict else []))
    if code == 0 and not needles:
        assert r.returncode == 0 and not error_lines(r.stderr), r.stderr
    else:
        assert_one_line(r, code, *needles)
    if code == 0:
        s = json.loads((out / "summary.json").read_text())["coverage"]
        assert s["samples"] >= 1
        if needles:
            assert s["malformed"] == int(needles[0].split()[0])
    else:
        assert_nothing_written(out)


@pytest.mark.parametrize(("make", "strict", "code", "needles"), [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_mix_on_hostile_data(m: Models, tmp_path: Path, make: Callable[[Path], Path], strict: bool, code: int,
                             needles: list[str]) -> None:
    f = make(tmp_path)
    out = tmp_path / "mixed.jsonl"
    r = cli("mix", f, m.syn, "-o", out, "--ratio", "0.2", *(["--strict"] if strict else []))
    if code == 0 and not needles:
        assert r.returncode == 0 and not error_lines(r.stderr), r.stderr
    else:
        line = assert_one_line(r, code, *needles)
        if code == 0:
            assert "not copied" in line
    if code != 0:
        assert_nothing_written(out)
        return
    from vocabdrift.sources.data import to_sample

    recs = [json.loads(x) for x in out.read_text().splitlines()]
    for i, rec in enumerate(recs):  # every record copied is one a trainer can use
        to_sample(rec, f"mixed:{i}")
    n_good = sum(1 for x in f.read_text().splitlines() if x == G) if f.suffix == ".jsonl" else None
    if n_good is not None:
        assert sum(1 for rec in recs if rec == GOOD) == n_good


@pytest.mark.slow
def test_a_huge_record_is_skipped_with_bounded_memory(m: Models, tmp_path: Path) -> None:
    """A 24 MB single-line record: skipped and named; the process stays far below the 4+ GB it used to take."""
    f = tmp_path / "huge.jsonl"
    with open(f, "w") as fh:
        fh.write(G + "\n")
        fh.write(json.dumps({"text": "word " * 5_000_000}) + "\n")
        fh.write(G + "\n")
    out = tmp_path / "run"
    code = ("import resource, subprocess, sys\n"
            f"r = subprocess.run({[*EXE, 'coverage', str(f), '--tokenizer', str(m.base), '-o', str(out)]!r},"
            " capture_output=True, text=True)\n"
            "sys.stderr.write(r.stderr)\n"
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    rc, peak_kb = map(int, r.stdout.split())
    assert rc == 0, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "huge.jsonl:2" in lines[0] and "above the limit" in lines[0], r.stderr
    assert json.loads((out / "summary.json").read_text())["coverage"]["samples"] == 2
    assert peak_kb < 1_500_000, f"peak {peak_kb / 1e6:.2f} GB"


def test_mix_count_beyond_the_disk_is_refused_before_writing(m: Models, tmp_path: Path) -> None:
    out = tmp_path / "mixed.jsonl"
    t0 = time.monotonic()
    for n, words in ((10**12, "GB free"), (10**15, "GB free"), (10**21, "too large")):  # 10**21: past 64 bits
        assert_one_line(cli("mix", m.data, m.syn, "-o", out, "--count", str(n)), 2, words, "--count")
    assert time.monotonic() - t0 < 60
    assert_nothing_written(out)


# ---- 5. nonsense options and damaged run folders ----------------------------------------------------------------

@pytest.fixture(scope="module")
def good_run(m: Models) -> Path:
    """A run folder `diff` wrote for BASE/POST, made once; each case damages a copy."""
    run = m.root / "good-run"
    r = cli("diff", m.base, m.post, "-o", run)
    assert r.returncode == 0, r.stderr
    return run


def _edit_json(name: str, fn: Callable[[object], object]) -> Callable[[Path], None]:
    def make(run: Path) -> None:
        p = run / name
        p.write_text(json.dumps(fn(json.loads(p.read_text()) if p.exists() else None)))
    return make


def _with(obj: dict, path: list[str], value: object) -> dict:
    d = obj
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return obj


RUN_CASES = [
    # (id, how the run folder is damaged, argv after the run folder is made ({run} replaced), words)
    ("report-summary-threshold-text", _edit_json("summary.json", lambda s: _with(s, ["threshold"], "high")),
     ["report", "--run", "{run}"], ["summary.json", "threshold"]),
    ("report-summary-min-cos-text", _edit_json("summary.json",
                                               lambda s: _with(s, ["overall", "lm_head", "min_cos"], "low")),
     ["report", "--run", "{run}"], ["summary.json", "overall.lm_head.min_cos"]),
    ("report-summary-a-list", _edit_json("summary.json", lambda s: [1, 2]), ["report", "--run", "{run}"],
     ["summary.json"]),
    ("report-cases-wrong-types", _edit_json("cases.json", lambda s: {"cases": 5}), ["report", "--run", "{run}"],
     ["cases.json", "not a list"]),
    ("report-cases-not-json", lambda run: (run / "cases.json").write_text("{"), ["report", "--run", "{run}"],
     ["cases.json", "not valid JSON"]),
    ("report-confusion-wrong-types", _edit_json("confusion.json", lambda s: {"results": [{"n": "many"}]}),
     ["report", "--run", "{run}"], ["confusion.json", "results[0].n"]),
    ("report-confusion-not-json", lambda run: (run / "confusion.json").write_text("[1,"), ["report", "--run", "{run}"],
     ["confusion.json", "not valid JSON"]),
    ("check-run-corrupt-drift", lambda run: (run / "drift.parquet").write_bytes(b"PAR1 garbage"),
     ["check", "--run", "{run}"], ["drift.parquet"]),
    ("check-run-truncated-drift", lambda run: (run / "drift.parquet").write_bytes(
        (run / "drift.parquet").read_bytes()[:300]), ["check", "--run", "{run}"], ["drift.parquet"]),
    ("prune-threshold-nan", lambda run: None, ["prune-suggest", "--run", "{run}", "--threshold", "nan"],
     ["--threshold"]),
    ("coverage-into-a-run-with-corrupt-vocab", lambda run: (run / "vocab.parquet").write_bytes(b"junk"),
     ["coverage", "{data}", "--tokenizer", "{base}", "-o", "{run}"], ["vocab.parquet", "Parquet"]),
    ("coverage-into-a-run-with-corrupt-drift", lambda run: (run / "drift.parquet").write_bytes(b"junk"),
     ["coverage", "{data}", "--tokenizer", "{base}", "-o", "{run}"], ["drift.parquet", "Parquet"]),
    ("diff-again-over-a-damaged-summary", _edit_json("summary.json", lambda s: {"overall": 3}),
     ["diff", "{base}", "{post}", "-o", "{run}"], ["summary.json", "--force"]),
]


@pytest.mark.parametrize(("damage", "argv", "needles"), [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_damaged_run_folders(m: Models, good_run: Path, tmp_path: Path, damage: Callable[[Path], None],
                             argv: list[str], needles: list[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    damage(run)
    before = snapshot(run)
    subs = {"{run}": str(run), "{data}": str(m.data), "{base}": str(m.base), "{post}": str(m.post)}
    assert_one_line(cli(*[subs.get(a, a) for a in argv]), 2, *needles)
    assert snapshot(run) == before  # nothing written into the run folder by a failed command
    assert not (run / "report.html").exists()


OPTION_CASES = [
    # (id, argv with {base}, {post}, {out}, words)
    ("threshold-nan", ["diff", "{base}", "{post}", "-o", "{out}", "--threshold", "nan"], ["--threshold nan"]),
    ("threshold-5", ["diff", "{base}", "{post}", "-o", "{out}", "--threshold", "5"], ["--threshold 5"]),
    ("min-cos-nan", ["check", "{base}", "{post}", "--min-cos", "nan"], ["outside [-1, 1]"]),
    ("max-below-nan-share", ["check", "{base}", "{post}", "--max-below", "0.9:nan%"], ["outside"]),
    ("neighbors-k-zero", ["neighbors", "{base}", "5", "-k", "0"], ["-k 0"]),
    ("device-cuda-without-cuda", ["diff", "{base}", "{post}", "-o", "{out}", "--device", "cuda:99"], ["--device"]),
    ("device-nonsense", ["diff", "{base}", "{post}", "-o", "{out}", "--device", "banana"], ["not a device"]),
    ("check-device-nonsense", ["check", "{base}", "{post}", "--device", "toaster"], ["not a device"]),
    ("hub-id-dot-dot", ["diff", "{base}", "org/..", "-o", "{out}"], ["org/..", "no such file"]),
    ("hub-id-double-dash", ["vocab", "a--b/c", "-o", "{out}"], ["a--b/c"]),
    ("mix-ratio-nan", ["mix", "{data}", "{syn}", "-o", "{out}", "--ratio", "nan"], ["--ratio"]),
    ("threshold-not-a-number", ["diff", "{base}", "{post}", "-o", "{out}", "--threshold", "abc"],
     ["'--threshold'", "vocabdrift diff --help"]),
    ("missing-argument", ["diff", "{base}", "-o", "{out}"], ["Missing argument 'post'"]),
    ("unknown-command", ["frobnicate", "{base}"], ["No such command 'frobnicate'"]),
    ("unknown-option", ["check", "{base}", "{post}", "--min-cosine", "0.9"], ["--min-cosine"]),
]


@pytest.mark.parametrize(("argv", "needles"), [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_nonsense_options(m: Models, tmp_path: Path, argv: list[str], needles: list[str]) -> None:
    out = tmp_path / "out"
    subs = {"{base}": m.base, "{post}": m.post, "{out}": out, "{data}": m.data, "{syn}": m.syn}
    r = cli(*[str(subs.get(a, a)) for a in argv])
    assert_one_line(r, 2, *needles)
    assert_nothing_written(out)


def _bad_tokenizer(m: Models, t: Path, text: str) -> Path:
    d = t / "badtok"
    shutil.copytree(m.base, d)
    (d / "tokenizer.json").write_text(text)
    return d


def test_a_broken_post_tokenizer_is_said_before_base_s_is_used(m: Models, tmp_path: Path) -> None:
    post = _bad_tokenizer(m, tmp_path, "{garbage")
    (post / "model.safetensors").unlink()
    shutil.copy(m.post / "model.safetensors", post / "model.safetensors")
    r = cli("diff", m.base, post, "-o", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    warned = [x for x in r.stderr.splitlines() if x.startswith("WARNING")]
    assert len(warned) == 1 and "tokenizer.json" in warned[0] and f"from {m.base}" in warned[0], r.stderr
    nowhere = tmp_path / "weights_only"  # no tokenizer at all: BASE's, in silence
    nowhere.mkdir()
    shutil.copy(m.post / "model.safetensors", nowhere / "model.safetensors")
    shutil.copy(m.post / "config.json", nowhere / "config.json")
    r = cli("diff", m.base, nowhere, "-o", tmp_path / "run2")
    assert r.returncode == 0 and "WARNING" not in r.stderr, r.stderr


def _damaged_coverage_run(t: Path) -> Path:
    run = t / "covrun"
    run.mkdir()
    (run / "manifest.json").write_text('{"commands": []}')  # a folder vocabdrift made, its table damaged
    (run / "coverage.parquet").write_bytes(b"not parquet at all")
    return run


MISC_CASES = [
    # (id, argv from (models, tmp), words)
    ("coverage-tokenizer-json-a-list", lambda m, t: ["coverage", m.data, "--tokenizer",
                                                     _bad_tokenizer(m, t, "[1, 2]"), "-o", t / "out"],
     ["could not load a tokenizer"]),
    ("synth-tokenizer-json-a-list", lambda m, t: ["synth", _bad_tokenizer(m, t, "[1, 2]"), "-o", t / "out"],
     ["could not load a tokenizer"]),
    ("vocab-tokenizer-json-garbage", lambda m, t: ["vocab", _bad_tokenizer(m, t, "{garbage"), "-o", t / "out"],
     ["tokenizer.json"]),
    ("synth-damaged-coverage-run", lambda m, t: ["synth", m.base, "-o", t / "out", "--run",
                                                 _damaged_coverage_run(t)], ["coverage.parquet", "Parquet"]),
    ("empty-model-name", lambda m, t: ["diff", "", m.base, "-o", t / "out"], ["empty model name"]),
    ("report-on-a-file", lambda m, t: ["report", "--run", m.syn], ["not a folder"]),
    ("neighbors-id-out-of-range", lambda m, t: ["neighbors", m.base, "999999"], ["out of range"]),
]


@pytest.mark.parametrize("make", [c[1] for c in MISC_CASES], ids=[c[0] for c in MISC_CASES])
def test_more_bad_input(m: Models, tmp_path: Path, make: Callable, request: pytest.FixtureRequest) -> None:
    needles = {c[0]: c[2] for c in MISC_CASES}[request.node.callspec.id]
    before = snapshot(m.base, m.data, m.syn)
    assert_one_line(cli(*make(m, tmp_path)), 2, *needles)
    assert snapshot(m.base, m.data, m.syn) == before
    assert_nothing_written(tmp_path / "out")


def test_neighbors_k_beyond_the_vocabulary_is_clipped(m: Models) -> None:
    r = cli("neighbors", m.base, "5", "-k", "100000")
    assert r.returncode == 0, r.stderr
    rows = [x for x in r.stdout.splitlines() if x.startswith("│")]
    assert 0 < len(rows) <= 399  # every other row at most
    assert "[-1]" not in r.stdout and "-2.000" not in r.stdout


# ---- 6. the hub, without a network: seconds, one line, how to work offline --------------------------------------

@pytest.mark.parametrize("argv", [["diff", "{base}", "someorg/somemodel", "-o", "{out}"],
                                  ["vocab", "someorg/somemodel", "-o", "{out}"],
                                  ["coverage", "{data}", "--tokenizer", "someorg/somemodel", "-o", "{out}"]],
                         ids=["diff", "vocab", "coverage"])
def test_unreachable_hub_fails_fast(m: Models, tmp_path: Path, argv: list[str]) -> None:
    out = tmp_path / "out"
    subs = {"{base}": m.base, "{out}": out, "{data}": m.data}
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": None,  # a closed local port
           "HF_HOME": str(tmp_path / "hf")}  # an empty cache: nothing to fall back on
    t0 = time.monotonic()
    r = cli(*[str(subs.get(a, a)) for a in argv], env=env)  # type: ignore[arg-type]
    took = time.monotonic() - t0
    assert_one_line(r, 2, "someorg/somemodel", "unreachable", "HF_HUB_OFFLINE=1")
    assert "Retrying" not in r.stderr
    assert took < 45, f"{took:.1f} s"  # generous for a loaded machine; retries with back-off take minutes
    assert_nothing_written(out)


# ---- 7. a bug is a bug: its own exit code, never 1 ---------------------------------------------------------------

BUG = """
import sys
import vocabdrift.cli as c

@c.app.command("explode")
def explode() -> None:
    raise RuntimeError("something inside broke")

sys.argv = ["vocabdrift", "explode"]
c.main()
"""


def test_an_internal_error_is_not_exit_1() -> None:
    r = subprocess.run([sys.executable, "-c", BUG], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "VOCABDRIFT_DEBUG": "0"})
    line = assert_one_line(r, 70, "internal error", "bug", "RuntimeError", "VOCABDRIFT_DEBUG=1")
    assert line.startswith("vocabdrift: ")
    r = subprocess.run([sys.executable, "-c", BUG], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "VOCABDRIFT_DEBUG": "1"})
    assert r.returncode == 70 and "Traceback" in r.stderr and "something inside broke" in r.stderr


@pytest.mark.parametrize("argv", [["diff", "{base}", "{post}", "-o", ""], ["report", "--run="],
                                  ["synth", "--tokenizer", "{base}", "--out", ""]], ids=["o", "run=", "out"])
def test_an_empty_location_is_not_the_current_folder(m: Models, tmp_path: Path, argv: list[str]) -> None:
    before = sorted(tmp_path.iterdir())
    r = subprocess.run([*EXE, *(a.format(base=m.base, post=m.post) for a in argv)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert_one_line(r, 2, "is empty")
    assert sorted(tmp_path.iterdir()) == before  # nothing written into the current folder


@pytest.mark.parametrize("argv", [["--help"], ["check", "--help"]])
def test_a_closed_pipe_is_not_exit_1(argv: list[str]) -> None:
    """`vocabdrift check ... | head`: the reader goes away before we print. Not 1 (check's "drift found"), not a
    bug (70), no traceback: 141, as a shell shows for `cat` in the same place."""
    p = subprocess.Popen([*EXE, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # before the interpreter has even started: every write fails
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


# ---- 8. SIGTERM is handled like Ctrl-C; SIGKILL leaves no vocabulary child behind --------------------------------

def _big_pair(root: Path, qwen_json: Path) -> tuple[Path, Path]:
    """Two tiny-hidden checkpoints with Qwen's 151K-token vocabulary: the vocabulary table is built in a child
    process for several seconds, long enough to be interrupted."""
    from safetensors.numpy import save_file

    n = json.loads(qwen_json.read_text())
    rows = len(n["model"]["vocab"]) + len(n["added_tokens"])
    out = []
    for name, seed in (("base", 0), ("post", 1)):
        d = root / name
        d.mkdir(parents=True)
        shutil.copy(qwen_json, d / "tokenizer.json")
        w = np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)
        save_file({"model.embed_tokens.weight": w, "lm_head.weight": w.copy()}, str(d / "model.safetensors"))
        out.append(d)
    return out[0], out[1]


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] not in ("Z", "X")
    except OSError:
        return False


def _start_diff(base: Path, post: Path, out: Path) -> tuple[subprocess.Popen[str], Path, int]:
    """A diff, running until its vocabulary child exists; returns (process, the child's folder, the child's pid)."""
    import tempfile

    env = {**os.environ, "VOCABDRIFT_CACHE": "off"}
    proc = subprocess.Popen([*EXE, "diff", str(base), str(post), "-o", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.communicate()
        dirs = list(Path(tempfile.gettempdir()).glob(f"vocabdrift-vocab-{proc.pid}-*"))
        kids = _children(proc.pid)
        if dirs and kids:
            return proc, dirs[0], kids[0]
        assert time.monotonic() < deadline, "the vocabulary child never started"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_cleans_up_and_exits_143(qwen_tokenizer_json: Path, tmp_path: Path) -> None:
    base, post = _big_pair(tmp_path, qwen_tokenizer_json)
    out = tmp_path / "run"
    proc, folder, child = _start_diff(base, post, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert error_lines(err) == ["vocabdrift: terminated"], err
    assert_nothing_written(out)
    assert not folder.exists()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


@pytest.mark.slow
def test_sigkill_leaves_no_vocabulary_child(qwen_tokenizer_json: Path, tmp_path: Path) -> None:
    base, post = _big_pair(tmp_path, qwen_tokenizer_json)
    out = tmp_path / "run"
    proc, folder, child = _start_diff(base, post, out)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 5  # the child learns of its parent's death and removes the folder itself
    while (_alive(child) or folder.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the vocabulary child outlived its parent"
    assert not folder.exists(), "the vocabulary child's folder was left behind"


@pytest.mark.slow
def test_sigterm_during_mix_removes_its_buckets(m: Models, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                    {"role": "assistant", "content": "a" * 200}]}) + "\n"
                           for i in range(200_000)))
    out = tmp_path / "mixed.jsonl"
    proc = subprocess.Popen([*EXE, "mix", str(big), str(m.syn), "-o", str(out), "--count", "2000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".mixed.jsonl.mix-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and error_lines(err) == ["vocabdrift: terminated"], err
    assert_nothing_written(out)


def test_a_stale_vocabulary_folder_of_a_dead_process_is_swept(tmp_path: Path) -> None:
    """A folder whose owner died by SIGKILL after its child finished is removed by the next diff's child start."""
    import tempfile

    from vocabdrift.sources.vocabulary import _sweep_orphans

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(tempfile.mkdtemp(prefix=f"vocabdrift-vocab-{dead.pid}-"))
    mine = Path(tempfile.mkdtemp(prefix=f"vocabdrift-vocab-{os.getpid()}-"))
    try:
        _sweep_orphans()
        assert not stale.exists() and mine.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)


# ---- 9. hostile token strings stay text in the report -----------------------------------------------------------

HOSTILE_TOKENS = ["</script><script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "{{7*7}}</td>"]


def test_hostile_token_strings_are_escaped_in_the_report(m: Models, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    base = tmp_path / "hb"
    shutil.copytree(m.base, base)
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.add_tokens(HOSTILE_TOKENS)
    tok.save(str(base / "tokenizer.json"))
    n = tok.get_vocab_size(with_added_tokens=True)
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(base / "model.safetensors"))
    g = np.random.default_rng(0)
    for k in ("lm_head.weight", "model.embed_tokens.weight"):
        w = sd[k]
        sd[k] = np.concatenate([w, g.standard_normal((n - w.shape[0], w.shape[1])).astype(w.dtype)])
    cfg = json.loads((base / "config.json").read_text())
    cfg["vocab_size"] = n
    (base / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    post = tmp_path / "hp"
    shutil.copytree(base, post)
    sd["lm_head.weight"][n - 3:] *= -1  # the hostile tokens are the most drifted
    save_file(sd, str(post / "model.safetensors"), metadata={"format": "pt"})
    run = tmp_path / "run"
    r = cli("diff", base, post, "-o", run)
    assert r.returncode == 0, r.stderr
    r = cli("report", "--run", run, "--token", HOSTILE_TOKENS[0])
    assert r.returncode == 0, r.stderr
    html = (run / "report.html").read_text()
    md = (run / "report.md").read_text()
    for t in HOSTILE_TOKENS:
        assert t not in html and t not in md  # never raw: escaped for HTML, and for Markdown
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown, as text
    assert "<script>alert" not in html and "<img" not in html  # no tag came from a token


@pytest.mark.slow
def test_probe_sigterm_keeps_finished_blocks_and_resumes_identically(tiny: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    tokens = [a for i in range(3, 63) for a in ("--token", str(i))]
    whole = tmp_path / "whole"
    r = cli("probe", tiny, *tokens, "-o", whole, "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    out, part = tmp_path / "resumed", tmp_path / ".resumed.probe-partial"
    proc = subprocess.Popen([*EXE, "probe", str(tiny), *tokens, "-o", str(out), "--batch-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(part.glob("*.parquet")):
        assert proc.poll() is None, ("the probe finished or died before it could be stopped", proc.communicate())
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and error_lines(err) == ["vocabdrift: terminated"], err
    assert not out.exists() and list(part.glob("*.parquet"))  # finished blocks kept for the resume
    r = cli("probe", tiny, *tokens, "-o", out, "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    assert pq.read_table(out / "probe.parquet").equals(pq.read_table(whole / "probe.parquet"))
    assert not part.exists()
