"""A run folder a user can trust and script: one BASE/POST per folder, reruns that say so, JSON alone on stdout,
and the probe's headline against undrifted control tokens (issue: one trustworthy workflow)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from factory import make_llama, plant_drift

from vocabdrift.errors import VocabdriftError
from vocabdrift.outputs import run as R

EXE = [sys.executable, "-c", "from vocabdrift.cli import main; main()"]


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """BASE, and POST with a few lm_head rows turned away."""
    root = tmp_path_factory.mktemp("trust")
    base = make_llama(root / "base", dtype="float32")
    post = plant_drift(base, root / "post", rows={40: 0.9, 41: 0.8, 42: 0.7}, tensor_suffix="lm_head.weight",
                       noise=0.001)
    return base, post


def _filled(run: Path, base: Path, post: Path) -> Path:
    """A run folder of BASE/POST with what other commands add: coverage (and its join with drift), a probe,
    and a recorded check."""
    from vocabdrift.api.check import check
    from vocabdrift.api.coverage import coverage
    from vocabdrift.api.diff import diff
    from vocabdrift.api.probe import probe

    diff(base, post, out=run, neighbors_top=3, k=3)
    coverage([{"text": "The quick brown fox jumps over the lazy dog."}] * 3, tokenizer=base, out=run,
             targets="all")
    probe(post, base=base, tokens=["40", "41"], out=run, templates=["fewshot_en"], base_templates=["fewshot_en"],
          control=4)
    check(run=run, write=True)
    return run


# ---- 1. one BASE/POST per run folder ----------------------------------------------------------------------------

@pytest.mark.slow
def test_diff_of_another_pair_removes_the_old_pairs_results_and_the_report_is_consistent(
        pair: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from vocabdrift.api.diff import diff
    from vocabdrift.outputs.report import report

    base, post = pair
    run = _filled(tmp_path / "stale", base, post)
    summary = json.loads((run / R.SUMMARY).read_text())
    assert {"coverage", "probe", "check"} <= set(summary) and summary["overall"]["lm_head"]["min_cos"] < 0.95
    assert (run / R.COVERAGE_DRIFT).exists() and (run / R.PROBE).exists()
    assert R.Run(run).disagreements() == []
    head = summary["probe"]["headline"]
    assert head["tokens"]["n"] == 2 and head["control"]["n"] == 4  # control tokens drawn from the diff
    assert not {40, 41, 42} & set(R.Run(run).read_table(R.PROBE).filter(
        R.Run(run).read_table(R.PROBE)["control"])["token_id"].to_pylist())
    _, md = report(run)
    assert "Check:" in md.read_text() and "Spearman" in md.read_text()
    # the probe's headline: neither model gives any probed token as its first choice here, so it says that top-1
    # carries no signal and leads with the tokens top-p sampling keeps
    assert "Sayable tokens (kept by top-p sampling)" in md.read_text() and "no signal" in md.read_text()
    assert "What to do:" in md.read_text() and "advice" in summary["coverage"]
    # the case: BASE against itself, into the folder that holds BASE/POST's results
    with caplog.at_level(logging.WARNING):
        diff(base, base, out=run, neighbors_top=3, k=3)
    assert "held results of another BASE/POST pair" in caplog.text and "probe.parquet" in caplog.text
    for name in (R.COVERAGE, R.COVERAGE_DRIFT, R.PROBE, R.REPORT_HTML, R.REPORT_MD):
        assert not (run / name).exists(), name
    summary = json.loads((run / R.SUMMARY).read_text())
    assert not {"coverage", "probe", "check"} & set(summary)
    assert summary["overall"]["lm_head"]["min_cos"] == pytest.approx(1.0, abs=1e-6)
    _, md = report(run)
    text = md.read_text()
    assert "Check:" not in text and "Lost tokens" not in text and "Spearman" not in text


@pytest.mark.slow
def test_report_and_check_refuse_files_of_another_pair(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from vocabdrift.api.check import check
    from vocabdrift.api.diff import diff
    from vocabdrift.outputs.report import report

    base, post = pair
    run = diff(base, post, out=tmp_path / "run", neighbors_top=3, k=3)
    other = diff(base, base, out=tmp_path / "other", neighbors_top=3, k=3)
    check(run=other, write=True)
    # a file (and a summary key) of another pair copied in by hand, with its stamp
    m_other = json.loads((other / R.MANIFEST).read_text())
    m_run = json.loads((run / R.MANIFEST).read_text())
    m_run["files"]["summary.json#check"] = m_other["files"]["summary.json#check"]
    (run / R.MANIFEST).write_text(json.dumps(m_run))
    s = json.loads((run / R.SUMMARY).read_text())
    s["check"] = json.loads((other / R.SUMMARY).read_text())["check"]
    (run / R.SUMMARY).write_text(json.dumps(s))
    with pytest.raises(VocabdriftError, match="do not belong to one BASE/POST pair.*'check'"):
        report(run)
    with pytest.raises(VocabdriftError, match="do not belong to one BASE/POST pair"):
        check(run=run)
    assert not (run / R.REPORT_MD).exists()


@pytest.mark.slow
def test_a_folder_written_before_stamps_is_cleaned_when_the_pair_changes(pair: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    from vocabdrift.api.diff import diff

    base, post = pair
    run = _filled(tmp_path / "old", base, post)
    manifest = json.loads((run / R.MANIFEST).read_text())
    del manifest["pair"], manifest["files"]  # as an older version wrote it
    (run / R.MANIFEST).write_text(json.dumps(manifest))
    diff(base, base, out=run, neighbors_top=3, k=3)
    assert not (run / R.PROBE).exists() and "check" not in json.loads((run / R.SUMMARY).read_text())


@pytest.mark.slow
def test_rerunning_a_finished_diff_says_so(pair: tuple[Path, Path], tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    from vocabdrift.api.diff import diff

    base, post = pair
    run = diff(base, post, out=tmp_path / "run", neighbors_top=3, k=3)
    before = (run / R.DRIFT).stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        diff(base, post, out=run, neighbors_top=3, k=3)
    assert "already holds this diff" in caplog.text and (run / R.DRIFT).stat().st_mtime_ns == before
    diff(base, post, out=run, neighbors_top=3, k=3, center=True)  # other options: computed again
    assert (run / R.DRIFT).stat().st_mtime_ns != before
    first = _cli("diff", base, post, "-o", run, "--center", "--json")  # the CLI's defaults: other options
    assert first.returncode == 0 and "already holds" not in first.stderr, first.stderr
    r = _cli("diff", base, post, "-o", run, "--center", "--json")
    assert r.returncode == 0 and "already holds this diff" in r.stderr
    assert json.loads(r.stdout) == json.loads(first.stdout)
    assert json.loads(r.stdout)["overall"]["lm_head"]["tokens"] > 0


@pytest.mark.slow
def test_a_narrower_probe_does_not_replace_the_wider_one(pair: tuple[Path, Path], tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from vocabdrift.api.probe import probe

    base, post = pair
    out = tmp_path / "run"
    probe(post, tokens=["40", "41", "42"], out=out, templates=["fewshot_en"])
    wide = (out / R.PROBE).read_bytes()
    with caplog.at_level(logging.WARNING):
        r = probe(post, tokens=["41"], out=out, templates=["fewshot_en"])
    assert "nothing recomputed" in caplog.text
    assert set(r.table["token_id"].to_pylist()) == {41} and (out / R.PROBE).read_bytes() == wide
    with pytest.raises(VocabdriftError, match="would replace it — pass --force"):
        probe(post, tokens=["43"], out=out, templates=["fewshot_en"])
    assert (out / R.PROBE).read_bytes() == wide
    r = probe(post, tokens=["43"], out=out, templates=["fewshot_en"], force=True)
    assert set(r.table["token_id"].to_pylist()) == {43}


# ---- 7. options that leave a trace ------------------------------------------------------------------------------

@pytest.mark.slow
def test_center_and_fold_norm_show_in_summary_console_and_report(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from vocabdrift.outputs.report import report

    base, post = pair
    run = tmp_path / "run"
    r = _cli("diff", base, post, "-o", run, "--center", "--fold-norm")
    assert r.returncode == 0, r.stderr
    assert "mean-centred (--center)" in r.stdout and "folded with the final norm weight" in r.stdout
    s = json.loads((run / R.SUMMARY).read_text())
    assert s["options"] == {"fold_norm": True, "center": True}
    from vocabdrift.analyses.vocab import LANGUAGE_NAMES, category_label  # keys, with the names beside them

    assert s["category_names"]["latin"] == LANGUAGE_NAMES["latin"] and category_label("latin") in r.stdout
    assert s["centered"]["overall"]["lm_head"]["tokens"] == s["overall"]["lm_head"]["tokens"]
    assert s["centered"]["overall"]["lm_head"]["min_cos"] != s["overall"]["lm_head"]["min_cos"]
    md = report(run)[1].read_text()
    assert "after subtracting each matrix's mean row (--center)" in md and "were folded" in md


# ---- 2. scripting -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_check_json_is_alone_on_stdout_and_check_run_writes_only_when_asked(pair: tuple[Path, Path],
                                                                            tmp_path: Path) -> None:
    from vocabdrift.api.diff import diff

    base, post = pair
    run = diff(base, post, out=tmp_path / "run", neighbors_top=3, k=3)
    summary, manifest = (run / R.SUMMARY).read_bytes(), (run / R.MANIFEST).read_bytes()
    r = _cli("check", "--run", run, "--json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)  # the whole of stdout is JSON
    assert doc["passed"] is False and doc["verdict"].startswith("FAIL lm_head:")
    assert (run / R.SUMMARY).read_bytes() == summary and (run / R.MANIFEST).read_bytes() == manifest
    q = _cli("check", "--run", run, "--quiet", "--max-below", "0.95:5%")
    assert q.returncode == 0 and q.stdout == ""
    w = _cli("check", "--run", run, "--write")
    assert w.returncode == 1 and json.loads((run / R.SUMMARY).read_text())["check"]["passed"] is False


@pytest.mark.slow
def test_json_and_quiet_on_the_table_commands(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, post = pair
    run, data = tmp_path / "run", tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ("The quick brown fox.", "Jack and Paul.")) + "\n")
    q = _cli("diff", base, post, "-o", run, "--quiet")
    assert q.returncode == 0 and q.stdout == "", q.stdout
    for args, key in ((("vocab", base, "-o", tmp_path / "v"), "categories"),
                      (("coverage", data, "--tokenizer", base, "-o", run, "--targets", "all"), "advice"),
                      (("prune-suggest", "--run", run), "candidates"),
                      (("undertrained", base, "-o", tmp_path / "u", "--no-verify"), "candidates"),
                      (("neighbors", post, "40", "--base", base), None)):
        r = _cli(*args, "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)  # the whole of stdout is JSON
        assert key is None or key in doc, (args, doc)
    q = _cli("neighbors", post, "40", "--base", base, "--quiet")
    assert q.returncode == 0 and q.stdout == "", q.stdout
    r = _cli("report", "--run", run, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"html": str(run / "report.html"), "md": str(run / "report.md")}
    q = _cli("report", "--run", run, "--quiet")
    assert q.returncode == 0 and q.stdout == "", q.stdout


def test_version_and_dir_list_the_verbs() -> None:
    import vocabdrift

    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"vocabdrift {vocabdrift.__version__}"
    names = dir(vocabdrift)
    assert {"diff", "coverage", "probe", "check", "report", "repair", "__version__"} <= set(names)
    assert "import_module" not in names


# ---- 5. the probe's headline --------------------------------------------------------------------------------------

def _scored(rows: list[tuple[int, str, int, float, bool]]):  # (token, model, rank, p, control)
    import pyarrow as pa

    return pa.table({"token_id": [r[0] for r in rows], "model": [r[1] for r in rows],
                     "template": ["repeat_en"] * len(rows), "p_target": [r[3] for r in rows],
                     "rank": [r[2] for r in rows], "sayable": [r[2] < 50 for r in rows],
                     "outcome": ["top1" if r[2] == 1 else "nucleus" for r in rows],
                     "control": [r[4] for r in rows]})


def test_headline_leads_with_top1_and_probability_against_the_control() -> None:
    from vocabdrift.analyses.probe import headline, headline_lines, summarize_probe

    rows = []
    for t in range(10):  # probed: all top-1 in BASE, 2 in POST, probability / 10 (all still "sayable")
        rows += [(t, "base", 1, 0.5, False), (t, "post", 1 if t < 2 else 5, 0.05, False)]
    for t in range(100, 104):  # control: unchanged
        rows += [(t, "base", 1, 0.4, True), (t, "post", 1, 0.4, True)]
    table = _scored(rows)
    h = headline(table)
    assert h["tokens"]["top1"] == {"base": 10, "post": 2} and h["tokens"]["n"] == 10
    assert h["control"]["top1"] == {"base": 4, "post": 4} and h["control"]["n"] == 4
    assert h["tokens"]["p_ratio"] == pytest.approx(0.1) and h["control"]["p_ratio"] == pytest.approx(1.0)
    assert h["tokens"]["nucleus"] == {"base": 10, "post": 10}  # what the old headline showed: no change
    lines = headline_lines(h)
    assert lines[0].startswith("Top-1 answers") and "fell from 10 to 2 of 10" in lines[0]
    assert "4 undrifted control tokens" in lines[0] and "x0.1 of BASE" in lines[1] and "x1" in lines[1]
    assert summarize_probe(table, ["base", "post"], base="base", post="post")["tokens"] == 14


def test_token_file(tmp_path: Path) -> None:
    from vocabdrift.api.probe import read_token_file

    f = tmp_path / "tokens.txt"
    f.write_text("# drifted names\n Jack\n\n12345\n嘉祺\n", encoding="utf-8")
    assert read_token_file(f) == [" Jack", "12345", "嘉祺"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(VocabdriftError, match="holds no token"):
        read_token_file(tmp_path / "empty.txt")
    with pytest.raises(VocabdriftError, match="no such token file"):
        read_token_file(tmp_path / "nope.txt")


# ---- 8. noise -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_no_third_party_bars_or_warnings_off_a_terminal(smollm2_gguf: Path, tmp_path: Path) -> None:
    """Loading a GGUF through transformers draws a "Converting and de-quantizing GGUF tensors" tqdm bar; with
    stderr a pipe (a log file, CI) stderr holds nothing but vocabdrift's own lines."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "TRANSFORMERS_VERBOSITY"))}
    r = subprocess.run([*EXE, "probe", str(smollm2_gguf), "--token", "hello", "--template", "repeat_en",
                        "-o", str(tmp_path / "run"), "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert "de-quantizing" not in r.stderr and "it/s" not in r.stderr and "%|" not in r.stderr, r.stderr
    assert "Warning" not in r.stderr and r.stderr.strip() == "", r.stderr
    doc = json.loads(r.stdout)
    assert doc["tokens"] == 1 and doc["per_token"][0]["text"] == "hello"


# ---- 4. advice that would not hurt -------------------------------------------------------------------------------

def test_coverage_advice_sizes_the_set_against_the_sft_data() -> None:
    from vocabdrift.analyses.advice import MAX_SHARE, advice_lines, coverage_advice

    cats = {"latin": {"tokens": 30_000, "at_or_above_floor": 2_400},  # English data: its tail is rare words
            "cyrillic": {"tokens": 2_000, "at_or_above_floor": 10},
            "hangul": {"tokens": 1_000, "at_or_above_floor": 0}}
    drift = {"cyrillic": {"lm_head": {"tokens": 2_000, "below_0.95": 900}},
             "hangul": {"lm_head": {"tokens": 1_000, "below_0.95": 0}},
             "latin": {"lm_head": {"tokens": 30_000, "below_0.95": 209}}}
    # the case: a set for every below-floor token would be 4.7 times the SFT data
    a = coverage_advice(cats, samples=10_000, placements_needed=8 * 47_000, below_floor=30_000, floor=5,
                        drift=drift)
    verdicts = {x["category"]: x["verdict"] for x in a["languages"]}
    assert verdicts == {"latin": "present", "cyrillic": "needs data", "hangul": "rare, not drifted"}
    assert a["synth_to_sft"] == pytest.approx(4.7) and a["mix_share"] == MAX_SHARE
    assert a["mix_samples"] == int(10_000 * MAX_SHARE / (1 - MAX_SHARE))
    text = " ".join(advice_lines(a))
    assert "Needs coverage data (rarely targeted and drifted): cyrillic (Russian)" in text and "4.7x" in text
    assert "--ratio 0.05" in text and "English" not in text.split("Not a problem")[0]
    # a small set is mixed whole
    small = coverage_advice(cats, samples=10_000, placements_needed=800, below_floor=200, floor=5)
    assert small["mix_samples"] == small["synth_samples"] == 100 and small["mix_share"] < MAX_SHARE
    assert "add it whole" in " ".join(advice_lines(small))
    # a language drifted less than the vocabulary as a whole is not where coverage data goes (the quickstart pair:
    # 7.9% of all rows below 0.95, mostly English words; Russian 2 of 77)
    few = {"cyrillic": {"tokens": 77, "at_or_above_floor": 0}}
    few_drift = {"cyrillic": {"lm_head": {"tokens": 77, "below_0.95": 2}}}
    overall = {"lm_head": {"tokens": 49_000, "below_0.95": 3_871}}
    kw = {"samples": 1_290, "placements_needed": 77 * 5, "below_floor": 77, "floor": 5, "drift": few_drift}
    assert coverage_advice(few, **kw)["languages"][0]["verdict"] == "needs data"  # 2.6% > 1%: alone, it counts
    assert coverage_advice(few, overall=overall, **kw)["languages"][0]["verdict"] == "rare, not drifted"
    few_drift["cyrillic"]["lm_head"]["below_0.95"] = 20  # 26%: far above the vocabulary's 7.9%
    assert coverage_advice(few, overall=overall, **kw)["languages"][0]["verdict"] == "needs data"


def test_common_words_are_never_proposed_for_pruning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    from vocabdrift.analyses.advice import common_words
    from vocabdrift.api.coverage import prune_suggest
    from vocabdrift.outputs.run import open_run

    texts = [" Jack", " Paul", " Zxqvb", "ulmx", " the"]
    common, available = common_words(texts, ["latin"] * 5)
    assert available and common == [True, True, False, False, True]
    with open_run(tmp_path / "run") as run:
        n = len(texts)
        run.write_table(R.VOCAB, pa.table({"token_id": list(range(n)), "text": texts, "category": ["latin"] * n,
                                           "is_special": [False] * n, "reachable": [True] * n}))
        run.write_table(R.DRIFT, pa.table({"token_id": list(range(n)), "lm_head_cos": [0.9, 0.91, 0.92, 0.93, 0.99],
                                           "lm_head_l2": [0.1] * n, "lm_head_norm_base": [1.0] * n,
                                           "lm_head_norm_post": [1.0] * n, "embed_cos": [1.0] * n}))
        run.write_table(R.COVERAGE, pa.table({"token_id": list(range(n)), "count": [0] * n, "samples": [0] * n}))
    r = prune_suggest(tmp_path / "run")
    assert r.table["text"].to_pylist() == [" Zxqvb", "ulmx"] and r.common_words_kept == 2
    assert r.categories["latin"]["candidates"] == 2
    # the answers are kept in the user's cache: asked again, no word list is read (wordfreq cannot even load)
    monkeypatch.setenv("VOCABDRIFT_CACHE", str(tmp_path / "cache"))
    prune_suggest(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "wordfreq", None)
    again = prune_suggest(tmp_path / "run")
    assert again.table["text"].to_pylist() == [" Zxqvb", "ulmx"] and again.word_list
    # without wordfreq (and nothing cached): no word-like token is proposed, and the result says why
    monkeypatch.setenv("VOCABDRIFT_CACHE", "off")
    r = prune_suggest(tmp_path / "run")
    assert r.table["text"].to_pylist() == [] and not r.word_list and r.common_words_kept == 4


# ---- 9. report details ---------------------------------------------------------------------------------------------

def test_mark_labels_stay_inside_the_plot_and_tokens_do_not_break() -> None:
    from importlib import resources

    from vocabdrift.outputs.report import Chart, Series, _static_note, plotly_spec

    c = Chart("l2", "L2", "L2 distance", "tokens", (Series("all", [0.0, 1.0, 2.0], [5, 3, 1]),), logy=True,
              marks=((0.2, "small #1"), (1.9, "␣Peter #2"), (2.0, "␣Alexander #3")))
    sides = [a["xanchor"] for a in plotly_spec(c)["layout"]["annotations"]]
    assert sides == ["left", "right", "right"]
    css = (resources.files("vocabdrift") / "data" / "report.html.j2").read_text(encoding="utf-8")
    assert "break-all" not in css.split(".tok, .new")[1].split("}")[0]
    assert _static_note("Log scale; click a legend entry to show or hide a category (others hidden).") == "Log scale."
    assert _static_note("Bars: the rate.") == "Bars: the rate."


# ---- 5. one vocabulary of names --------------------------------------------------------------------------------

def test_one_naming_of_categories_across_outputs() -> None:
    from vocabdrift.analyses.advice import coverage_advice
    from vocabdrift.analyses.vocab import LANGUAGE_NAMES, LANGUAGES, category_label
    from vocabdrift.outputs.console import category_rows
    from vocabdrift.outputs.report import _category_label

    summary = {"categories": {c: {} for c in (*LANGUAGES, "number")}}
    shown = dict(category_rows(summary))
    for c in LANGUAGES:  # console, report and advice show the key of summary.json, its everyday name beside it
        assert shown[c] == _category_label(c) == category_label(c) == f"{c} ({LANGUAGE_NAMES[c]})"
    assert shown["number"] == category_label("number") == "number"  # a category that is not a language: its key
    adv = coverage_advice({c: {"tokens": 10, "at_or_above_floor": 0} for c in LANGUAGES}, samples=10,
                          placements_needed=0, below_floor=0, floor=5)
    assert {x["category"]: x["name"] for x in adv["languages"]} == {c: LANGUAGE_NAMES[c] for c in LANGUAGES}


def test_rerunning_a_finished_coverage_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import os

    from factory import train_bpe

    from vocabdrift.api.coverage import coverage

    tok = train_bpe(tmp_path / "tok").parent
    data, run = tmp_path / "sft.jsonl", tmp_path / "run"
    data.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    first = coverage(data, tokenizer=tok, out=run, targets="all")
    before = (run / R.COVERAGE).stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        again = coverage(data, tokenizer=tok, out=run, targets="all")
    assert "already holds this coverage" in caplog.text and (run / R.COVERAGE).stat().st_mtime_ns == before
    assert again.table.equals(first.table) and again.summary == json.loads((run / R.SUMMARY).read_text())["coverage"]
    caplog.clear()
    data.write_text(json.dumps({"text": "Привет, как дела?"}) + "\n")  # the same file, other data: counted
    os.utime(data, ns=(before + 10**9, before + 10**9))
    with caplog.at_level(logging.WARNING):
        third = coverage(data, tokenizer=tok, out=run, targets="all")
    assert "already holds" not in caplog.text and not third.table.equals(first.table)
    caplog.clear()
    coverage(data, tokenizer=tok, out=run, targets="all", force=True)
    assert "already holds" not in caplog.text


# CLI options a command has that its Python function does not: console-only (what to print, where), or a choice
# the function takes as an object (`lab --large` is `recipe=LARGE`)
_CLI_ONLY = {"json", "quiet", "top", "csv", "large"}
_VERBS = {"diff": "vocabdrift.api.diff:diff", "vocab": "vocabdrift.api.diff:vocab",
          "neighbors": "vocabdrift.api.diff:neighbors", "check": "vocabdrift.api.check:check",
          "repair": "vocabdrift.composites.repair:repair", "coverage": "vocabdrift.api.coverage:coverage",
          "synth": "vocabdrift.api.coverage:synth", "mix": "vocabdrift.api.coverage:mix",
          "prune-suggest": "vocabdrift.api.coverage:prune_suggest", "probe": "vocabdrift.api.probe:probe",
          "saymap": "vocabdrift.api.saymap:saymap",
          "cases": "vocabdrift.api.probe:cases", "undertrained": "vocabdrift.api.probe:undertrained",
          "confusion": "vocabdrift.api.probe:confusion", "report": "vocabdrift.outputs.report:report",
          "lab": "vocabdrift.composites.lab:lab", "evaluate": "vocabdrift.composites.evaluate:evaluate"}


def test_cli_options_and_python_keywords_have_the_same_names() -> None:
    """Every visible option of a command is a keyword of its Python function, spelled the same (`--neighbors-of`
    is `neighbors_of`; a repeatable option is the plural, `--token` is `tokens`); the old spellings are hidden."""
    import importlib
    import inspect

    import typer

    from vocabdrift.cli import app

    group = typer.main.get_command(app)
    assert set(group.commands) == set(_VERBS)  # type: ignore[attr-defined]
    for name, target in _VERBS.items():
        mod, fn = target.split(":")
        keywords = set(inspect.signature(getattr(importlib.import_module(mod), fn)).parameters)
        for p in group.commands[name].params:  # type: ignore[attr-defined]
            if p.param_type_name != "option" or p.hidden or p.name == "help":
                continue
            long = max(p.opts, key=len).lstrip("-").replace("-", "_")
            if long in _CLI_ONLY:
                continue
            want = {long, long + "s", long.removesuffix("y") + "ies"} if p.multiple else {long}
            assert want & keywords, f"{name} --{long.replace('_', '-')}: no keyword {sorted(want)} in {target}"
    # the console's tables share one default; the report's (a document) its own
    tops = {n: next(p.default for p in group.commands[n].params if p.name == "top")  # type: ignore[attr-defined]
            for n in ("diff", "coverage", "prune-suggest", "report")}
    assert tops == {"diff": 20, "coverage": 20, "prune-suggest": 20, "report": 50}
    probe_opts = {o for p in group.commands["probe"].params if not p.hidden for o in p.opts}  # type: ignore[attr-defined]
    assert {"--run", "--drifted", "--token", "--all-tokens"} <= probe_opts
    assert not {"--from", "--top", "--tokens", "--all"} & probe_opts  # old spellings: gone


@pytest.mark.slow
def test_the_quickstart_names_every_run_folder_with_run_and_the_old_spellings_are_gone(pair: tuple[Path, Path],
                                                                                     tmp_path: Path) -> None:
    """`-o` where a command creates the run folder, `--run` everywhere it reads or adds to one; the old spellings
    (`probe --from RUN --top N`, `report RUN`, `prune-suggest RUN`, `synth --only-below-floor RUN`) are gone: one
    line naming the option, exit 2."""
    base, post = pair
    run, data = tmp_path / "run", tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    steps = [("diff", base, post, "-o", run),
             ("coverage", data, "--tokenizer", base, "--run", run, "--targets", "all"),
             ("probe", post, "--base", base, "--run", run, "--drifted", "3", "--template", "fewshot_en",
              "--control", "2"),
             ("report", "--run", run), ("check", "--run", run), ("prune-suggest", "--run", run),
             ("synth", base, "--run", run, "-o", tmp_path / "fill.jsonl")]
    for args in steps:
        r = _cli(*args)
        assert r.returncode in (0, 1), (args[0], r.stderr)  # check: 1 is "drift found"
    assert (run / R.PROBE).is_file() and (run / R.REPORT_MD).is_file() and (tmp_path / "fill.jsonl").is_file()
    assert json.loads((run / R.SUMMARY).read_text())["probe"]  # --run alone: read from RUN, written into RUN
    old = [("probe", post, "--base", base, "--from", run, "--top", "3", "--template", "fewshot_en", "--control", "2",
            "-o", run), ("report", run), ("prune-suggest", run),
           ("synth", base, "--only-below-floor", run, "-o", tmp_path / "fill2.jsonl")]
    for args in old:
        r = _cli(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args[0], r.stderr)
    r = _cli("report", "--run", tmp_path / "nowhere")  # bad input: one line, exit 2
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "vocabdrift diff" in r.stderr
    r = _cli("probe", post, "--drifted", "3")  # no run folder named at all
    assert r.returncode == 2 and "--run RUN" in r.stderr


@pytest.mark.slow
def test_category_keys_and_tokens_are_named_one_way_in_every_output(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A real diff + coverage + probe + report run folder: the console tables, summary.json, report.md and
    report.html name the same category keys, each language with its everyday name beside it and never alone, and
    show tokens as `token_label` does (␣ for a space), never as a Python repr."""
    import html
    import re

    import pyarrow.parquet as pq

    from vocabdrift.analyses.vocab import CATEGORIES, LANGUAGE_NAMES, category_label, token_label

    base, post = pair
    run = tmp_path / "run"
    shown = _cli("diff", base, post, "-o", run).stdout
    from factory import TEXTS

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS))
    cov = _cli("coverage", data, "--tokenizer", base, "--run", run, "--targets", "all")
    assert cov.returncode == 0, cov.stderr
    shown += cov.stdout
    pr = _cli("probe", post, "--base", base, "--run", run, "--drifted", "3", "--template", "fewshot_en",
              "--control", "2")
    assert pr.returncode == 0, pr.stderr
    shown += pr.stdout
    assert _cli("report", "--run", run).returncode == 0
    summary = json.loads((run / R.SUMMARY).read_text())
    md, page = (run / R.REPORT_MD).read_text(), html.unescape((run / R.REPORT_HTML).read_text())
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.S)
    for lib in (x for x in scripts if len(x) > 100_000):  # the plotting library's code, not the report's words
        page = page.replace(lib, "")
    from vocabdrift.outputs.report import FONT_MONO, FONT_SANS

    for stack in (FONT_SANS, FONT_MONO):  # font names ("Noto Sans Arabic") are not the report's words either
        page = page.replace(stack, "")
    keys = set(summary["categories"])
    assert set(summary["category_names"]) == keys and set(summary["coverage"]["categories"]) <= keys
    cat_re = re.compile(r"\b(" + "|".join(CATEGORIES) + r") \(([^()]+)\)")

    def table_keys(text: str) -> set[str]:  # first cells of the per-category table
        cells = re.findall(r"^[|│┃] *([a-z]+(?: \([^()]+\))?) *[|│┃]", text, flags=re.M)
        return {c.split(" (")[0] for c in cells if c.split(" (")[0] in CATEGORIES}

    for name, text in (("console", shown), ("report.md", md), ("report.html", page)):
        for key, label in cat_re.findall(text):  # a key with a label beside it: the key's own label
            assert label == LANGUAGE_NAMES[key], (name, key, label)
        for key, label in LANGUAGE_NAMES.items():  # an everyday name never stands alone
            alone = len(re.findall(rf"(?<![A-Za-z/]){re.escape(label)}(?![A-Za-z])", text))
            assert alone == text.count(category_label(key)), (name, label)
    assert table_keys(shown) == keys  # the diff's per-category table and coverage's: exactly summary.json's keys
    md_table = md.split("per language and category")[1].split("\n\n")[1]
    assert table_keys(md_table) == keys
    for key in keys:
        assert category_label(key) in page
    # tokens: the most drifted rows shown as token_label shows them, never repr'd
    vocab = {r["token_id"]: r["text"] for r in pq.read_table(run / R.VOCAB).to_pylist()}
    for tid in (40, 41, 42):
        label = token_label(vocab[tid])
        assert label in shown and label in md and label in page, (tid, label)
        if vocab[tid] != vocab[tid].strip():
            assert repr(vocab[tid]) not in shown + md + page
    assert token_label(" Jack") == "␣Jack" and token_label(" Jack", 10472) == "␣Jack (10472)"
    assert token_label("") == "∅" and token_label("a\nb") == "a\\nb"




def test_coverage_table_shows_the_advice_verdict_never_a_rule_of_its_own() -> None:
    from rich.console import Console

    from vocabdrift.analyses.advice import coverage_advice
    from vocabdrift.outputs.console import coverage_categories_table

    cats = {"latin": {"tokens": 30_000, "at_or_above_floor": 2_400, "zero_share": 0.9},
            "cyrillic": {"tokens": 2_000, "at_or_above_floor": 10, "zero_share": 0.99}}
    drift = {"cyrillic": {"lm_head": {"tokens": 2_000, "below_0.95": 900}}}
    summary = {"samples": 10, "target_tokens": 100, "categories": cats,
               "advice": coverage_advice(cats, samples=10, placements_needed=0, below_floor=0, floor=5, drift=drift)}
    con = Console(width=200, record=True)
    con.print(coverage_categories_table(summary, ["latin", "cyrillic"], floor=5))
    rows = {line.split("│")[1].strip(): line.split("│")[-2].strip() for line in con.export_text().splitlines()
            if line.startswith("│")}
    assert rows == {"cyrillic (Russian)": "needs data", "latin (English/Latin)": "present"}  # not "under-covered"
