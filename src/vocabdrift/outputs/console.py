"""Terminal tables (rich), built from the run folder's contents. Nothing here computes a number."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..analyses.vocab import CATEGORIES, LANGUAGES, category_label, token_label

if TYPE_CHECKING:
    import pyarrow as pa
    from rich.table import Table


# Third-party loggers that speak at WARNING about things a user of vocabdrift cannot act on (deprecations, "some
# weights were not used", GGUF conversion notes); off a terminal they are kept to errors.
_NOISY_LOGGERS = ("transformers", "huggingface_hub", "datasets", "accelerate", "torch", "urllib3", "filelock",
                  "tokenizers", "gguf", "numba", "ray", "vllm")


def quiet_third_party(*, terminal: bool) -> None:
    """Off a terminal (a log file, CI, a pipe), silence the libraries' own progress bars and warnings, so that
    stderr holds vocabdrift's lines only: tqdm bars (transformers' "Converting and de-quantizing GGUF tensors"
    is a plain tqdm, which reads TQDM_DISABLE when tqdm is first imported, so this runs before any library
    loads), the hub's bars, transformers' verbosity, and Python warnings raised outside vocabdrift. On a
    terminal nothing changes. An explicit setting in the environment wins."""
    if terminal:
        return
    import logging
    import os
    import warnings

    for var, value in (("TQDM_DISABLE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
                       ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(var, value)
    if not os.environ.get("PYTHONWARNINGS"):
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"vocabdrift(\.|$)")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _pct(k: int, n: int) -> str:
    """"5 (<0.1%)", never "5 (0.0%)": a share that rounds to zero is not zero."""
    if not n:
        return "0"
    pct = 100.0 * k / n
    return f"{k:,} (<0.1%)" if 0 < pct < 0.05 else f"{k:,} ({pct:.1f}%)"


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def _cos(x: float | None) -> str:
    """A row's cosine; NaN (the row became zero or holds NaN) is shown as undefined, not as a number."""
    return "—" if x is None else ("undefined" if x != x else f"{x:.4f}")


def category_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) for the per-language table: overall, the languages of docs/ARCHITECTURE.md, then the other
    categories."""
    cats = summary.get("categories", {})
    rows = [("overall", "All (non-special)"), ("reachable", "Reachable")]
    rows += [(c, category_label(c)) for c in LANGUAGES if c in cats]
    rows += [(c, c) for c in CATEGORIES if c in cats and c not in LANGUAGES]
    return rows


def drift_summary_table(summary: dict[str, Any], *, space: str = "lm_head", centered: bool = False) -> Table:
    """The per-language table in the layout of the reference table of docs/ARCHITECTURE.md; `centered`: the
    same table over the mean-centred cosines (`diff --center`). The title says when rows were folded."""
    from rich.table import Table

    thr = summary.get("threshold", 0.95)
    folded = bool((summary.get("options") or {}).get("fold_norm")) and space == "lm_head"
    if centered:
        summary = {**summary, **summary["centered"]}
    title = f"{space} cosine to BASE, per category" + (", mean-centred (--center)" if centered else "") + \
        (", rows folded with the final norm weight (--fold-norm)" if folded else "")
    t = Table(title=title, title_justify="left")
    # rows that became zero or NaN have no cosine; they are counted below every threshold and shown apart
    undefined = any(_block(summary, key)[space].get("undefined") for key, _ in category_rows(summary))
    cols = ("category", "tokens", "mean cos", "min cos", f"below {thr:g}", "below 0.90") + \
        (("zero/NaN rows",) if undefined else ())
    for col in cols:  # a category stays whole ("cyrillic (Russian)"), never wrapped over two lines
        t.add_column(col, justify="left" if col == "category" else "right", no_wrap=col == "category")
    for key, label in category_rows(summary):
        s = _block(summary, key)[space]
        t.add_row(label, f"{s['tokens']:,}", _f(s["mean_cos"]), _f(s["min_cos"]),
                  _pct(s["below_threshold"], s["tokens"]), _pct(s["below_0.90"], s["tokens"]),
                  *((_pct(s.get("undefined", 0), s["tokens"]),) if undefined else ()))
    return t


def _block(summary: dict[str, Any], key: str) -> dict[str, Any]:
    return summary[key] if key in ("overall", "reachable") else summary["categories"][key]


def drifted_tokens_table(top: pa.Table, *, title: str = "Most drifted lm_head rows") -> Table:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("id", "text", "category", "lm_head cos", "embed cos", "norm base→post"):
        t.add_column(col, justify="left" if col in ("text", "category") else "right", no_wrap=col == "category",
                     min_width=8 if col == "text" else None, overflow="fold")
    for r in top.to_pylist():
        t.add_row(str(r["token_id"]), token_label(r["text"]), category_label(r["category"]), _cos(r["lm_head_cos"]),
                  _cos(r["embed_cos"]), f"{r['lm_head_norm_base']:.3f}→{r['lm_head_norm_post']:.3f}")
    return t


def neighbors_console_table(nt: pa.Table, *, title: str) -> Table:
    """Neighbours side by side, one column per model; special tokens (unused and padding rows too) are marked ★,
    markup and byte tokens by their category: the intruders of a drifted row's neighbourhood."""
    from rich.table import Table

    rows = nt.to_pylist()
    models = list(dict.fromkeys(r["model"] for r in rows))
    t = Table(title=title, title_justify="left")
    t.add_column("rank", justify="right")
    for m in models:
        t.add_column(f"{m}: neighbour")
        t.add_column("cos", justify="right")
    k = max((r["rank"] for r in rows), default=0)
    by = {(r["model"], r["rank"]): r for r in rows}
    if rows and "category" in rows[0]:
        share = {m: sum(r["is_special"] or r["category"] in ("markup", "byte") for r in rows if r["model"] == m)
                 / max(1, sum(r["model"] == m for r in rows)) for m in models}
        t.caption = "special, markup and byte neighbours: " + ", ".join(f"{m} {v:.0%}" for m, v in share.items())
    for rank in range(1, k + 1):
        cells = [str(rank)]
        for m in models:
            r = by.get((m, rank))
            if r is None:
                cells += ["", ""]
            else:
                cat = r.get("category") or ""
                mark = " ★" if r["is_special"] else f" ({cat})" if cat in ("markup", "byte") else ""
                cells += [f"{token_label(r['text'], r['neighbor_id'])}{mark}", f"{r['cos']:.3f}"]
        t.add_row(*cells)
    return t


# ---- the other commands' tables (the CLI builds none of its own) ----------------------------------------------------

def _table(title: str, columns: tuple[str, ...], *, left: tuple[str, ...] = ()) -> Table:
    """A titled table; columns named in `left` are left-justified, the others right-justified."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:  # a category stays whole ("cyrillic (Russian)"), never wrapped over two lines
        t.add_column(c, justify="left" if c in left else "right", no_wrap=c == "category")
    return t


def vocab_categories_table(vocab: pa.Table) -> Table:
    """`vocab`: tokens per category."""
    from ..analyses.vocab import category_counts

    t = _table(f"{vocab.num_rows:,} tokens by category", ("category", "tokens"), left=("category",))
    for cat, n in category_counts(vocab).items():
        t.add_row(category_label(cat), f"{n:,}")
    return t


def coverage_categories_table(summary: dict[str, Any], under_covered: list[str], *, floor: int,
                              verdicts: dict[str, str] | None = None) -> Table:
    """`coverage`: per category, the reported languages first, then the other categories; the last column is the
    verdict of the recommendation printed below it (`analyses.recommend` on a diff run, else `analyses.advice`),
    so the table and the advice never disagree."""
    s = summary
    verdicts = verdicts or {x["category"]: x["verdict"] for x in (s.get("advice") or {}).get("languages", [])}
    if not verdicts:  # a summary without advice: the languages rarely targeted
        verdicts = dict.fromkeys(under_covered, "rare")
    t = _table(f"Coverage as a generation target ({s['samples']:,} samples, {s['target_tokens']:,} target tokens, "
               f"floor {floor})", ("category", "tokens", f">= {floor}", "zero share", "advice"),
               left=("category", "advice"))
    order = [c for c in LANGUAGES if c in s["categories"]] + [c for c in s["categories"] if c not in LANGUAGES]
    for cat in order:
        v = s["categories"][cat]
        t.add_row(category_label(cat), f"{v['tokens']:,}", f"{v['at_or_above_floor']:,}",
                  f"{v['zero_share']:.1%}", verdicts.get(cat, ""))
    return t


def below_floor_table(below: pa.Table, *, top: int) -> Table:
    """`coverage`: the rarest tokens below the floor."""
    cols = ("id", "text", "category", "count", "samples")
    t = _table(f"{below.num_rows:,} tokens below the floor (rarest first; the most drifted first when RUN holds a "
               "diff)", cols, left=cols)
    for row in below.slice(0, top).to_pylist():
        t.add_row(str(row["token_id"]), token_label(row["text"]), category_label(row["category"]), str(row["count"]),
                  str(row["samples"]))
    return t


def prune_categories_table(categories: dict[str, dict[str, int]], *, floor: int, threshold: float) -> Table:
    """`prune-suggest`: candidates per category."""
    t = _table(f"Prune candidates: count < {floor} and lm_head cos < {threshold}",
               ("category", "tokens", "candidates", "share"), left=("category",))
    for cat, v in categories.items():
        t.add_row(category_label(cat), f"{v['tokens']:,}", f"{v['candidates']:,}",
                  f"{v['candidates'] / max(1, v['tokens']):.1%}")
    return t


def prune_candidates_table(candidates: pa.Table, *, top: int) -> Table:
    """`prune-suggest`: the most drifted candidates."""
    cols = ("id", "text", "category", "count", "cos")
    t = _table(f"Most drifted of {candidates.num_rows:,} candidates", cols, left=cols)
    for row in candidates.slice(0, top).to_pylist():
        t.add_row(str(row["token_id"]), token_label(row["text"]), category_label(row["category"]), str(row["count"]),
                  f"{row['lm_head_cos']:.4f}")
    return t


def probe_outcomes_table(summary: dict[str, Any], *, top_p: float) -> Table:
    """`probe`: sayable tokens and outcomes per model."""
    outcomes = ("top1", "nucleus", "weak", "unsayable")
    t = _table(f"{summary['tokens']:,} tokens probed (sayable = kept by top-p {top_p})",
               ("model", "sayable", *outcomes), left=("model",))
    for m in summary["models"]:
        o = summary["outcomes"][m]
        t.add_row(m, f"{summary['sayable'][m]:,}", *(f"{o[k]:,}" for k in outcomes))
    return t


def probe_headline_table(headline: dict[str, Any]) -> Table:
    """`probe --base`: what leads: top-1 answers and the target's probability, BASE -> POST, for the probed
    tokens, the undrifted control tokens and each template."""
    t = _table("Probe: BASE -> POST (top-1: the model's first choice is the token)",
               ("tokens", "n", "top-1 BASE", "top-1 POST", "nucleus BASE", "nucleus POST", "median p BASE",
                "median p POST", "p POST/BASE"), left=("tokens",))
    rows = [("probed", headline.get("tokens")), ("undrifted control", headline.get("control"))]
    rows += [(f"  template {k}", g) for k, g in headline.get("templates", {}).items()]
    for label, g in rows:
        if g is None:
            continue
        n = g["n"]
        t.add_row(label, f"{n:,}", _pct(g["top1"]["base"], n), _pct(g["top1"]["post"], n),
                  _pct(g["nucleus"]["base"], n), _pct(g["nucleus"]["post"], n), f"{g['median_p']['base']:.3g}",
                  f"{g['median_p']['post']:.3g}", f"x{g['p_ratio']:.2g}")
    return t


def probe_tokens_table(rows: list[dict[str, Any]]) -> Table:
    """`probe --token`: one row per asked token and model: its best template's probability, rank, outcome."""
    t = _table("Per token (best template)", ("token", "id", "model", "p", "rank", "outcome", "template"),
               left=("token", "model", "outcome", "template"))
    for r in rows:
        t.add_row(token_label(r["text"]), str(r["token_id"]), r["model"], f"{r['p_target']:.3g}", f"{r['rank']:,}",
                  r["outcome"], r["template"])
    return t


def cases_table(model: str, cases: list[dict[str, Any]], *, passed: int, total: int) -> Table:
    """`cases`: pass or fail per case."""
    cols = ("case", "expected", "answer", "")
    t = _table(f"{model}: {passed}/{total} cases passed", cols, left=cols)
    for c in cases:
        t.add_row(c["name"], c["expected"], c["output"].strip().replace("\n", " ")[:60],
                  "[green]pass[/]" if c["passed"] else "[red]FAIL[/]")
    return t


def undertrained_tokens_table(tokens: dict[str, dict[str, Any]]) -> Table:
    """`undertrained --token`: Hypothesis 1 per asked token."""
    t = _table("Hypothesis 1: was the token trained?", ("token", "id", "embed norm", "percentile", "unembed rank"),
               left=("token",))
    for k, v in tokens.items():
        t.add_row(k, str(v["token_id"]), f"{v['embed_norm']:.4f}", f"{v['embed_norm_percentile']:.1f}",
                  f"{v['unembed_rank']:,}")
    return t


def confusion_table(results: list[dict[str, Any]]) -> Table:
    """`confusion`: the share of answers with letters of a foreign script, per prompt and model, and the answers
    mostly in the prompt's own script (without those, a low rate may only mean the model answers in English)."""
    cols = ("prompt", "lang", "model", "rate", "95% interval", "scripts", "own script")
    t = _table("Answers with letters of a foreign script", cols, left=cols[:3] + cols[5:6])
    for r in results:
        own = f"{r['native']}/{r['n']}" if "native" in r else "-"
        t.add_row(r["prompt"][:30], r["language"], r["model"], f"{r['hits']}/{r['n']} = {r['rate']:.0%}",
                  f"{r['ci_low']:.0%}–{r['ci_high']:.0%}", ", ".join(f"{k} {v}" for k, v in r["by_script"].items()),
                  own)
    return t


def collapse_line(collapse: dict) -> str:
    """Groups of near-identical rows, one line per space: `undertrained`'s summary["collapse"] (space -> block) or
    `diff`'s (space -> base, post and the change, with a few tokens of each)."""
    lines = []
    for space, c in collapse.items():
        post = c.get("post", c)
        cats = sorted(post.get("categories", {}).items(), key=lambda kv: -kv[1]["collapsed"])[:3]
        top = ", ".join(f"{k} {v['collapsed']:,} of {v['tokens']:,}" for k, v in cats)
        line = (f"{space}: {post['rows']:,} rows in {post['groups']:,} groups of near-identical rows "
                f"(cos >= {post['min_cos']:g})" + (f"; most: {top}" if top else ""))
        if "new" in c:
            line += f"; {c['new']:,} collapsed during post-training, {c['already']:,} already were"
            for key, what in (("new", "collapsed during post-training"), ("already", "already collapsed in BASE")):
                if c.get(f"{key}_tokens"):
                    more = c[key] - len(c[f"{key}_tokens"])
                    line += (f"\n  {what}: " + ", ".join(c[f"{key}_tokens"])
                             + (f" and {more:,} more" if more > 0 else ""))
        lines.append(line)
    return "\n".join(lines)


def intrusion_line(nb: dict) -> str:
    """`diff`'s neighbour intrusion (summary["neighbors"]) in one line: intruders and own category, before and
    after."""
    inn, own = nb.get("intrusion") or {}, nb.get("own_category") or {}

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    return (f"neighbour intrusion ({nb.get('tokens', 0)} tokens, k={nb.get('k')}): special/markup/byte neighbours "
            f"{pct(inn.get('base'))} -> {pct(inn.get('post'))}, own category {pct(own.get('base'))} -> "
            f"{pct(own.get('post'))}")


def evaluation_table(ev: Any) -> Table:
    """`evaluate`'s table (an `analyses.verdict.Evaluation`): one row per model, BASE and POST first."""
    conf = any(m.confusion_n for m in ev.models)
    t = _table(f"Say-ability of {ev.probed:,} probed tokens ({len(ev.lost):,} LOST in POST) and {ev.controls:,} "
               "undrifted controls", ("model", "probed sayable", "LOST back", "controls sayable", "held-out loss",
                                      f"rows below {0.95:g}", "min cos", *(("confusion",) if conf else ()),
                                      "verdict"), left=("model", "verdict"))
    for m in ev.models:
        extra = (f"{m.confusion_hits}/{m.confusion_n}" if m.confusion_n else "",) if conf else ()
        loss = "" if m.heldout_loss is None else f"{m.heldout_loss:.4f}" + (
            f" ({m.loss_vs_post:+.1%})" if m.loss_vs_post is not None and m.role == "candidate" else "")
        back = "" if m.lost_back is None else f"{m.lost_back:,}/{m.lost_total:,}"
        below = "" if m.below is None else f"{m.below:,}"
        fails = f" (template failure: {', '.join(m.failed_templates)})" if m.failed_templates else ""
        t.add_row(m.name, f"{m.probed.sayable:,}/{m.probed.n:,}", back, f"{m.control.sayable:,}/{m.control.n:,}",
                  loss, below, _cos(m.min_cos) if m.min_cos is not None else "", *extra, (m.verdict or m.role) + fails)
    return t


def saymap_table(summary: dict[str, Any]) -> Table:
    """`saymap`: per category, how many tokens each model can say, LOST (share of what BASE could say), GAINED
    and sayable in neither; the worst categories first."""
    cats = summary["categories"]
    if "counts" not in summary:
        t = _table(f"Say-ability of {summary['tokens']:,} tokens", ("category", "tokens", "sayable"),
                   left=("category",))
        for c, v in sorted(cats.items(), key=lambda kv: -kv[1]["tokens"]):
            t.add_row(c, f"{v['tokens']:,}", _pct(v["sayable"], v["tokens"]))
        return t
    t = _table(f"Say-ability of {summary['tokens']:,} tokens, BASE -> POST (LOST: share of what BASE could say)",
               ("category", "tokens", "BASE", "POST", "LOST", "GAINED", "neither"), left=("category",))
    rows = sorted(cats.items(), key=lambda kv: (-(kv[1]["lost_share"] or 0), -kv[1]["tokens"]))
    for c, v in [*rows, ("all", {**summary["counts"], "tokens": summary["tokens"]})]:
        base, post = v["kept"] + v["lost"], v["kept"] + v["gained"]
        t.add_row(c, f"{v['tokens']:,}", _pct(base, v["tokens"]), _pct(post, v["tokens"]),
                  _pct(v["lost"], base) if base else "-", f"{v['gained']:,}", f"{v['never']:,}")
    return t


def saymap_relations_table(relations: dict[str, list[dict[str, Any]]]) -> Table:
    """`saymap --base`: the LOST share (of what BASE could say) by lm_head cosine, by the SFT data's count and
    for rows that collapsed in POST."""
    t = _table("LOST by what else the run knows", ("by", "tokens", "BASE could say", "LOST"), left=("by",))
    names = {"drift": "lm_head cos", "coverage": "SFT target count", "collapsed": "collapse"}
    for key, rows in relations.items():
        for r in rows:
            t.add_row(f"{names.get(key, key)}: {r['label']}", f"{r['tokens']:,}", f"{r['sayable_base']:,}",
                      _pct(r["lost"], r["sayable_base"]) if r["sayable_base"] else "-")
    return t
