"""One home for each concept: the tests that keep two copies of a concept from coming back and disagreeing.

Model specs (`sources.spec`), the run folder (`outputs.run`, `atomic`), token specs (`analyses.tokens`), the
vocabulary table (`sources.vocabulary`), "most drifted" (`analyses.drift.most_drifted`), the engines' factory, and
the import graph (no circle; analyses import no engine).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factory import TEXTS, train_bpe
from test_engines import make_tiny_model
from typer.testing import CliRunner

from vocabdrift.errors import VocabdriftError

SRC = Path(__file__).resolve().parent.parent / "src" / "vocabdrift"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pickled(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with pickle weights only (pytorch_model.bin), as older checkpoints ship."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickle") / "model"
    shutil.copytree(tiny, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny / "model.safetensors"), folder / "pytorch_model.bin")
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    return folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A vocabulary cache of this test's own."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("VOCABDRIFT_CACHE", str(folder))
    return folder


def _chat_jsonl(path: Path, n: int = 12) -> Path:
    words = "cat dog bird fish tree house water fire stone river hello world".split()
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say {words[i % len(words)]}"},
        {"role": "assistant", "content": f"{words[i % len(words)]} {words[(i + 3) % len(words)]}"}]}) + "\n"
        for i in range(n)))
    return path


def _text_jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def _invoke(args: list[str]) -> None:
    from vocabdrift.cli import app

    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, f"vocabdrift {' '.join(args)}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"


# ---- model specs: one parser, one policy --------------------------------------------------------------------------

COMMANDS = ("vocab", "diff", "neighbors", "check", "coverage", "synth", "probe", "cases", "undertrained",
            "confusion")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_model_spec_with_a_tilde_works_in_every_command(command: str, tiny: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny, home / "models" / "tiny")
    monkeypatch.setenv("HOME", str(home))
    m, out = "~/models/tiny", tmp_path / "out"
    data = _chat_jsonl(tmp_path / "sft.jsonl")
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"prompt": "Say cat", "expected": "cat"}) + "\n")
    args = {
        "vocab": ["vocab", m, "-o", str(out)],
        "diff": ["diff", m, m, "-o", str(out)],
        "neighbors": ["neighbors", m, "5", "-k", "3", "--base", m],
        "check": ["check", m, m],
        "coverage": ["coverage", str(data), "--tokenizer", m, "-o", str(out)],
        "synth": ["synth", m, "-o", str(tmp_path / "syn.jsonl")],
        "probe": ["probe", m, "--token", "5", "--base", m, "-o", str(out)],
        "cases": ["cases", m, str(cases), "--max-tokens", "2"],
        "undertrained": ["undertrained", m, "--token", "5", "--no-verify", "-o", str(out)],
        "confusion": ["confusion", m, "--prompt", "hello", "--language", "en", "-n", "1", "--max-tokens", "2"],
    }[command]
    from vocabdrift.cli import app

    r = CliRunner().invoke(app, args)
    if command == "cases" and r.exit_code == 1:  # a random model fails the case; it was run, which is the point
        return
    assert r.exit_code == 0, f"vocabdrift {' '.join(args)}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"


def test_spec_parser_expands_tilde_and_keeps_hub_ids_for_names_that_cannot_be_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vocabdrift.sources.spec import parse_model_spec

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    assert parse_model_spec("~/m").kind == "folder" and parse_model_spec("~/m").path == tmp_path / "m"
    assert parse_model_spec("~/w.gguf").kind == "gguf"
    assert parse_model_spec("Qwen/Qwen2.5-7B").kind == "hub"
    for missing in ("~/nope", "./nope", "a/b/c", "nope", "org/model.safetensors", str(tmp_path / "nope")):
        with pytest.raises(VocabdriftError, match="no such file or folder"):
            parse_model_spec(missing)


def test_probe_refuses_a_pickle_without_the_opt_in_before_loading_anything(
        pickled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    import vocabdrift.engines.hf as hf
    from vocabdrift.api.probe import cases, probe

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded")

    with monkeypatch.context() as mp:
        mp.setattr(hf, "load_model", no_load)
        with pytest.raises(VocabdriftError, match="pickle.*--allow-pickle"):
            probe(pickled, tokens=[5], out=tmp_path / "refused")
        with pytest.raises(VocabdriftError, match="pickle.*--allow-pickle"):
            cases(pickled)
    assert not (tmp_path / "refused").exists()
    r = probe(pickled, tokens=[5], out=tmp_path / "allowed", allow_pickle=True)
    assert r.table.num_rows > 0


def test_undertrained_accepts_the_allow_pickle_it_promises(pickled: Path, tmp_path: Path, cache: Path) -> None:
    from vocabdrift.cli import app

    refused = CliRunner().invoke(app, ["undertrained", str(pickled), "--no-verify", "-o", str(tmp_path / "a")])
    assert isinstance(refused.exception, VocabdriftError) and "--allow-pickle" in str(refused.exception)
    _invoke(["undertrained", str(pickled), "--no-verify", "--allow-pickle", "-o", str(tmp_path / "b")])
    for command in ("diff", "neighbors", "check", "probe", "cases", "undertrained", "confusion"):
        r = CliRunner().invoke(app, [command, "--help"])
        assert "--allow-pickle" in r.output, f"{command} --help has no --allow-pickle"


# ---- the run folder: one writer, the umask, the contract -----------------------------------------------------------

@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    try:
        yield set_mask
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_synth_mix_and_new_run_folders_follow_the_umask(mask: int, umask: Callable[[int], None], tmp_path: Path,
                                                        cache: Path) -> None:
    from vocabdrift.api.coverage import coverage, mix, synth
    from vocabdrift.outputs.run import open_run

    umask(mask)
    tok = train_bpe(tmp_path / "tok").parent
    files, folders = 0o666 & ~mask, 0o777 & ~mask
    s = synth(tok, out=tmp_path / "syn.jsonl")
    assert _mode(s.path) == files and _mode(s.stats_path) == files
    sft = _chat_jsonl(tmp_path / "sft.jsonl")
    m = mix([sft], s.path, out=tmp_path / "mixed.jsonl", ratio=0.2)
    assert _mode(m.path) == files
    coverage([str(_text_jsonl(tmp_path / "text.jsonl"))], tokenizer=tok, out=tmp_path / "run")
    assert _mode(tmp_path / "run") == folders
    assert all(_mode(f) == files for f in (tmp_path / "run").iterdir())
    with open_run(tmp_path / "run2") as run:
        run.write_json("summary.json", {})
    assert _mode(tmp_path / "run2") == folders and _mode(tmp_path / "run2" / "summary.json") == files


def test_run_folder_file_names_are_spelled_only_in_the_contract() -> None:
    """No module but outputs/run.py spells a run-folder file name: the others use its constants."""
    from vocabdrift.outputs import run as R

    names = {v for k, v in vars(R).items() if k.isupper() and isinstance(v, str) and "." in v}
    assert {"vocab.parquet", "drift.parquet", "summary.json", "manifest.json"} <= names
    # the lead's repair composite is migrated separately
    allowed = {SRC / "outputs" / "run.py", SRC / "composites" / "repair.py"}
    found = []
    for f in sorted(SRC.rglob("*.py")):
        if f in allowed:
            continue
        tree = ast.parse(f.read_text())
        skip = {id(n) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and f.name == "cli.py"
                and fn.name == "repair" for n in ast.walk(fn)}
        found += [f"{f.relative_to(SRC)}:{n.lineno} {n.value}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and n.value in names and id(n) not in skip]
    assert not found, found


def test_the_run_reader_checks_the_contract_columns(tmp_path: Path) -> None:
    from vocabdrift.outputs.run import DRIFT, Run

    run = Run(tmp_path)
    pq.write_table(pa.table({"token_id": [0, 1], "lm_head_cos": [1.0, 0.5]}), tmp_path / DRIFT)
    with pytest.raises(VocabdriftError, match="missing column.*lm_head_l2"):
        run.read_contract(DRIFT)
    (tmp_path / DRIFT).write_bytes(b"not parquet")
    with pytest.raises(VocabdriftError, match="not a readable Parquet file"):
        run.read_contract(DRIFT)


# ---- token specs: one rule ------------------------------------------------------------------------------------------

def _resolvers(tok_dir: Path) -> dict[str, Callable[[str], int]]:
    """The resolver each command uses: neighbors/diff --neighbors-of, probe/undertrained, report --token."""
    from vocabdrift.api.diff import resolve_token as diff_resolve
    from vocabdrift.api.probe import resolve_tokens as probe_resolve
    from vocabdrift.outputs.report import Vocab
    from vocabdrift.outputs.report import resolve_tokens as report_resolve
    from vocabdrift.sources.tokenizer import load_tokenizer
    from vocabdrift.sources.vocabulary import vocab_table

    vt, tok = vocab_table(tok_dir), load_tokenizer(tok_dir)
    return {"neighbors": lambda s: diff_resolve(s, vt, tok),
            "probe": lambda s: probe_resolve(str(tok_dir), [s])[0],
            "report": lambda s: report_resolve([s], Vocab.of(vt))[0]}


def test_the_token_rule_is_identical_across_commands(tmp_path: Path, cache: Path) -> None:
    from vocabdrift.sources.vocabulary import vocab_table

    tok_dir = train_bpe(tmp_path / "tok").parent
    vt = vocab_table(tok_dir)
    texts, pieces = vt.column("text").to_pylist(), vt.column("piece").to_pylist()
    digit = next(i for i, t in enumerate(texts) if t.isdigit() and int(t) != i)  # a number token: "1" is not id 1
    spaced = next(i for i, t in enumerate(texts) if t.startswith(" ") and len(t) > 2 and pieces[i] != t)
    specs = {str(digit): digit, texts[digit]: int(texts[digit]), f"text:{texts[digit]}": digit, f"id:{digit}": digit,
             texts[spaced]: spaced, pieces[spaced]: spaced, f"piece:{pieces[spaced]}": spaced}
    resolvers = _resolvers(tok_dir)
    for spec, want in specs.items():
        got = {name: r(spec) for name, r in resolvers.items()}
        assert set(got.values()) == {want}, (spec, got)
    for bad in (str(vt.num_rows), "-1", "zzqq xxvv wwyy"):  # out of range; several tokens
        for name, r in resolvers.items():
            with pytest.raises(VocabdriftError):
                r(bad)
                pytest.fail(f"{name} accepted {bad!r}")


def test_probe_resolves_tokens_before_loading_a_model(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      cache: Path) -> None:
    import vocabdrift.engines as engines
    from vocabdrift.api.probe import probe

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the tokens were validated")

    monkeypatch.setattr(engines, "open_engine", no_load)
    with pytest.raises(VocabdriftError, match="not one"):
        probe(tiny, tokens=["cat dog bird fish"], out=tmp_path / "run")
    with pytest.raises(VocabdriftError, match="out of range"):
        probe(tiny, tokens=["999999"], out=tmp_path / "run")


def test_diff_resolves_neighbors_of_before_the_drift_pass(tiny: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    import vocabdrift.api.diff as api

    def no_pass(*a: object, **k: object) -> None:
        raise AssertionError("the drift pass ran before the tokens were validated")

    monkeypatch.setattr(api, "measure", no_pass)
    for bad, message in (("zzqq xxvv wwyy", "not one"), ("999999", "out of range")):
        with pytest.raises(VocabdriftError, match=message):
            api.diff(tiny, tiny, out=tmp_path / "run", neighbors_of=[bad])
    assert not (tmp_path / "run").exists()


def test_every_command_that_takes_tokens_shows_the_rule_in_its_help() -> None:
    from vocabdrift.analyses.tokens import TOKEN_RULE
    from vocabdrift.cli import app

    def flat(text: str) -> str:
        return "".join(text.replace("│", " ").split())

    for command in ("neighbors", "diff", "probe", "undertrained", "report"):
        out = CliRunner().invoke(app, [command, "--help"], terminal_width=300).output
        assert flat(TOKEN_RULE)[:60] in flat(out), f"{command} --help lacks the token rule"


# ---- the vocabulary table: one home, one cache ----------------------------------------------------------------------

def test_coverage_on_a_cached_tokenizer_reads_the_cache(tmp_path: Path, cache: Path) -> None:
    from vocabdrift.api.coverage import coverage
    from vocabdrift.sources.vocabulary import vocab_table

    tok = train_bpe(tmp_path / "tok").parent
    fresh = vocab_table(tok)
    (hit,) = cache.glob("vocab-*.parquet")
    planted = fresh.set_column(fresh.schema.get_field_index("text"), "text", pa.array(["x"] * fresh.num_rows))
    pq.write_table(planted, hit)
    coverage([str(_text_jsonl(tmp_path / "text.jsonl"))], tokenizer=tok, out=tmp_path / "run")
    assert pq.read_table(tmp_path / "run" / "vocab.parquet").column("text").to_pylist() == ["x"] * fresh.num_rows


# ---- "most drifted": one definition ----------------------------------------------------------------------------------

def test_most_drifted_is_one_order_everywhere(tmp_path: Path) -> None:
    from vocabdrift.analyses.drift import most_drifted, summarize
    from vocabdrift.analyses.vocab import build_vocab_table
    from vocabdrift.api.probe import _tokens_from_run
    from vocabdrift.outputs.report import Frame, Vocab, read_run
    from vocabdrift.outputs.run import open_run

    n = 12
    texts = [f"w{i}" for i in range(n)]
    special = np.zeros(n, dtype=bool)
    special[[0, 4]] = True
    vocab = build_vocab_table(texts, texts, [t.encode() for t in texts], special, ~special)
    cos = np.array([0.1, 0.9, 0.5, 0.5, 0.2, 0.7, np.nan, 0.5, 0.95, 0.3, 0.3, 1.0], dtype=np.float32)
    ones = np.ones(n, dtype=np.float32)
    drift = pa.table({"token_id": pa.array(np.arange(n)), "lm_head_cos": pa.array(cos),
                      "lm_head_l2": pa.array(ones), "lm_head_norm_base": pa.array(ones),
                      "lm_head_norm_post": pa.array(ones), "embed_cos": pa.array(ones),
                      "embed_l2": pa.array(ones)})
    with open_run(tmp_path / "run") as run:
        run.write_table("vocab.parquet", vocab)
        run.write_table("drift.parquet", drift)
        run.write_json("summary.json", summarize(drift, vocab))
    want = most_drifted(drift, vocab, n).column("token_id").to_pylist()
    # lowest first, ties by token id, specials left out (where an undefined row goes is drift.py's to say)
    assert [t for t in want if t != 6] == [9, 10, 2, 3, 7, 5, 1, 8, 11]
    assert _tokens_from_run(tmp_path / "run", n) == want
    rd = read_run(tmp_path / "run")
    fr = Frame.of(rd, Vocab.of(rd.vocab))
    assert [int(fr.token_id[i]) for i in fr.most_drifted(n)] == want


# ---- engines and the import graph -----------------------------------------------------------------------------------

def test_the_engine_factory_takes_every_setting(tiny: Path) -> None:
    from vocabdrift.analyses.probe import TOP_P, Score
    from vocabdrift.engines import base, open_engine

    eng = open_engine("hf", tiny, batch_size=7, device="cpu", dtype="float32")
    try:
        assert eng.batch_size == 7 and str(eng.device) == "cpu"
    finally:
        eng.close()
    assert base.Score is Score and base.TOP_P == TOP_P
    with pytest.raises(VocabdriftError, match="unknown engine"):
        open_engine("nope", tiny)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the vocabdrift modules it imports (anywhere in it, but not under TYPE_CHECKING)."""
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f

    def targets(cur: str, node: ast.AST) -> list[str]:
        pkg = cur if mods[cur].name == "__init__.py" else cur.rsplit(".", 1)[0]
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                    if f"{base}.{a.name}" in mods or base in mods]
        return [a.name for a in node.names if a.name in mods]  # type: ignore[attr-defined]

    graph: dict[str, set[str]] = {}
    for m, f in mods.items():
        tree = ast.parse(f.read_text())
        typing_only = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If)
                       and getattr(i.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(i)}
        graph[m] = {t for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                    and id(n) not in typing_only for t in targets(m, n) if t != m}
    return graph


def test_no_import_circle() -> None:
    graph = _import_graph()
    seen: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for t in sorted(graph[m]):
            if seen.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in seen:
                visit(t, [*path, t])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])


def test_analyses_import_no_engine_and_no_layer_above() -> None:
    above = ("vocabdrift.engines", "vocabdrift.outputs", "vocabdrift.api", "vocabdrift.composites",
             "vocabdrift.cli", "vocabdrift.sources")
    bad = {m: sorted(t for t in ts if t.startswith(above))
           for m, ts in _import_graph().items() if m.startswith("vocabdrift.analyses")}
    assert not {m: t for m, t in bad.items() if t}, bad


# ---- the lab: module-level stages through the stage runner ---------------------------------------------------------

def test_the_lab_runs_each_stage_once_in_order_with_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every heavy step stubbed (it logs its call to a file: the side-by-side chains run in forked workers); the
    lab's wiring is checked, not its numbers (those are the slow lab tests')."""
    from types import SimpleNamespace

    import vocabdrift.api.coverage as C
    import vocabdrift.api.diff as D
    import vocabdrift.api.probe as P
    import vocabdrift.composites.lab as L
    import vocabdrift.composites.repair as RP
    import vocabdrift.composites.train as TR
    import vocabdrift.outputs.report as REP
    import vocabdrift.sources.tokenizer as TOK

    log, out = tmp_path / "calls.jsonl", tmp_path / "lab"

    def stub(name: str, ret: object = None, key: str = "out") -> Callable[..., object]:
        def f(*a: object, **k: object) -> object:
            where = k.get(key, a[0] if a else None)
            with open(log, "a") as fh:
                fh.write(json.dumps([name, str(where).replace(str(out), "OUT")]) + "\n")
            if name == "synth":
                Path(str(k["out"])).write_text('{"messages": []}\n')
            return ret
        return f

    tok = SimpleNamespace(backend_tokenizer=SimpleNamespace(encode=lambda s, **k: SimpleNamespace(ids=[7])))
    monkeypatch.setattr(L, "build_corpus", lambda **k: SimpleNamespace(pretrain=["a"], sft=[{"messages": []}]))
    monkeypatch.setattr(L, "_import_for_later_stages", lambda: None)
    for mod, name, ret in ((TR, "train_tokenizer", None), (TR, "pretrain", (None, 1.0)), (TR, "sft", None),
                           (TR, "eval_loss", 0.5), (C, "synth", None), (C, "coverage", None), (D, "diff", None),
                           (P, "probe", None), (P, "cases", None), (P, "confusion", None), (RP, "repair", None),
                           (REP, "report", None), (TOK, "load_tokenizer", tok)):
        monkeypatch.setattr(mod, name, stub(name, ret))
    monkeypatch.setattr(L, "_probe_tokens", lambda lb: [7])
    monkeypatch.setattr(L, "_measure", lambda run, reach, planted: {})
    monkeypatch.setattr(L, "comparison_markdown", lambda results: "TABLE")
    monkeypatch.setattr(L, "remedies_markdown", lambda results: "REMEDIES")
    monkeypatch.setattr(L, "_costs", lambda o, rr: dict.fromkeys(("baseline", "+coverage",
                                                                  *(f"+{k}" for k in L.REMEDIES)), 0))
    cov = pa.table({"token_id": [7], "count": [1]})
    monkeypatch.setattr(L.R.Run, "read_table", lambda self, name, *a: cov)

    r = L.lab(out, quick=True, remedies=True, progress=False)
    assert (r.table, r.remedies_table) == ("TABLE", "REMEDIES")
    stages = json.loads((out / "lab.json").read_text())["stages"]
    assert set(stages) == {"corpus", "tokenizer", "base", "synth", "baseline", "repaired", "analyse_baseline",
                           "analyse_repaired", "prove_baseline", "prove_repaired", "report",
                           *(f"heldout_{k}" for k in ("base", "baseline", "repaired", *(f"+{r}" for r in L.REMEDIES))),
                           *(f"remedy_{k}" for k in L.REMEDIES)}
    calls = sorted(tuple(json.loads(line)) for line in log.read_text().splitlines() if "load_tokenizer" not in line)
    assert calls == sorted([
        ("train_tokenizer", "OUT/models/tokenizer"), ("pretrain", "OUT/models/base"),
        ("synth", "OUT/data/coverage.jsonl"),
        ("sft", "OUT/models/baseline"), ("sft", "OUT/models/repaired"), ("diff", "OUT/baseline"),
        ("diff", "OUT/repaired"), ("coverage", "OUT/baseline"), ("coverage", "OUT/repaired"),
        ("probe", "OUT/baseline"), ("probe", "OUT/repaired"), ("cases", "OUT/baseline"), ("cases", "OUT/repaired"),
        ("confusion", "OUT/baseline"), ("confusion", "OUT/repaired"), ("report", "OUT/baseline"),
        *(("eval_loss", f"OUT/{m}") for m in ("models/base", "models/baseline", "models/repaired",
                                              *(f"remedies/{r}/model" for r in L.REMEDIES))),
        *((f, f"OUT/remedies/{k}") for k in L.REMEDIES for f in ("repair", "probe", "confusion"))])


def test_every_path_option_goes_through_the_write_gate_or_is_a_declared_input() -> None:
    """Walks every command's options from the CLI itself: a path option is gated (outputs.location.check_out, or
    an existing vocabdrift run folder) or named an input in `cli.PATH_INPUTS`; a new option cannot skip the gate."""
    import typer.main

    from vocabdrift.cli import GATES, PATH_INPUTS, app

    seen = 0
    for name, command in typer.main.get_command(app).commands.items():
        for p in command.params:
            annotation = str(getattr(getattr(p, "type_descriptor", None), "annotation", ""))
            is_path = "Path" in annotation or p.name in ("out", "run", "compare", "csv")
            if not is_path and p.name not in PATH_INPUTS:
                continue
            seen += 1
            gate = getattr(p.callback, "__wrapped__", p.callback)  # typer wraps a callback
            if p.name in PATH_INPUTS:
                assert gate not in GATES, (name, p.name)
                continue
            assert gate in GATES, f"{name} {p.opts}: a path option outside the write gate"
    assert seen >= 35
