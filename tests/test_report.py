"""`vocabdrift report`: the HTML and Markdown pages, built from run folders written in the briefing's schemas."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vocabdrift.analyses.drift import summarize
from vocabdrift.analyses.vocab import build_vocab_table
from vocabdrift.errors import VocabdriftError
from vocabdrift.outputs.report import report, verdict

PLANTED = "</script><script>alert(1)</script>"
OPTIONAL = ("coverage", "probe", "neighbors", "cases", "confusion")


# ---- a run folder in the briefing's schemas ---------------------------------------------------------------------

def _words(alphabet: str, n: int, length: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(list(alphabet), size=length))
        if w not in out:
            out.append(w)
    return out


def _texts() -> list[str]:
    texts = ["<|endoftext|>", "<|im_end|>", PLANTED, "嘉祺", "きちんと", "それほど"]
    texts += _words("あいうえおかきくけこさしすせそたちつてと", 120, 3, 1)
    texts += _words("가나다라마바사아자차카타파하", 60, 2, 2)
    texts += _words("абвгдежзиклмнопрст", 60, 4, 3)
    texts += _words("的一是不了人我在有他这中大来上国个到说们", 60, 2, 4)
    texts += [" " + w for w in _words("abcdefghijklmnoprstuvw", 150, 4, 5)]
    texts += [str(i) for i in range(40)] + ["$x$", "|", "*bold*", "`", "\n", "  "]
    return list(dict.fromkeys(texts))


def make_run(path: Path, parts: tuple[str, ...] = OPTIONAL, *, drifted: bool = True, seed: int = 0,
             extra: tuple[str, ...] = ()) -> Path:
    """vocab, drift and summary as `diff` writes them, plus the optional parts named in `parts`; `extra` tokens
    are added as the most drifted of all (so each shows in the tables)."""
    texts = _texts() + [t for t in extra if t not in _texts()]
    n = len(texts)
    special = np.array([t.startswith("<|") for t in texts])
    vocab = build_vocab_table(texts, texts, [None if s else t.encode() for t, s in zip(texts, special, strict=True)],
                              special, ~special)
    cats = np.array(vocab.column("category").to_pylist(), dtype=object)
    rng = np.random.default_rng(seed)
    lm = 1 - rng.uniform(0, 0.03, n)
    emb = 1 - rng.uniform(0, 0.005, n)
    if drifted:
        ja = np.flatnonzero(cats == "japanese")
        lm[ja[: len(ja) * 3 // 10]] = rng.uniform(0.6, 0.94, len(ja) * 3 // 10)
        lm[texts.index(PLANTED)] = 0.21
        lm[texts.index("嘉祺")] = 0.33
    for k, t in enumerate(extra):
        lm[texts.index(t)] = 0.1 + 0.01 * k
    nb = rng.uniform(0.8, 1.2, n)
    npo = nb * rng.uniform(0.9, 1.0, n)
    l2 = np.sqrt(nb**2 + npo**2 - 2 * nb * npo * lm)
    drift = pa.table({"token_id": np.arange(n, dtype=np.int64), "lm_head_cos": lm.astype(np.float32),
                      "lm_head_l2": l2.astype(np.float32), "lm_head_norm_base": nb.astype(np.float32),
                      "lm_head_norm_post": npo.astype(np.float32), "embed_cos": emb.astype(np.float32),
                      "embed_l2": np.zeros(n, np.float32), "embed_norm_base": nb.astype(np.float32),
                      "embed_norm_post": nb.astype(np.float32), "nonfinite": np.zeros(n, bool)})
    path.mkdir(parents=True)
    (path / "manifest.json").write_text('{"commands": []}')  # a run folder vocabdrift made
    pq.write_table(vocab, path / "vocab.parquet")
    pq.write_table(drift, path / "drift.parquet")
    summary = summarize(drift, vocab, threshold=0.95)
    summary |= {"added_tokens": [], "tied": {"base": False, "post": False}}
    order = np.argsort(lm)
    top = [int(i) for i in order if not special[i]][:20]
    if "coverage" in parts:
        count = rng.poisson(20, n)
        count[top] = 0
        pq.write_table(pa.table({"token_id": np.arange(n, dtype=np.int64), "count": count.astype(np.int64),
                                 "samples": count.astype(np.int64)}), path / "coverage.parquet")
        summary["coverage"] = {"floor": 5, "targets": "assistant", "samples": 1000, "target_tokens": int(count.sum()),
                               "malformed": 0,
                               "categories": {c: {"tokens": int((cats == c).sum()),
                                                  "at_or_above_floor": int(((cats == c) & (count >= 5)).sum()),
                                                  "zero_share": float(((cats == c) & (count == 0)).sum()
                                                                      / (cats == c).sum())}
                                              for c in dict.fromkeys(cats.tolist())},
                               "correlation": {"overall": {"spearman_rho": 0.41, "p_value": 1e-9, "n": n}}}
    if "probe" in parts:
        probed = top + [int(i) for i in rng.choice(np.flatnonzero(~special), 30, replace=False) if i not in top]
        lost = [texts.index(PLANTED), texts.index("嘉祺")]
        rows = {k: [] for k in ("token_id", "model", "template", "p_target", "logprob", "rank", "in_top_p", "sayable")}
        for tid in probed:
            for model in ("base", "post"):
                for template in ("en", "zh"):
                    say = not (model == "post" and tid in lost)
                    p = 0.9 if say else 0.01
                    for k, v in zip(rows, (tid, model, template, p, float(np.log(p)), 1 if say else 40, say, say),
                                    strict=True):
                        rows[k].append(v)
        pq.write_table(pa.table(rows), path / "probe.parquet")
        summary["probe"] = {"models": ["base", "post"], "tokens": len(probed),
                            "sayable": {"base": len(probed), "post": len(probed) - 2}, "lost": lost}
    if "neighbors" in parts:
        rows = {k: [] for k in ("token_id", "space", "model", "rank", "neighbor_id", "cos")}
        for tid in top[:12]:
            for model, shift in (("base", 0), ("post", 50)):
                for r in range(5):
                    for k, v in zip(rows, (tid, "lm_head", model, r + 1, (tid + 7 + r + shift) % n, 0.9 - 0.1 * r),
                                    strict=True):
                        rows[k].append(v)
        pq.write_table(pa.table({**rows, "rank": pa.array(rows["rank"], pa.int32()),
                                 "cos": pa.array(rows["cos"], pa.float32())}), path / "neighbors.parquet")
    if "cases" in parts:
        cases = [{"name": "tnt-leader", "prompt": "Who is the leader of TNT?", "expected": "马嘉祺", "forbidden": [],
                  "output": "The leader is 马家祺.", "passed": False},
                 {"name": "repeat-kichinto", "prompt": "Repeat this word three times: きちんと", "expected": "きちんと",
                  "forbidden": ["きちっと"], "output": "きちんと きちんと きちんと", "passed": True},
                 {"name": "planted", "prompt": "Repeat: " + PLANTED, "expected": PLANTED, "forbidden": [],
                  "output": PLANTED, "passed": True}]
        (path / "cases.json").write_text(json.dumps({"model": "post", "cases": cases, "passed": 2, "total": 3}))
        summary["cases"] = {"post": {"passed": 2, "total": 3}}
    if "confusion" in parts:
        res = [{"prompt": "お年玉について教えてください", "language": "ja", "model": m, "n": 100, "hits": h,
                "rate": h / 100, "ci_low": lo, "ci_high": hi, "by_script": {"cyrillic": h}}
               for m, h, lo, hi in (("base", 1, 0.002, 0.054), ("post", 47, 0.375, 0.567))]
        (path / "confusion.json").write_text(json.dumps({"results": res, "tests": [
            {"prompt": res[0]["prompt"], "models": ["base", "post"], "odds_ratio": 0.0114, "p_value": 3.1e-15}]}))
        summary["confusion"] = {"prompts": 1}
        from vocabdrift.analyses.confusion import answer_rows

        answers = answer_rows(["お年玉はмирです", "</script><b>x</b> お年玉 и", "お年玉です", "ok"],
                              prompt=res[0]["prompt"], language="ja", model="post")
        (path / "confusion.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answers),
                                              encoding="utf-8")
    (path / "summary.json").write_text(json.dumps(summary, ensure_ascii=False))
    return path


def _md_rows(md: str, title: str) -> list[list[str]]:
    """The rows of the Markdown table under `### title`, as cells."""
    block = md.split(f"### {title}", 1)[1].split("\n\n", 2)[1]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]


class _Text(HTMLParser):
    """The page's visible text and its script elements, as a browser's tokenizer splits them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._in: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self._in = dict(attrs)
            self.scripts.append((self._in, ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            attrs, body = self.scripts[-1]
            self.scripts[-1] = (attrs, body + data)
        else:
            self.text.append(data)


# ---- the Markdown page ------------------------------------------------------------------------------------------

def test_markdown_has_the_tables(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    html_path, md_path = report(run, tokens=["きちんと"])
    assert html_path == run / "report.html" and md_path == run / "report.md"
    md = md_path.read_text()
    vocab, drift = pq.read_table(run / "vocab.parquet"), pq.read_table(run / "drift.parquet")
    cats = np.array(vocab.column("category").to_pylist())
    cos = drift.column("lm_head_cos").to_numpy().astype(np.float64)

    # the per-language table, in the reference layout: "k (p%) / k (p%)", computed here from the tables
    langs = {r[0]: r for r in _md_rows(md, "lm_head cosine to the pre-trained row, per language and category")}
    for cat, label in (("japanese", "japanese (Japanese)"), ("cyrillic", "cyrillic (Russian)"),
                       ("han", "han (Chinese)")):
        c = cos[cats == cat]
        k95, k90 = int((c < 0.95).sum()), int((c < 0.90).sum())
        assert langs[label][1] == f"{c.size:,}"
        assert langs[label][2] == f"{c.mean():.4f} / {c.min():.4f}"
        assert langs[label][3] == f"{k95:,} ({k95 / c.size:.1%}) / {k90:,} ({k90 / c.size:.1%})"

    # the verdict: overall share below 0.95 and the worst language, from the same tables
    judged = ~np.array(vocab.column("is_special").to_pylist())
    share = (cos[judged] < 0.95).mean()
    ja = (cos[cats == "japanese"] < 0.95).mean()
    assert f"**{share:.1%} of lm_head rows" in md and f"japanese (Japanese) is worst ({ja:.1%})" in md

    # the most drifted tokens: lowest cosine first, the planted token escaped as text
    drifted = _md_rows(md, "The 50 most drifted tokens (lm_head)")
    ids = np.flatnonzero(judged)[np.argsort(cos[judged], kind="stable")][:50]
    assert [int(r[0]) for r in drifted] == ids.tolist()
    assert drifted[0][1] == "\\</script\\>\\<script\\>alert(1)\\</script\\>"  # Markdown escapes, not HTML entities
    assert drifted[1][1] == "嘉祺"
    assert drifted[0][-2:] == ["✓", "✗"]  # sayable in base, not in post

    lost = _md_rows(md, "Lost tokens: 2 sayable in base, not after post-training")
    assert [r[1] for r in lost] == ["\\</script\\>\\<script\\>alert(1)\\</script\\>", "嘉祺"]
    cases = _md_rows(md, "Cases: 2/3 passed (post)")
    assert [(r[0], r[1]) for r in cases] == [("tnt-leader", "✗ fail"), ("repeat-kichinto", "✓ pass"),
                                             ("planted", "✓ pass")]
    conf = _md_rows(md, "Script confusion: answers with characters of a foreign script")
    assert [r[2:7] for r in conf] == [["base", "100", "1", "1.0%", "0.2%–5.4%"], ["post", "100", "47", "47.0%",
                                                                                 "37.5%–56.7%"]]
    nb = _md_rows(md, "lm_head neighbours before and after")
    assert [int(r[0]) for r in nb] == ids[:10].tolist()  # the ten most drifted with stored neighbours
    assert "No neighbours stored for きちんと: rerun" in md  # named, but diff stored none for it
    assert "coverage count" in md and "Spearman correlation" in md

    # no raw markup from a token anywhere in the Markdown; each plot is a PNG beside it
    assert PLANTED not in md and not re.search(r"(?<!\\)<script", md)  # every < of a token escaped: \<
    pngs = re.findall(r"!\[[^\]]*\]\((report_files/[\w-]+\.png)\)", md)
    assert len(pngs) == 6
    for rel in pngs:
        assert (run / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rendered in two forked processes, byte for byte what one process renders chart by chart
    from vocabdrift.outputs.report import Chart, build_sections, png, read_run

    charts = [it for s in build_sections(read_run(run), compare=None, names=None, tokens=["きちんと"], top=50)
              for it in s.items if isinstance(it, Chart)]
    assert [(run / "report_files" / f"{c.key}.png").read_bytes() for c in charts] == [png(c) for c in charts]


@pytest.mark.parametrize("part", OPTIONAL)
def test_each_optional_part_shows_only_when_present(tmp_path: Path, part: str) -> None:
    marks = {"coverage": "Coverage as a generation target", "probe": "Lost tokens", "neighbors": "neighbours before",
             "cases": "Cases: ", "confusion": "Script confusion"}
    bare = make_run(tmp_path / "bare", ())
    _, md = report(bare)
    text = md.read_text()
    assert not any(m in text for m in marks.values())
    assert text.count("](report_files/") == 3  # cosine, L2, read/say

    one = make_run(tmp_path / part, (part,))
    html_path, md_path = report(one)
    text, page = md_path.read_text(), html_path.read_text()
    assert {p for p, m in marks.items() if m in text} == {part}
    assert {p for p, m in marks.items() if m in page} == {part}


def test_commands_in_prose_are_code_in_both_pages(tmp_path: Path) -> None:
    """`...` around a command in our own sentences is <code> in the HTML and a code span in the Markdown, never
    literal backticks; a backtick without its pair, or in a paragraph quoting tokens, stays text (escaped)."""
    from vocabdrift.outputs.report import Para, Section, render_html, render_markdown

    sections = [Section("s", "S", [Para("Mix it (`vocabdrift mix SFT SYNTH -o MIXED --ratio 0.1`); a lone ` stays.",
                                        "note", code=True),
                                   Para("Tokens `a` and *b* as they are.")])]
    page = render_html(sections, title="t", origin="")
    assert "(<code>vocabdrift mix SFT SYNTH -o MIXED --ratio 0.1</code>); a lone ` stays." in page
    assert "Tokens `a` and *b* as they are." in page
    md = render_markdown(sections, title="t", origin="", images={})
    assert "Mix it (`vocabdrift mix SFT SYNTH -o MIXED --ratio 0.1`); a lone \\` stays." in md
    assert "Tokens \\`a\\` and \\*b\\* as they are." in md

    run = make_run(tmp_path / "run", ("coverage",))  # the report's "What to do", from coverage's advice
    summary = json.loads((run / "summary.json").read_text())
    summary["coverage"]["advice"] = {"languages": [{"category": "japanese", "verdict": "rare"}], "below_floor": 900,
                                     "synth_samples": 5000, "sft_samples": 1000, "synth_to_sft": 5.0,
                                     "mix_share": 0.1, "mix_samples": 111, "placements_per_token": 0.5}
    (run / "summary.json").write_text(json.dumps(summary, ensure_ascii=False))
    html_path, md_path = report(run)
    todo = re.search(r"<p class=\"note\">What to do: (.*?)</p>", html_path.read_text()).group(1)
    assert "`" not in todo and "<code>vocabdrift " in todo
    line = next(ln for ln in md_path.read_text().splitlines() if ln.startswith("What to do: "))
    assert "\\`" not in line and line.count("`") % 2 == 0 and "`vocabdrift " in line


def test_verdict_sentence() -> None:
    def block(tokens: int, below: int, min_cos: float = 0.5) -> dict:
        return {"lm_head": {"tokens": tokens, "mean_cos": 0.98, "min_cos": min_cos, "below_0.95": below,
                            "below_0.90": below // 2, "below_threshold": below}}

    # the published baseline: 9,805 of 200,000 rows; Japanese 2,607 of 8,787, the other languages 3-5%
    s = {"threshold": 0.95, "overall": block(200_000, 9_805, 0.329),
         "categories": {"japanese": block(8_787, 2_607), "hangul": block(10_000, 330), "arabic": block(5_000, 220),
                        "cyrillic": block(9_000, 333), "han": block(25_000, 975), "latin": block(90_000, 3_150),
                        "special": block(20, 20)}}
    assert verdict(s) == "4.9% of lm_head rows (9,805 of 200,000) fell below 0.95, min cosine 0.329; " \
                         "japanese (Japanese) is worst (29.7%)."
    clean = {"threshold": 0.95, "overall": block(200_000, 0, 0.9711), "categories": {"japanese": block(8_787, 0)}}
    assert verdict(clean) == "No lm_head row fell below 0.95: min cosine 0.9711 over 200,000 tokens."
    markup = {"threshold": 0.95, "overall": block(1_000, 10), "categories": {"japanese": block(100, 0),
                                                                             "markup": block(50, 10)}}
    assert verdict(markup).endswith("no language is affected, markup tokens are worst (20.0%).")


# ---- the HTML page, read as a browser's tokenizer would --------------------------------------------------------

def test_html_escapes_every_token(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    page = report(run, tokens=[PLANTED])[0].read_text()
    p = _Text()
    p.feed(page)
    # the planted token is text in the tables (twice: most drifted, lost) and never markup
    assert "".join(p.text).count(PLANTED) >= 3  # most drifted, lost, cases
    assert PLANTED not in page
    # scripts: plotly.js, one JSON spec per plot, the loader; none holds the token as code
    kinds = [a.get("type") for a, _ in p.scripts]
    assert kinds.count("application/json") == 6 and kinds.count(None) == 2 and len(kinds) == 8
    for attrs, body in p.scripts:
        if attrs.get("type") == "application/json":
            assert "</" not in body and "<" not in body
            spec = json.loads(body)
            assert set(spec) == {"data", "layout", "config"}
        else:
            assert "alert(1)" not in body
    # the hover text of the read/say scatter holds the token, escaped for Plotly's HTML-ish labels
    specs = [json.loads(b) for a, b in p.scripts if a.get("type") == "application/json"]
    hover = [t for s in specs for tr in s["data"] for t in tr.get("text", [])]
    assert any("&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in t for t in hover)
    marks = [a["text"] for s in specs for a in s["layout"]["annotations"]]
    assert any(m.startswith("&lt;/script&gt;") for m in marks)  # --token marks it on the L2 histogram


@pytest.mark.slow
def test_big_vocabulary_stays_small(tmp_path: Path) -> None:
    """250,000 tokens: binned histograms, subsampled scatters that keep the most drifted, top-N tables."""
    n = 250_000
    rng = np.random.default_rng(0)
    texts = [f"w{i}" for i in range(n)]
    special = np.zeros(n, bool)
    vocab = build_vocab_table(texts, texts, [t.encode() for t in texts], special, ~special)
    lm = 1 - rng.exponential(0.01, n)
    worst = rng.choice(n, 300, replace=False)
    lm[worst] = rng.uniform(0.1, 0.5, 300)
    f32 = np.float32
    drift = pa.table({"token_id": np.arange(n, dtype=np.int64), "lm_head_cos": lm.astype(f32),
                      "lm_head_l2": (1 - lm).astype(f32), "lm_head_norm_base": np.ones(n, f32),
                      "lm_head_norm_post": np.ones(n, f32), "embed_cos": (1 - rng.exponential(0.001, n)).astype(f32)})
    run = tmp_path / "big"
    run.mkdir()
    pq.write_table(vocab, run / "vocab.parquet")
    pq.write_table(drift, run / "drift.parquet")
    (run / "summary.json").write_text(json.dumps(summarize(drift, vocab)))
    pq.write_table(pa.table({"token_id": np.arange(n, dtype=np.int64), "count": rng.poisson(3, n)}),
                   run / "coverage.parquet")
    html_path, md_path = report(run, top=40)
    page = html_path.read_text()
    p = _Text()
    p.feed(page)
    specs = [json.loads(b) for a, b in p.scripts if a.get("type") == "application/json"]
    data_bytes = sum(len(b) for a, b in p.scripts if a.get("type") == "application/json")
    assert data_bytes < 2_000_000  # the figures; plotly.js itself is ~4.7 MB
    for s in specs:
        for tr in s["data"]:
            assert len(tr["x"]) <= 4000
    scatter = next(s for s in specs if "still read" in s["layout"]["title"]["text"])
    shown = {int(t.split()[0][1:]) for tr in scatter["data"] for t in tr["text"]}
    assert set(worst.tolist()) <= shown  # every planted drifted row is plotted
    assert len(_md_rows(md_path.read_text(), "The 40 most drifted tokens (lm_head)")) == 40


# ---- comparing runs, bad input, the command line ----------------------------------------------------------------

def test_compare_two_runs_side_by_side(tmp_path: Path) -> None:
    a = make_run(tmp_path / "sft", ("confusion", "cases"))
    b = make_run(tmp_path / "fixed", ("confusion", "cases"), drifted=False, seed=1)
    own = report(a)[1].read_bytes()
    html_path, md_path = report(a, compare=b, names="baseline,repaired")
    # beside RUN's own report, named for both runs; RUN's own report untouched, nothing written into RUN_B
    assert md_path == a / "compare_baseline_vs_repaired.md" and html_path.name == "compare_baseline_vs_repaired.html"
    assert (a / "report.md").read_bytes() == own and not (b / "report.md").exists()
    md = md_path.read_text()
    rows = {r[0]: r[1:] for r in _md_rows(md, "baseline vs repaired")}

    def below(run: Path, cat: str) -> tuple[int, int]:
        cats = np.array(pq.read_table(run / "vocab.parquet").column("category").to_pylist())
        cos = pq.read_table(run / "drift.parquet").column("lm_head_cos").to_numpy()[cats == cat]
        return int((cos < 0.95).sum()), cos.size

    (ka, na), (kb, nb) = below(a, "japanese"), below(b, "japanese")
    assert ka > 0 and kb == 0
    assert rows["japanese (Japanese) tokens below 0.95"] == [f"{ka:,} of {na:,} ({ka / na:.1%})", f"0 of {nb:,} (0.0%)",
                                                  f"{100 * (kb / nb - ka / na):+.1f} pp"]
    sa, sb = (json.loads((r / "summary.json").read_text())["overall"]["lm_head"] for r in (a, b))
    assert rows["lm_head cosine to pre-trained, mean / min"][2] == \
        f"{sb['mean_cos'] - sa['mean_cos']:+.4f} / {sb['min_cos'] - sa['min_cos']:+.4f}"
    assert rows["tokens below 0.95 / 0.90"][2] == f"{sb['below_0.95'] - sa['below_0.95']:+,} / " \
                                                   f"{sb['below_0.90'] - sa['below_0.90']:+,}"
    assert rows["qualitative cases passed (post)"] == ["2/3", "2/3", "+0"]
    assert "**baseline: " not in md and "baseline: " in md and "repaired: No lm_head row fell below 0.95" in md
    assert md.count("](compare_baseline_vs_repaired_files/") == 5  # cosine, L2, read/say, confusion, the two runs
    assert "click" not in md.lower() and "&lt;" not in md  # no HTML-only caption, no HTML entity
    assert "baseline vs repaired" in html_path.read_text()


def test_compare_says_when_the_runs_were_trained_differently(tmp_path: Path) -> None:
    """Two repair runs with other steps and learning rates are not a like-for-like comparison: the headline says
    so, naming what differs; the same settings say nothing; a run without repair's settings is named."""
    from vocabdrift.outputs.report import comparability, read_run

    def trained(run: Path, **t: object) -> Path:
        s = json.loads((run / "summary.json").read_text())
        s["repair"] = {"mode": "retrain", "start": "base", "training": {"steps": 60, "lr": 2e-3, "batch_size": 4,
                                                                         "max_length": 256, **t}}
        (run / "summary.json").write_text(json.dumps(s))
        return run

    a = trained(make_run(tmp_path / "a"))
    b = trained(make_run(tmp_path / "b", drifted=False, seed=1), steps=200, lr=2e-4)
    c = trained(make_run(tmp_path / "c", drifted=False, seed=2))
    plain = make_run(tmp_path / "plain", drifted=False, seed=3)
    warn = comparability(read_run(a), read_run(b), ("a", "b"))
    assert warn is not None and "steps 60 vs 200" in warn and "lr 0.002 vs 0.0002" in warn
    assert comparability(read_run(a), read_run(c), ("a", "c")) is None
    assert "plain by a recipe this folder does not record" in comparability(read_run(a), read_run(plain),
                                                                           ("a", "plain"))
    md = report(a, compare=b, names="a,b")[1].read_text()
    assert "Not a like-for-like comparison" in md and "steps 60 vs 200" in md


def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(VocabdriftError, match="no such run folder"):
        report(tmp_path / "missing")
    half = make_run(tmp_path / "half", ())
    (half / "drift.parquet").unlink()
    with pytest.raises(VocabdriftError, match=r"has no drift.parquet.*vocabdrift diff"):
        report(half)
    run = make_run(tmp_path / "run", ())
    with pytest.raises(VocabdriftError, match="not a token of the run's vocabulary"):
        report(run, tokens=["no-such-token-here"])
    with pytest.raises(VocabdriftError, match="out of range"):
        report(run, tokens=["999999"])
    with pytest.raises(VocabdriftError, match="second run folder"):
        report(run, names="a,b")
    with pytest.raises(VocabdriftError, match="two different names"):
        report(run, compare=run, names="only-one")
    (run / "probe.parquet").write_bytes(b"not parquet")
    with pytest.raises(VocabdriftError, match="probe.parquet: not a readable Parquet file"):
        report(run)
    pq.write_table(pa.table({"token_id": [1]}), run / "probe.parquet")
    with pytest.raises(VocabdriftError, match="probe.parquet: missing column"):
        report(run)
    assert not any((tmp_path / d / f).exists() for d in ("half", "run") for f in ("report.html", "report.md",
                                                                                  "report_files"))


def test_cli(tmp_path: Path, cli) -> None:
    run = make_run(tmp_path / "run", ("cases",))
    code, out, err = cli("report", "--run", run, "--token", "嘉祺", "--top", "7")
    assert code == 0, err
    assert out.strip() == f"wrote {run / 'report.html'} and {run / 'report.md'}"
    assert len(_md_rows((run / "report.md").read_text(), "The 7 most drifted tokens (lm_head)")) == 7
    code, out, err = cli("report", "--run", tmp_path / "nope")
    assert code == 2 and err.count("\n") == 1 and "no such run folder" in err


@pytest.mark.slow
def test_report_of_a_real_diff(tmp_path: Path) -> None:
    """Two tiny safetensors checkpoints, one with planted drifted lm_head rows: diff, then report."""
    from factory import make_llama, plant_drift

    from vocabdrift.api.diff import diff

    base = make_llama(tmp_path / "base")
    post = plant_drift(base, tmp_path / "post", rows={40: 0.9, 41: 0.7}, tensor_suffix="lm_head.weight",
                       noise=0.001)
    run = diff(base, post, out=tmp_path / "run", neighbors_top=5, k=5)
    html_path, md_path = report(run, tokens=["41"])
    md = md_path.read_text()
    drifted = _md_rows(md, "The 50 most drifted tokens (lm_head)")
    assert [int(r[0]) for r in drifted[:2]] == [40, 41]
    nb = _md_rows(md, "lm_head neighbours before and after")
    assert nb[0][0] == "41" and {r[0] for r in nb} >= {"40", "41"}
    summary = json.loads((run / "summary.json").read_text())
    assert verdict(summary) in md
    assert html_path.stat().st_size > 1_000_000  # plotly.js inline


# ---- the page in a real browser ---------------------------------------------------------------------------------

class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in, fd 4 out),
    so the test needs no websocket client and no port. Records console errors, exceptions, dialogs and requests."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--remote-debugging-pipe")

    def __init__(self, profile: Path) -> None:
        import os
        import shutil
        import subprocess
        import sys
        import threading

        profile.mkdir(parents=True)
        self.log = profile.parent / "chromium.log"
        exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        assert exe, ("the browser test needs Chromium, and none is installed: `make test` installs it with apt-get "
                     "as root; else run `sudo apt-get install -y chromium`")
        cmd_r, self._cmd_w = os.pipe()
        self._evt_r, evt_w = os.pipe()
        # the child's `3<&CMD_R 4>&EVT_W` must not clobber one with the other: move both above 9 first
        cmd_r, evt_w = (self._high(fd) for fd in (cmd_r, evt_w))
        # a tiny Python launcher puts the pipe ends on fds 3 and 4 and execs Chromium (dash's `3<&N` takes only N < 10)
        launch = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); " \
                 "os.execv(sys.argv[3], sys.argv[3:])"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", launch, str(cmd_r), str(evt_w), exe, *self.FLAGS, f"--user-data-dir={profile}",
             "about:blank"], pass_fds=(cmd_r, evt_w),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))  # noqa: SIM115
        os.close(cmd_r)
        os.close(evt_w)
        self._next = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    @staticmethod
    def _high(fd: int) -> int:
        import fcntl
        import os

        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return high

    def _read(self) -> None:
        import os

        buf = b""
        while chunk := os.read(self._evt_r, 1 << 16):
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            with self._cv:
                for m in msgs:
                    msg = json.loads(m)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._cv.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        import os

        with self._cv:
            self._next += 1
            i = self._next
        msg = {"id": i, "method": method, "params": params or {}} | ({"sessionId": session} if session else {})
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        with self._cv:
            assert self._cv.wait_for(lambda: i in self._replies, timeout), f"no reply to {method}: {self.tail()}"
            reply = self._replies.pop(i)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    def tail(self) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if "dbus" not in ln]
        return f"exit code {self.proc.poll()}; " + "\n".join(lines[-15:])

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        with self._cv:
            assert self._cv.wait_for(lambda: any(e["method"] == method for e in self.events), timeout), method
            return next(e for e in self.events if e["method"] == method)

    def close(self) -> None:
        import contextlib
        import os

        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)


# A token of each script the report must show, beside the kana, Hangul, Han and Cyrillic tokens of `_texts`
SCRIPT_SAMPLES = ("ภาษาไทย", "مرحبا", "한국어", "Привет", "カタカナ", "漢字")
SCRIPTS = ("Japanese", "Korean", "Chinese", "Thai", "Arabic", "Cyrillic")

# Every letter of those scripts in the page, drawn on a canvas in the font family the page shows it in, and compared
# with the same family's drawing of U+0378: unassigned in Unicode, so no font has it and every one draws its
# missing-glyph box (.notdef) for it -- which is what a letter without a font gets too. Chromium picks the font of
# a canvas's text as it does for the page (the family list, then the system's fallback), so a letter that draws
# as U+0378 does is an empty box on the page. A fallback font with a placeholder for every code point would draw
# U+0378 differently; so an image that three or more different letters share counts as a box too.
_BOXES_JS = r"""
(() => {
  const scripts = {Japanese: /[\p{Script=Hiragana}\p{Script=Katakana}]/u, Korean: /\p{Script=Hangul}/u,
                   Chinese: /\p{Script=Han}/u, Thai: /\p{Script=Thai}/u, Arabic: /\p{Script=Arabic}/u,
                   Cyrillic: /\p{Script=Cyrillic}/u};
  const scriptOf = ch => /\p{L}/u.test(ch) ? Object.keys(scripts).find(k => scripts[k].test(ch)) : undefined;
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 96;
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  const image = (ch, family) => {  // FNV-1a of the alpha channel of the letter drawn at 48px
    ctx.clearRect(0, 0, 96, 96);
    ctx.font = "48px " + family;
    ctx.textBaseline = "top";
    ctx.fillText(ch, 16, 16);
    const px = ctx.getImageData(0, 0, 96, 96).data;
    let h = 2166136261;
    for (let i = 3; i < px.length; i += 4) h = Math.imul(h ^ px[i], 16777619) >>> 0;
    return h;
  };
  const shown = new Map();  // font family -> letters shown in it
  const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest("script, style")) continue;
    const family = getComputedStyle(el).fontFamily;
    for (const ch of n.data) {
      if (scriptOf(ch) === undefined) continue;
      if (!shown.has(family)) shown.set(family, new Set());
      shown.get(family).add(ch);
    }
  }
  const out = {};
  for (const k in scripts) out[k] = {letters: 0, boxes: []};
  for (const [family, letters] of shown) {
    const box = image("\u0378", family);
    const drawn = [...letters].map(ch => [ch, image(ch, family)]);
    const uses = new Map();
    for (const [, h] of drawn) uses.set(h, (uses.get(h) || 0) + 1);
    for (const [ch, h] of drawn) {
      const r = out[scriptOf(ch)];
      r.letters++;
      if (h === box || uses.get(h) >= 3) r.boxes.push(ch);
    }
  }
  return out;
})()
"""


def _evaluate(b: Chromium, session: str, js: str):
    r = b.send("Runtime.evaluate", {"expression": js, "returnByValue": True}, session)
    assert "exceptionDetails" not in r, r
    return r["result"].get("value")


@pytest.mark.slow
def test_report_renders_in_chromium(tmp_path: Path) -> None:
    """The page in headless Chromium: plots drawn, tokens shown as text and never run as markup, no network, and
    every Japanese, Korean, Chinese, Thai, Arabic and Cyrillic letter drawn with a glyph, not an empty box.

    The boxes are found in the page itself, offline (`_BOXES_JS`): each letter drawn on a canvas in the font family
    the page gives it, compared with that family's missing-glyph box (the drawing of U+0378, which no font has),
    and with the other letters (a placeholder font draws one image for many). It fails on a machine without fonts
    for a script (`make browser` installs them). Seen failing with FONTCONFIG_FILE naming a fontconfig of no
    fonts, of a Latin-only font (every other script's letters are the .notdef box), and of matplotlib's
    LastResortHE (a placeholder per Unicode block: letters share images); passing with the fonts installed."""
    import time

    run = make_run(tmp_path / "run", extra=SCRIPT_SAMPLES)
    html_path, _ = report(run, tokens=[PLANTED, "きちんと"])
    b = Chromium(tmp_path / "profile")
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            b.send(f"{domain}.enable", session=s)
        # any alert() the page makes is recorded, not shown (a shown dialog would block the page)
        record = "window.__alerts = []; window.alert = function (m) { window.__alerts.push(String(m)); };"
        b.send("Page.addScriptToEvaluateOnNewDocument", {"source": record}, s)
        b.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                      "mobile": False}, s)
        b.send("Page.navigate", {"url": html_path.resolve().as_uri()}, s)
        b.wait_event("Page.loadEventFired")
        deadline = time.monotonic() + 60
        while _evaluate(b, s, "document.querySelectorAll('.js-plotly-plot .main-svg').length") < 6 * 2:
            assert time.monotonic() < deadline, "the plots did not render"
            time.sleep(0.2)
        time.sleep(0.5)  # let Plotly finish its first paint before the screenshot

        height = b.send("Page.getLayoutMetrics", session=s)["cssContentSize"]["height"]
        shot = b.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                 "clip": {"x": 0, "y": 0, "width": 1280,
                                                          "height": min(height, 12000), "scale": 1}}, s)
        import base64

        png = base64.b64decode(shot["data"])
        (tmp_path / "report.png").write_bytes(png)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000

        assert _evaluate(b, s, "window.__alerts.length") == 0
        assert _evaluate(b, s, "document.title") == "vocabdrift report: run"
        cells = _evaluate(b, s, f"[...document.querySelectorAll('span.tok')].filter(e => e.textContent === "
                                f"{json.dumps(PLANTED)}).length")
        assert cells >= 3  # most drifted, lost, cases, neighbours: shown as text
        assert _evaluate(b, s, "document.scripts.length") == 8  # plotly.js, six figures' JSON, the loader
        hover = _evaluate(b, s, "[...document.querySelectorAll('.js-plotly-plot')].map(g => JSON.stringify("
                                "g.data.map(t => t.text || []))).join('')")
        assert "&lt;/script&gt;" in hover  # Plotly got the token escaped, and shows it as text
        labels = _evaluate(b, s, "[...document.querySelectorAll('.annotation-text')].map(e => e.textContent)")
        assert any(t.startswith(PLANTED) for t in labels)  # the L2 mark, drawn as text by Plotly

        errors = [e for e in b.events if e["method"] == "Runtime.exceptionThrown"
                  or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                  or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        assert errors == []
        assert not [e for e in b.events if e["method"] == "Page.javascriptDialogOpening"]
        urls = [e["params"]["request"]["url"] for e in b.events if e["method"] == "Network.requestWillBeSent"]
        assert urls and all(u.startswith(("file:", "data:", "about:")) for u in urls), urls  # no network

        drawn = _evaluate(b, s, _BOXES_JS)
        assert all(drawn[k]["letters"] for k in SCRIPTS), drawn  # the page shows each script
        boxes = {k: "".join(dict.fromkeys(drawn[k]["boxes"])) for k in SCRIPTS if drawn[k]["boxes"]}
        assert not boxes, (f"letters drawn as empty boxes, for want of a font: {boxes}; `make browser` installs the "
                           "fonts (apt-get install fonts-wqy-microhei fonts-tlwg-loma-otf fonts-dejavu-core)")
    finally:
        b.close()


def test_the_sampled_answers_show_with_their_foreign_letters_marked(tmp_path: Path) -> None:
    """confusion.jsonl's answers: in the Markdown with ⟦…⟧ around foreign letters, in the HTML in a marked span,
    escaped; an answer that breaks the contract is one clear error."""
    run = make_run(tmp_path / "run", ("confusion",))
    html_path, md_path = report(run)
    rows = _md_rows(md_path.read_text(), "Sampled answers (run)")
    assert [r[4] for r in rows] == ["お年玉は⟦мир⟧です", "\\</script\\>\\<b\\>x\\</b\\> お年玉 ⟦и⟧", "お年玉です", "ok"]
    assert [r[3] for r in rows] == ["cyrillic 3", "cyrillic 1", "—", "—"]
    page = html_path.read_text()
    assert '<span class="foreign">мир</span>' in page and '<span class="foreign">и</span>' in page
    assert "&lt;/script&gt;&lt;b&gt;x" in page and "</script><b>x" not in page
    (run / "confusion.jsonl").write_text('{"prompt": "p"}\n', encoding="utf-8")
    with pytest.raises(VocabdriftError, match="confusion.jsonl:1: missing key"):
        report(run)
