"""`vocabdrift check`: the rules, their verdicts, and the CLI's exit codes on tiny real checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from factory import cosine_rows, make_llama, plant_drift, read_matrix

from vocabdrift.analyses.gate import judge, parse_category, parse_max_below, parse_min_cos
from vocabdrift.analyses.vocab import classify
from vocabdrift.api.check import check, rules_from
from vocabdrift.errors import VocabdriftError
from vocabdrift.sources.tokenizer import load_tokenizer, read_vocabulary

# ---- rules over hand-made tables --------------------------------------------------------------------------------


def _tables(cos: list[float], cats: list[str], *, special: list[bool] | None = None,
            reachable: list[bool] | None = None, nonfinite: list[bool] | None = None) -> tuple[pa.Table, pa.Table]:
    n = len(cos)
    drift = pa.table({"token_id": np.arange(n), "lm_head_cos": np.asarray(cos, np.float32),
                      "embed_cos": np.ones(n, np.float32), "nonfinite": nonfinite or [False] * n})
    vocab = pa.table({"token_id": np.arange(n), "category": cats, "is_special": special or [False] * n,
                      "reachable": reachable or [True] * n})
    return drift, vocab


def test_parse_specs() -> None:
    r = parse_max_below("0.95:1%")
    assert (r.kind, r.threshold, r.share, r.count) == ("max_below", 0.95, 0.01, None)
    assert parse_max_below("0.9:0").count == 0
    assert parse_max_below("0.9:0.05").share == 0.05
    c = parse_category("Russian:0.95:5%")
    assert (c.category, c.threshold, c.share) == ("cyrillic", 0.95, 0.05)
    assert parse_category("japanese:0.9") == parse_min_cos(0.9).__class__("min_cos", 0.9, category="japanese")
    for bad, msg in (("0.95", "COSINE:LIMIT"), ("2:1%", "outside"), ("0.95:150%", "outside"),
                     ("0.95:lots", "not a limit")):
        with pytest.raises(VocabdriftError, match=msg):
            parse_max_below(bad)
    with pytest.raises(VocabdriftError, match="unknown category 'klingon'"):
        parse_category("klingon:0.9:1%")
    assert rules_from() == [parse_max_below("0.95:1%")]  # the default rule


def test_judge_verdicts() -> None:
    cos = [1.0, 0.99, 0.96, 0.94, 0.5, 0.97, 0.2, 0.93]
    cats = ["latin", "latin", "latin", "latin", "japanese", "japanese", "special", "latin"]
    special = [False] * 6 + [True, False]
    reachable = [True] * 7 + [False]  # the last, unreachable, is out of the default population
    drift, vocab = _tables(cos, cats, special=special, reachable=reachable)
    # judged: ids 0..5 (6 tokens); below 0.95: ids 3, 4 -> 2/6
    r = judge(drift, vocab, [parse_max_below("0.95:33%")])
    assert not r.passed and r.results[0].below == 2 and r.results[0].tokens == 6
    assert r.verdict.startswith("FAIL lm_head: 2/6 reachable tokens (33.33%) below 0.95 > 33%")
    assert judge(drift, vocab, [parse_max_below("0.95:34%")]).passed
    assert judge(drift, vocab, [parse_max_below("0.95:2")]).passed
    assert not judge(drift, vocab, [parse_max_below("0.95:1")]).passed
    m = judge(drift, vocab, [parse_min_cos(0.5)])
    assert m.passed and m.results[0].value == pytest.approx(0.5) and m.results[0].worst[0] == 4
    assert not judge(drift, vocab, [parse_min_cos(0.51)]).passed
    # per category: Japanese 1/2 below 0.95, Latin 1/4
    assert not judge(drift, vocab, [parse_category("japanese:0.95:49%")]).passed
    assert judge(drift, vocab, [parse_category("latin:0.95:25%")]).passed
    # population "all" adds the unreachable id 7 (0.93): Latin 2/5
    assert not judge(drift, vocab, [parse_category("latin:0.95:25%")], population="all").passed
    # a category with no tokens has nothing that drifted
    empty = judge(drift, vocab, [parse_category("thai:0.95:0")])
    assert empty.passed and "thai no tokens" in empty.verdict


def test_nonfinite_rows_fail() -> None:
    drift, vocab = _tables([1.0, float("nan"), 1.0], ["latin"] * 3, nonfinite=[False, True, False])
    r = judge(drift, vocab, [parse_min_cos(0.0)])
    assert not r.passed and r.nonfinite == (1,) and "NaN/Inf" in r.verdict


# ---- the real command on tiny checkpoints -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """BASE, and POST with eight Latin rows of lm_head turned away; the expected numbers computed directly."""
    root = tmp_path_factory.mktemp("check")
    base = make_llama(root / "base", dtype="float32")
    v = read_vocabulary(load_tokenizer(base))
    cats = np.array([classify(t, r, is_special=bool(s)) for t, r, s in zip(v.texts, v.raw, v.is_special,
                                                                           strict=True)])
    keep = v.reachable & ~v.is_special
    latin = np.flatnonzero(keep & (cats == "latin"))
    planted = latin[:8].tolist()
    post = plant_drift(base, root / "post", rows=dict.fromkeys(planted, 0.9), tensor_suffix="lm_head.weight")
    cos = cosine_rows(read_matrix(base, "lm_head.weight"), read_matrix(post, "lm_head.weight"))[: len(keep)]
    return {"base": base, "post": post, "cos": cos[keep], "latin": cos[keep & (cats == "latin")],
            "planted": planted, "root": root}


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vocabdrift.cli", "check", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_api_matches_direct_computation(pair: dict) -> None:
    cos = pair["cos"]
    share = float((cos < 0.95).mean())
    assert 0.01 < share < 0.05  # eight planted rows of a few hundred
    r = check(pair["base"], pair["post"], min_cos=0.0, max_below="0.95:1%")
    assert not r.passed
    mn, mb = r.results
    assert mn.value == pytest.approx(cos.min(), abs=1e-5) and mn.passed == (cos.min() >= 0.0)
    assert mb.value == pytest.approx(share, abs=1e-9) and not mb.passed
    assert set(mb.worst) <= set(pair["planted"])
    assert check(pair["base"], pair["post"], max_below="0.95:5%").passed
    worst = check(pair["base"], pair["post"], min_cos=0.9)
    tid = worst.results[0].worst[0]
    assert not worst.passed and tid in pair["planted"]
    from vocabdrift.analyses.vocab import token_label  # the worst token shown as everywhere: text, then its id

    text = worst.results[0].worst_text
    assert worst.verdict == f"FAIL lm_head: min cos {cos.min():.4f} < 0.9 (token {token_label(text, tid)})"


@pytest.mark.slow
def test_cli_exit_codes_and_verdicts(pair: dict, tmp_path: Path) -> None:
    base, post = pair["base"], pair["post"]
    lat = pair["latin"]
    lat_share = float((lat < 0.95).mean())
    # fail: more than 1% below 0.95
    r = _cli(base, post, "--max-below", "0.95:1%")
    assert r.returncode == 1, r.stderr
    assert r.stdout.strip().startswith("FAIL lm_head:") and len(r.stdout.strip().splitlines()) == 1
    # pass: the same drift within a looser limit, and the min cos above a low floor
    r = _cli(base, post, "--max-below", "0.95:5%", "--min-cos", "-1")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.startswith("PASS lm_head:")
    # per category: Latin carries the planted rows
    limit = f"{lat_share * 100 / 2:.3f}%"
    r = _cli(base, post, "--category", f"english:0.95:{limit}", "--category", "han:0.95:0")
    assert r.returncode == 1 and "latin" in r.stdout and "han" not in r.stdout, r.stdout
    # the unchanged model passes the strictest gate
    r = _cli(base, base, "--min-cos", "0.999999", "--max-below", "0.99:0")
    assert r.returncode == 0, (r.stdout, r.stderr)
    # --out writes the run folder; --run judges it again without the checkpoints
    out = tmp_path / "run"
    r = _cli(base, post, "--max-below", "0.95:1%", "-o", out, "--json")
    assert r.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["check"]["passed"] is False and "overall" in summary
    assert json.loads(r.stdout)["rules"][0]["below"] == int((pair["cos"] < 0.95).sum())  # JSON alone
    r = _cli("--run", out, "--max-below", "0.95:5%")  # judges without writing
    assert r.returncode == 0 and json.loads((out / "summary.json").read_text())["check"]["passed"] is False
    r = _cli("--run", out, "--max-below", "0.95:5%", "--write")
    assert r.returncode == 0 and json.loads((out / "summary.json").read_text())["check"]["passed"] is True


@pytest.mark.slow
def test_cli_bad_input_exits_2(pair: dict, tmp_path: Path) -> None:
    for args, needle in ((("--max-below", "0.95"), "COSINE:LIMIT"),
                         (("--category", "klingon:0.9:1%"), "unknown category"),
                         ((), None)):
        r = _cli(pair["base"], tmp_path / "nope" if not args else pair["post"], *args)
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        err = [x for x in r.stderr.strip().splitlines() if not x.startswith("WARNING")]
        assert len(err) == 1 and err[0].startswith("vocabdrift: error:") and "Traceback" not in r.stderr
        assert needle is None or needle in err[0]
    r = _cli("--run", tmp_path / "missing")
    assert r.returncode == 2 and "no such run folder" in r.stderr
    from vocabdrift.outputs.run import open_run

    with open_run(tmp_path / "empty-run"):  # a run folder vocabdrift made, without a diff yet
        pass
    r = _cli("--run", tmp_path / "empty-run")
    assert r.returncode == 2 and "no drift.parquet" in r.stderr
