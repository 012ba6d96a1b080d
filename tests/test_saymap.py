"""saymap: the whole vocabulary's say-ability, BASE and POST. Pure pieces against independent counts; the verb on
a tiny model trained to copy (one token's row destroyed) against the full probe; SmolLM2 (slow) likewise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_engines import tiny_model as tiny_model  # noqa: F401  (the fixture)
from test_probe import TRAIN_TEMPLATES

from vocabdrift.analyses import saymap as S

# ---- pure pieces --------------------------------------------------------------------------------------------------

def test_template_order_is_a_greedy_cover_weighted_by_cost() -> None:
    kept = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]], bool)
    assert S.template_order(kept, ["a", "b", "c"]) == ["b", "a", "c"]  # b keeps 3, then a the 1 left, then c
    # b costs three times a: a's 2 per unit beats b's 1; then b keeps 2 of what is left (0.67) against c's 1
    assert S.template_order(kept, ["a", "b", "c"], [1, 3, 1]) == ["a", "c", "b"]
    assert S.template_order(np.zeros((3, 2), bool), ["x", "y"]) == ["x", "y"]  # nothing kept: every template stays


def test_screen_settles_only_beyond_the_margin() -> None:
    top_p = 0.95
    # the distance to the cut in nats: log(1 - mass_above) - log(0.05)
    mass = np.array([0.0, 0.5, 0.90, 0.94, 0.96, 0.99, 0.9999, np.nan])
    d = S.cut_distance(mass, top_p)
    np.testing.assert_allclose(d[:7], np.log1p(-mass[:7]) - math.log(0.05))
    got = S.screen(mass, top_p, 0.5)
    want = [S.SURE if x > 0.5 else S.CUT if x < -0.5 else S.UNSURE for x in d[:7]] + [S.UNSURE]
    assert got.tolist() == want
    assert got[0] == S.SURE and got[3] == S.UNSURE and got[4] == S.UNSURE and got[6] == S.CUT
    # at a small top-p even the first choice is not sure: the rounded pass may not pick the exact pass's first
    assert S.screen(np.array([0.0]), 0.3, 0.5)[0] == S.UNSURE


def test_margin_is_twice_the_worst_disagreement_near_the_cut() -> None:
    exact = np.array([0.90, 0.95, 0.97, 0.5, 0.999999])
    fast = np.array([0.91, 0.94, 0.975, 0.2, 0.99])  # the 4th is far inside, the 5th far outside
    d = np.abs(S.cut_distance(exact, 0.95) - S.cut_distance(fast, 0.95))
    near = [0, 1, 2, 4]  # within 3 nats of the cut in either pass (the 5th: the fast pass puts it at -1.6)
    assert S.calibrate_margin(exact, fast, 0.95) == pytest.approx(max(S.MIN_MARGIN, 2 * d[near].max()))
    far = np.array([0.9999])  # 6.2 nats outside the cut in both passes: nothing near it to measure on
    assert S.calibrate_margin(far, far, 0.95) == S.DEFAULT_MARGIN
    assert S.calibrate_margin(np.array([0.95]), np.array([0.95]), 0.95) == S.MIN_MARGIN


def test_summary_counts_equal_an_independent_count() -> None:
    rng = np.random.default_rng(0)
    n = 400
    ids = np.arange(n) * 3
    base = rng.random(n) < 0.8
    post = rng.random(n) < 0.6
    cats = rng.choice(["latin", "han", "japanese"], n)
    post_p = rng.random(n)
    status = S.statuses(base, post)
    table = pa.table({"token_id": ids, "category": cats, "base_sayable": base, "post_sayable": post,
                      "post_p": post_p, "status": status})
    cos = rng.uniform(0.85, 1.0, n)
    drift = pa.table({"token_id": ids[::-1].copy(), "lm_head_cos": cos[::-1].copy(),
                      "lm_head_group_size_post": np.where(np.arange(n) % 7 == 0, 2, 1)[::-1].copy(),
                      "lm_head_group_size_base": np.ones(n, int)})
    counts = rng.integers(0, 200, n)
    coverage = pa.table({"token_id": ids, "count": counts})
    s = S.summarize(table, paired=True, drift=drift, coverage=coverage, top=3)
    assert s["counts"] == {"kept": int((base & post).sum()), "lost": int((base & ~post).sum()),
                           "gained": int((~base & post).sum()), "never": int((~base & ~post).sum())}
    for c in ("latin", "han", "japanese"):
        sel = cats == c
        lost = sel & base & ~post
        assert s["categories"][c]["lost"] == int(lost.sum())
        assert s["categories"][c]["lost_share"] == pytest.approx(lost.sum() / (sel & base).sum())
        worst = ids[lost][np.argsort(post_p[lost])][:3].tolist()  # the lowest POST probability first
        assert s["worst"][c] == worst
    lost_all = base & ~post
    assert s["lost"] == ids[lost_all][np.argsort(post_p[lost_all])].tolist()
    rel = {r["label"]: r for r in s["relations"]["drift"]}
    sel = (cos >= 0.95) & (cos < 0.99)
    assert rel["0.95-0.99"]["lost"] == int((sel & lost_all).sum())
    assert rel["0.95-0.99"]["sayable_base"] == int((sel & base).sum())
    cov = {r["label"]: r for r in s["relations"]["coverage"]}
    assert cov["10-99"]["lost"] == int(((counts >= 10) & (counts < 100) & lost_all).sum())
    col = s["relations"]["collapsed"][0]
    assert col["tokens"] == int((np.arange(n) % 7 == 0).sum())
    assert col["lost"] == int(((np.arange(n) % 7 == 0) & lost_all).sum())


def test_template_rule_leaves_out_a_prompt_post_stopped_following() -> None:
    """As `probe` reads it: a template POST lost as a whole (median probability below 1% of BASE's) is left out;
    one that does not work on BASE (keeps under half of the sample) cannot have failed, and stays."""
    rng = np.random.default_rng(0)
    n = 40
    sample = list(range(100, 100 + n))
    p_base = rng.uniform(0.2, 0.9, (n, 3))
    p_post = p_base * np.array([0.9, 1e-4, 0.8])  # "b" collapsed in POST
    kept_base = np.ones((n, 3), bool)
    kept_base[:, 2] = np.arange(n) < n // 3  # "c" keeps a third of BASE's sample: does not work on BASE
    cal = {"templates": ["a", "b", "c"], "sample": sample}
    base = {**cal, "kept": kept_base.tolist(), "p": p_base.tolist()}
    post = {**cal, "kept": (p_post > 0.1).tolist(), "p": p_post.tolist()}
    assert S.template_rule(base, post) == (["a", "c"], ["b"])
    dead = {**post, "p": (p_base * np.array([0.9, 1e-4, 1e-4])).tolist()}  # "c" collapsed too: never worked
    assert S.template_rule(base, dead) == (["a", "c"], ["b"])
    other = {**post, "templates": ["x", "y", "z"]}  # different prompts per model: no common rule, all read
    assert S.template_rule(base, other) == (["a", "b", "c", "x", "y", "z"], [])


def test_the_maps_lost_tokens_join_the_recommendation() -> None:
    """The map's LOST tokens are at risk after the probe's LOST ones (their order kept), a folder with only map
    losses is to repair, and the sentence says how many of the tokens BASE could say were lost."""
    from vocabdrift.analyses.recommend import recommend

    ids = np.arange(50)
    cats = np.array(["latin"] * 50)
    cos = np.ones(50)
    ok = np.ones(50, bool)
    r = recommend(ids, cats, cos, ok, lost=[7], mapped_lost=[30, 7, 12], mapped=40)
    assert list(r.at_risk[:3]) == [7, 30, 12] and r.status == "repair"
    assert any("POST lost 3 of the 40 tokens BASE could say" in x for x in r.lines)
    assert all(a.verdict == "not at risk" for a in r.categories)  # no categories given: none judged by the map
    assert recommend(ids, cats, cos, ok).status == "fine"
    # per category, the rest of the vocabulary is the control: 8 of 9 Japanese against 53% elsewhere needs data
    # (one-sided Fisher), 60 of 100 Han does not, nor 2 of 2 Cyrillic (fewer than MIN_LOST)
    cats = np.array(["japanese"] * 9 + ["han"] * 100 + ["cyrillic"] * 2 + ["latin"] * 889)
    ids, cos, ok = np.arange(1000), np.ones(1000), np.ones(1000, bool)
    per = {"japanese": (8, 9), "han": (60, 100), "cyrillic": (2, 2), "latin": (470, 889)}
    r = recommend(ids, cats, cos, ok, mapped_lost=[1, 2], mapped=1000, mapped_categories=per)
    verdicts = {a.category: a.verdict for a in r.categories}
    assert verdicts["japanese"] == "needs data" and verdicts["han"] == "not at risk"
    assert verdicts["cyrillic"] == "not at risk"
    from scipy.stats import fisher_exact

    want = fisher_exact([[8, 1], [532, 991 - 532]], alternative="greater")[1]  # the rest: han, cyrillic, latin
    why = next(a.why for a in r.categories if a.category == "japanese")
    assert f"p={want:.2g}" in why and "8 of the 9" in why
    assert any("POST lost 540 of the 1,000" in x for x in r.lines)  # the map's count, not its list's length


# ---- the verb on a tiny model trained to copy -------------------------------------------------------------------

def _any_template(table: pa.Table, templates: dict[str, list[str]] | None = None) -> dict[tuple[str, int], bool]:
    """(model, token) -> sayable under any template (of `templates[model]`, the ones the map read), from a full
    probe's rows."""
    out: dict[tuple[str, int], bool] = {}
    for r in table.select(["model", "template", "token_id", "sayable"]).to_pylist():
        k = (r["model"], r["token_id"])
        use = templates is None or r["template"] in templates[r["model"]]
        out[k] = out.get(k, False) or (bool(r["sayable"]) and use)
    return out


@pytest.mark.slow
def test_saymap_finds_the_lost_token_and_equals_the_full_probe(copier, tmp_path: Path) -> None:
    from vocabdrift.api.probe import probe
    from vocabdrift.api.saymap import saymap

    post, base, words, good, bad = copier
    t = {"templates": TRAIN_TEMPLATES, "base_templates": TRAIN_TEMPLATES}  # the ones the copier was trained on
    fast = saymap(post, base=base, out=tmp_path / "fast", fast="bfloat16", sample=48, block_tokens=97, engine="hf",
                  **t)  # the CLI's engine, named: the local engine keeps its fast pass
    assert fast.summary["fast"] == "bfloat16"
    exact = saymap(post, base=base, out=tmp_path / "exact", fast="none", sample=48, block_tokens=97, **t)
    full = probe(post, base=base, all_tokens=True, out=tmp_path / "probe", control=0, **t)
    want = _any_template(full.table, fast.summary["templates"])
    assert fast.summary["templates"] == exact.summary["templates"]
    ids = fast.table["token_id"].to_pylist()
    assert len(ids) == len({t for _, t in want})  # every non-special token, as probe --all-tokens
    for r in (fast, exact):
        for m in ("base", "post"):
            got = dict(zip(ids, r.table[f"{m}_sayable"].to_pylist(), strict=True))
            assert got == {t: want[(m, t)] for t in ids}, m
    status = dict(zip(ids, fast.table["status"].to_pylist(), strict=True))
    assert status[bad] == "lost" and status[good] == "kept"
    assert bad in fast.summary["lost"] and fast.summary["counts"]["lost"] == len(fast.summary["lost"])
    # the early stop: a token kept by its model's first template is asked nothing more
    first = fast.summary["templates"]["post"][0]
    row = fast.table.to_pylist()[ids.index(good)]
    assert row["post_template"] == first and row["post_asked"] == 1
    assert fast.summary["asked"]["post"] < 4 * len(ids)
    on_disk = json.loads((tmp_path / "fast" / "summary.json").read_text())["saymap"]
    assert on_disk["counts"] == fast.summary["counts"]
    assert not (tmp_path / ".fast.saymap-partial").exists()
    # the reversed pair: the destroyed row is GAINED
    rev = saymap(base, base=post, out=tmp_path / "rev", fast="none", tokens=[good, bad], sample=2, **t)
    assert dict(zip(rev.table["token_id"].to_pylist(), rev.table["status"].to_pylist(), strict=True)) == {
        good: "kept", bad: "gained"}


@pytest.mark.slow
def test_saymap_resumes_after_a_kill_and_a_rerun_recomputes_nothing(copier, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    import vocabdrift.api.saymap as api

    post, base, words, _good, _bad = copier
    kw = {"base": base, "tokens": words[:60], "fast": "none", "sample": 16, "block_tokens": 16,
          "templates": TRAIN_TEMPLATES, "base_templates": TRAIN_TEMPLATES}
    fresh = api.saymap(post, out=tmp_path / "fresh", **kw)
    real, calls = api._ask, []

    def dying(*a, **k):  # killed in the third block of BASE
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(api, "_ask", dying)
    with pytest.raises(KeyboardInterrupt):
        api.saymap(post, out=tmp_path / "run", **kw)
    part = tmp_path / ".run.saymap-partial"
    assert len(list(part.glob("base.*.parquet"))) == 2 and not (tmp_path / "run" / "saymap.parquet").exists()
    monkeypatch.setattr(api, "_ask", real)
    asked: list[int] = []
    monkeypatch.setattr(api, "_ask", lambda *a, **k: asked.append(1) or real(*a, **k))
    again = api.saymap(post, out=tmp_path / "run", **kw)
    assert len(asked) == 8 - 2  # 4 blocks per model, 2 finished before the kill
    assert again.table.equals(fresh.table)
    asked.clear()
    with caplog.at_level("WARNING"):
        third = api.saymap(post, out=tmp_path / "run", **kw)
    assert not asked and "nothing recomputed" in caplog.text and third.table.equals(fresh.table)
    api.saymap(post, out=tmp_path / "run", force=True, **kw)
    assert len(asked) == 8


@pytest.mark.slow
def test_cli_saymap_check_and_report(copier, tmp_path: Path, cli) -> None:
    post, base, words, good, bad = copier
    run = tmp_path / "run"
    code, out, err = cli("diff", base, post, "-o", run)
    assert code == 0, err
    code, out, err = cli("check", "--run", run, "--max-lost", "japanese:1%")  # a category limit needs a map
    assert code == 2 and "saymap" in err and "Traceback" not in err, err
    tmpl = [x for t in TRAIN_TEMPLATES for x in ("--template", t)]
    code, out, err = cli("saymap", post, "--base", base, "--run", run, "--fast", "none", "--sample", "32", *tmpl)
    assert code == 0, err
    assert "LOST:" in out and "Say-ability of" in out and "wrote" in out
    code, out, err = cli("saymap", post, "--base", base, "--run", run, "--fast", "none", "--sample", "32",
                         "--json", *tmpl)
    assert code == 0, err
    s = json.loads(out)
    assert bad in s["lost"] and {"token_id": bad, "text": s["lost_tokens"][s["lost"].index(bad)]["text"]} in \
        s["lost_tokens"]
    # the gate: any LOST token fails by default; a share of what BASE could say, per category
    code, out, err = cli("check", "--run", run, "--max-below", "0.95:100%")
    assert code == 1 and "tokens BASE could say" in out, out
    assert "The say-ability map: POST lost" in out  # the recommendation counts the map's losses
    cat = s["categories"]
    worst = max(cat, key=lambda c: cat[c]["lost"])
    code, out, err = cli("check", "--run", run, "--max-below", "0.95:100%", "--max-lost", "100%",
                         "--max-lost", f"{worst}:100%")
    assert code == 0, out
    code, out, err = cli("check", "--run", run, "--max-below", "0.95:100%", "--max-lost", f"{worst}:0")
    assert code == 1 and f"{worst} LOST" in out
    code, out, err = cli("report", "--run", run)
    assert code == 0, err
    html = (run / "report.html").read_text()
    assert "Say-ability of the whole vocabulary" in html and '"saymap"' in html
    md = (run / "report.md").read_text()
    assert "LOST tokens per category" in md
    # bad input: one line, exit 2
    code, out, err = cli("saymap", post, "--base", base, "--run", run, "--fast", "fp8")
    assert code == 2 and "--fast" in err and "Traceback" not in err
    code, out, err = cli("check", "--run", run, "--max-lost", "klingon:1%")
    assert code == 2 and "klingon" in err


@pytest.mark.slow
@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="no CUDA device here: the map's GPU path (the local engine in bfloat16 on CUDA, no fast "
                           "pass) runs where one is")
def test_saymap_on_cuda_equals_the_full_probe_there(copier, tmp_path: Path) -> None:
    from vocabdrift.api.probe import probe
    from vocabdrift.api.saymap import saymap

    post, base, words, _good, _bad = copier
    t = {"templates": TRAIN_TEMPLATES, "base_templates": TRAIN_TEMPLATES, "device": "cuda"}
    r = saymap(post, base=base, out=tmp_path / "map", sample=32, **t)
    assert r.summary["fast"] is None  # on a GPU the exact pass is already bfloat16
    want = _any_template(probe(post, base=base, all_tokens=True, out=tmp_path / "probe", control=0, **t).table,
                         r.summary["templates"])
    ids = r.table["token_id"].to_pylist()
    for m in ("base", "post"):
        assert dict(zip(ids, r.table[f"{m}_sayable"].to_pylist(), strict=True)) == {i: want[(m, i)] for i in ids}


@pytest.mark.slow
def test_saymap_on_smollm2_finds_planted_losses_and_equals_the_full_probe(smollm2_hf: Path, tmp_path: Path) -> None:
    """A real 135M model as BASE and, as POST, the same with eight lm_head rows turned around (x -2); its
    four chat templates and the default fast pass (bfloat16 where the CPU runs it natively): the planted tokens
    are LOST, and every verdict equals the full four-template probe's."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vocabdrift.api.probe import probe
    from vocabdrift.api.saymap import saymap

    rng = np.random.default_rng(11)
    ids = sorted(int(x) for x in rng.choice(np.arange(20, 49152), 120, replace=False))
    planted = ids[::15]
    post = tmp_path / "post"
    shutil.copytree(smollm2_hf, post)
    f = next(post.glob("*.safetensors"))
    sd = load_file(str(f))
    w = next(k for k in sd if k.endswith("lm_head.weight"))
    sd[w][planted] = -2 * sd[w][planted]  # each planted row points away from where it pointed: its logit falls
    save_file(sd, str(f), metadata={"format": "pt"})
    r = saymap(post, base=smollm2_hf, tokens=ids, out=tmp_path / "map", sample=32)
    full = probe(post, base=smollm2_hf, tokens=ids, out=tmp_path / "probe", control=0)
    want = _any_template(full.table, r.summary["templates"])
    for m in ("base", "post"):
        got = dict(zip(r.table["token_id"].to_pylist(), r.table[f"{m}_sayable"].to_pylist(), strict=True))
        assert got == {i: want[(m, i)] for i in ids}, m
    assert sum(want.values()) > len(ids)  # most tokens sayable: the comparison is not all-False
    status = dict(zip(r.table["token_id"].to_pylist(), r.table["status"].to_pylist(), strict=True))
    base_ok = [t for t in planted if want[("base", t)]]
    assert base_ok and all(status[t] == "lost" for t in base_ok)
    assert set(r.summary["lost"]) - set(planted) == set()  # nothing else moved
    assert r.summary["audit"]["post"]["disagreed"] == 0 or r.summary["audit"]["post"]["widened"] > 0


def test_saymap_bad_input_is_one_line_and_exit_2(tiny_model: Path, tmp_path: Path, cli) -> None:
    """Each promise of the map's inputs: one line naming what is wrong, exit 2, nothing written."""
    from factory import make_llama

    other = make_llama(tmp_path / "other", vocab=None)  # another tokenizer: the same ids are other tokens
    out = tmp_path / "run"
    cases = [
        (["saymap", tiny_model], "--run RUN"),
        (["saymap", tiny_model, "--base", other, "-o", out, "--fast", "none"], "different vocabularies"),
        (["saymap", tiny_model, "-o", out, "--top-p", "1"], "--top-p"),
        (["saymap", tiny_model, "-o", out, "--top-p", "0"], "--top-p"),
        (["saymap", tiny_model, "-o", out, "--sample", "0"], "--sample"),
        (["saymap", tiny_model, "-o", out, "--fast", "int4"], "--fast"),
        (["saymap", tiny_model, "-o", out, "--token", "no-such-token-anywhere"], "no-such-token-anywhere"),
        (["saymap", tiny_model, "-o", tiny_model / "map"], "model"),
        (["saymap", tiny_model, "--run", tmp_path / "nowhere"], "nowhere"),
        (["saymap", tiny_model, "-o", out, "--tokens-file", tmp_path / "missing.txt"], "missing.txt"),
    ]
    for args, words in cases:
        code, _out, err = cli(*args)
        assert code == 2, (args, err)
        lines = [x for x in err.strip().splitlines() if x.strip()]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in err, (args, err)
    assert not out.exists() and not (tiny_model / "map").exists()
    assert not list(tmp_path.glob(".run.saymap-partial"))
