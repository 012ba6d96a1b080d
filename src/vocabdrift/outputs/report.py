"""`report`: one page that tells the investigation's story for the user's own run folder, as HTML and Markdown.

The report reads only the run folder (through `Run`) and shows each optional part -- coverage, probe, cases,
confusion, neighbours -- only when the folder holds it. It writes RUN/report.html (self-contained: Plotly's
JavaScript inline, no network), RUN/report.md and the Markdown's PNG plots in RUN/report_files/, each atomically.

Both pages come from the same objects: `Section`s of `Para`, `Table` and `Chart`, rendered twice. Nothing here
computes a drift number; the numbers come from summary.json and the run's tables.

Escaping, since vocabularies hold strings like `</script><script>alert(1)</script>`:
- HTML text goes through Jinja2 with autoescaping on;
- Plotly labels and hover text go through `_plotly_text` (Plotly renders its labels as a subset of HTML);
- JSON inside a <script> goes through `_script_json` (`<`, `>`, `&` and line separators as \\u escapes, so no
  `</script>` can end the element);
- Markdown cells go through `_md`.

Scale: for a 250,000-token vocabulary, histograms are binned here, scatter plots keep the most drifted points plus
a seeded sample of the rest (at most `_SCATTER_POINTS`), and tables hold the top N rows.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..analyses.vocab import CATEGORIES, LANGUAGE_NAMES, LANGUAGES, category_label, printable, token_label
from ..errors import VocabdriftError, need_extra
from . import run as R
from . import shapes as S
from .console import category_rows
from .run import Run, write_bytes_atomic
from .shapes import check_shape

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

_SCATTER_POINTS = 4000        # points per scatter plot, at most
_SCATTER_WORST = 1500         # of which the most drifted, always kept
_NEIGHBOR_QUERIES = 10        # most drifted tokens whose neighbours the report shows (plus the user's --token)
_L2_MARKS = 5                 # largest-L2 tokens annotated on the L2 histogram (plus the user's --token)
_FILES = R.REPORT_FILES        # the Markdown's PNG plots, beside report.md

# The page's fonts, by name: the system's own, then fonts that hold the scripts a vocabulary shows (kana, Hangul and
# Han; Thai; Arabic; Cyrillic) as Linux (Noto, WenQuanYi, TLWG, DejaVu: `make browser` installs the small ones),
# macOS and Windows call them. Without one of them a browser draws empty boxes where a missing font has no glyph.
# Unquoted, since every name is plain words: the template's autoescaping leaves them as they are.
_SCRIPT_FONTS = ("Noto Sans CJK JP, Noto Sans CJK KR, Noto Sans CJK SC, Noto Sans Thai, Noto Sans Arabic, "
                 "WenQuanYi Micro Hei, Loma, Hiragino Sans, Apple SD Gothic Neo, PingFang SC, Thonburi, Geeza Pro, "
                 "Yu Gothic, Malgun Gothic, Microsoft YaHei, Leelawadee UI, Segoe UI")
FONT_SANS = f"system-ui, -apple-system, Segoe UI, Roboto, Noto Sans, {_SCRIPT_FONTS}, DejaVu Sans, sans-serif"
FONT_MONO = f"ui-monospace, DejaVu Sans Mono, Noto Sans Mono CJK JP, {_SCRIPT_FONTS}, DejaVu Sans, monospace"

_LANG_COLORS = {"japanese": "#d62728", "hangul": "#9467bd", "arabic": "#8c564b", "cyrillic": "#1f77b4",
                "han": "#ff7f0e", "latin": "#2ca02c"}
_OTHER_COLOR = "#9a9a9a"
_RUN_COLORS = ("#d62728", "#1f77b4")


# ---- escaping ---------------------------------------------------------------------------------------------------

def _script_json(obj: Any) -> str:
    """JSON that is safe inside a <script> element: no `<`, `>` or `&` survives, so nothing can close it."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                 ("\u2029", "\\u2029")):
        s = s.replace(a, b)
    return s


def _plotly_text(s: str) -> str:
    """Plotly shows labels as a subset of HTML (<b>, <br>, entities): escape so a token shows as its text."""
    return html.escape(s, quote=False)


# Markdown's own backslash escapes, not HTML entities: report.md reads as text in a terminal or an editor too
_MD_SPECIAL = {"&": "\\&", "<": "\\<", ">": "\\>", "|": "\\|", "\\": "\\\\", "`": "\\`", "*": "\\*",
               "[": "\\[", "]": "\\]", "~": "\\~", "#": "\\#", "$": "\\$"}

_MD_UNDERSCORE = re.compile(r"(?<![^\W_])_|_(?![^\W_])")


def _static_note(note: str) -> str:
    """A chart's note for a static image: without the sentences about the page's interactions (clicking the
    legend, hovering), which a PNG does not have."""
    parts = re.split(r"(?<=[.;])\s+", note)
    kept = [x for x in parts if not re.search(r"\b(click|hover|legend entry)", x, re.I)]
    return " ".join(kept).rstrip(";").strip() + ("." if kept and kept[-1].rstrip().endswith(";") else "")


def _md(s: str) -> str:
    """A Markdown table cell or line: no inline HTML, no emphasis, no link, no pipe that breaks the row."""
    out = "".join(_MD_SPECIAL.get(ch, ch) for ch in str(s)).replace("\n", " ")
    return _MD_UNDERSCORE.sub(r"\\_", out)  # lm_head stays lm_head: only an `_` at a word's edge can emphasise


def _tok(text: str) -> str:
    """A token's text with whitespace and control characters made visible."""
    return token_label(text)


def _prose(text: str) -> str:
    """Free text (a prompt, an answer): spaces kept, newlines and control characters made visible."""
    return "".join(ch if ch == " " or ch.isprintable() else printable(ch) for ch in text)


# ---- the page's building blocks -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """A table cell with a style: "tok" (a token's text), "ok"/"bad" (pass/fail), "new" (a new neighbour)."""

    text: str
    cls: str = ""


CellValue = str | Cell | list[Cell]


_CODE_SPAN = re.compile(r"`([^`\n]+)`")


@dataclass(frozen=True)
class Para:
    """A paragraph. With `code`, each `...` span of `text` is code (a command, an option): <code> in the HTML, a
    code span in the Markdown. Only for text of our own: a token's text may hold backticks, and then shows them."""

    text: str
    cls: str = ""
    kind: str = "para"
    code: bool = False

    @property
    def parts(self) -> list[tuple[bool, str]]:
        """(is code, text) runs of the paragraph; a backtick without its pair stays text."""
        if not self.code:
            return [(False, self.text)]
        return [(i % 2 == 1, x) for i, x in enumerate(_CODE_SPAN.split(self.text)) if x]


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    headers: tuple[str, ...]
    rows: list[list[CellValue]]
    caption: str = ""
    numeric: tuple[int, ...] = ()  # right-aligned columns
    kind: str = "table"


@dataclass(frozen=True)
class Series:
    """One trace. x are numbers (step, scatter) or labels (bar); `text` is hover text, raw (escaped on render)."""

    name: str
    x: Sequence[Any]
    y: Sequence[float]
    kind: str = "step"  # step | scatter | bar
    text: Sequence[str] | None = None
    err: tuple[Sequence[float], Sequence[float]] | None = None  # bars: (below, above)
    color: str | None = None
    visible: bool = True  # False: in the HTML legend only (click to show); left out of the PNG


@dataclass(frozen=True)
class Chart:
    key: str
    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    logx: bool = False
    logy: bool = False
    marks: tuple[tuple[float, str], ...] = ()  # vertical lines with a label (threshold, chosen tokens)
    region: tuple[float, float, float, float, str] | None = None  # x0, x1, y0, y1, label: a shaded box
    note: str = ""
    kind: str = "chart"
    stacked: bool = False  # bars on top of each other (parts of a whole), not side by side


@dataclass
class Section:
    id: str
    title: str
    items: list[Para | Table | Chart] = field(default_factory=list)


# ---- reading the run folder -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunData:
    """Everything the report reads from one run folder; optional parts are None when absent."""

    name: str
    path: Path
    summary: dict[str, Any]
    manifest: dict[str, Any]
    vocab: pa.Table
    drift: pa.Table
    coverage: pa.Table | None = None
    probe: pa.Table | None = None
    neighbors: pa.Table | None = None
    cases: list[dict[str, Any]] | None = None
    confusion: dict[str, Any] | None = None
    answers: list[dict[str, Any]] | None = None  # confusion.jsonl: every sampled answer
    probe_all: pa.Table | None = None  # probe.parquet with its control rows (`probe` leaves them out)
    saymap: pa.Table | None = None  # saymap.parquet: the recommendation's LOST tokens (the page draws the summary)


def read_run(path: PathLike, *, name: str | None = None) -> RunData:
    """Read a run folder for the report. It needs diff's vocab.parquet, drift.parquet and summary.json."""
    p = Path(path)
    if not p.is_dir():
        raise VocabdriftError(f"{p}: no such run folder; create it with `vocabdrift diff BASE POST -o {p}`")
    run = Run(p)
    for f in (R.SUMMARY, R.VOCAB, R.DRIFT):
        if not run.has(f):
            raise VocabdriftError(f"{p}: has no {f}; the report builds on `diff` — run "
                                  f"`vocabdrift diff BASE POST -o {p}` first")
    summary = run.read_json(R.SUMMARY)
    if isinstance(summary, dict):  # every number the report formats has the type it needs (outputs.shapes)
        check_shape(summary, S.SUMMARY, p / R.SUMMARY, fix=f"rerun `vocabdrift diff BASE POST -o {p}`")
    if not isinstance(summary, dict) or "overall" not in summary or "lm_head" not in summary["overall"]:
        raise VocabdriftError(f"{p / R.SUMMARY}: has no drift summary (\"overall\"); rerun "
                              f"`vocabdrift diff BASE POST -o {p}`")
    mixed = run.disagreements()  # every file on the page must belong to the same BASE/POST
    if mixed:
        raise VocabdriftError(f"{p}: its files do not belong to one BASE/POST pair: {'; '.join(mixed)}; rerun "
                              f"that command for this pair with -o {p}, or delete the file")
    opt: dict[str, Any] = {}
    for key, file in (("coverage", R.COVERAGE), ("probe", R.PROBE), ("neighbors", R.NEIGHBORS), ("saymap", R.SAYMAP)):
        if run.has(file):
            opt[key] = run.read_contract(file)  # checked against the contract's columns
    if "probe" in opt and "control" in opt["probe"].column_names:
        # the control tokens feed the headline and the recommendation only
        import pyarrow.compute as pc

        opt["probe_all"] = opt["probe"]
        opt["probe"] = opt["probe"].filter(pc.invert(opt["probe"]["control"]))
    if run.has(R.CASES):
        c = check_shape(run.read_json(R.CASES), S.CASES, p / R.CASES,
                        fix=f"delete it and rerun `vocabdrift cases MODEL -o {p}`")
        opt["cases"] = [c] if isinstance(c, dict) else list(c)  # one model's cases, or a list of them
    if run.has(R.CONFUSION):
        opt["confusion"] = check_shape(run.read_json(R.CONFUSION), S.CONFUSION, p / R.CONFUSION,
                                       fix=f"delete it and rerun `vocabdrift confusion MODEL -o {p}`")
    if run.has(R.CONFUSION_ANSWERS):
        opt["answers"] = run.read_jsonl(R.CONFUSION_ANSWERS)  # checked against the contract's keys
    return RunData(name=name or p.resolve().name, path=p, summary=summary,
                   manifest=run.read_json(R.MANIFEST, default={"commands": []}),
                   vocab=run.read_contract(R.VOCAB), drift=run.read_contract(R.DRIFT), **opt)


# ---- the run as arrays ------------------------------------------------------------------------------------------

def _np(t: pa.Table, col: str, dtype: Any = None) -> np.ndarray:
    """A column as numpy; dtype=object gives Python strings (dictionary-encoded columns decoded)."""
    import pyarrow as pa

    a = t.column(col)
    if dtype is object:
        if pa.types.is_dictionary(a.type):
            a = a.cast(pa.string())
        return np.asarray(a.to_pylist(), dtype=object)
    out = a.to_numpy()
    return out.astype(dtype) if dtype is not None else out


@dataclass(frozen=True)
class Vocab:
    """Lookups by token id: text, category, special."""

    text: np.ndarray      # object (V,)
    piece: np.ndarray     # object (V,)
    category: np.ndarray  # object (V,)
    special: np.ndarray   # bool (V,)

    @classmethod
    def of(cls, t: pa.Table) -> Vocab:
        ids = _np(t, "token_id").astype(np.int64)
        n = int(ids.max()) + 1 if ids.size else 0
        text, piece, cat = (np.full(n, "", dtype=object) for _ in range(3))
        special = np.zeros(n, dtype=bool)
        text[ids] = [s or "" for s in _np(t, "text", object)]
        piece[ids] = [s or "" for s in _np(t, "piece", object)] if "piece" in t.column_names else text[ids]
        cat[ids] = _np(t, "category", object)
        special[ids] = _np(t, "is_special", bool)
        return cls(text, piece, cat, special)

    def __len__(self) -> int:
        return len(self.text)

    def label(self, i: int) -> str:
        return _tok(self.text[i]) if 0 <= i < len(self) else f"#{i}"

    def cat(self, i: int) -> str:
        return category_label(str(self.category[i])) if 0 <= i < len(self) else "unknown"

    def is_special(self, i: int) -> bool:
        return bool(self.special[i]) if 0 <= i < len(self) else False


@dataclass(frozen=True)
class Frame:
    """drift.parquet joined with the vocabulary (and coverage counts), one entry per drift row, as numpy."""

    token_id: np.ndarray   # int64 (n,)
    text: np.ndarray       # object (n,)
    category: np.ndarray   # object (n,)
    special: np.ndarray    # bool (n,)
    lm_cos: np.ndarray     # float (n,), NaN where undefined
    emb_cos: np.ndarray
    lm_l2: np.ndarray
    norm_base: np.ndarray
    norm_post: np.ndarray
    count: np.ndarray | None  # coverage count (n,), None without coverage.parquet

    @classmethod
    def of(cls, rd: RunData, vocab: Vocab) -> Frame:
        ids = _np(rd.drift, "token_id").astype(np.int64)
        inv = (ids < 0) | (ids >= len(vocab))
        safe = np.where(inv, 0, ids)
        text = vocab.text[safe].copy()
        cat = vocab.category[safe].copy()
        text[inv], cat[inv] = "", "unknown"
        count = None
        if rd.coverage is not None:
            cids = _np(rd.coverage, "token_id").astype(np.int64)
            dense = np.zeros(max(len(vocab), int(ids.max(initial=0)) + 1, int(cids.max(initial=0)) + 1))
            dense[cids] = _np(rd.coverage, "count", np.float64)
            count = dense[ids]

        def f(col: str) -> np.ndarray:
            return _np(rd.drift, col, np.float64) if col in rd.drift.column_names else np.full(len(ids), np.nan)

        return cls(ids, text, cat, np.where(inv, False, vocab.special[safe]), f("lm_head_cos"), f("embed_cos"),
                   f("lm_head_l2"), f("lm_head_norm_base"), f("lm_head_norm_post"), count)

    def judged(self) -> np.ndarray:
        """Rows the report plots: non-special (special and padding rows are often untrained) with a finite cosine."""
        return ~self.special & np.isfinite(self.lm_cos)

    def most_drifted(self, n: int) -> np.ndarray:
        """Positions of the n most drifted rows, by THE definition (`analyses.drift.most_drifted`)."""
        import pyarrow as pa

        from ..analyses.drift import most_drifted_ids

        drift = pa.table({"token_id": pa.array(self.token_id), "lm_head_cos": pa.array(self.lm_cos),
                          "lm_head_l2": pa.array(self.lm_l2)})
        vocab = pa.table({"token_id": pa.array(self.token_id), "is_special": pa.array(self.special)})
        pos = {int(t): i for i, t in enumerate(self.token_id.tolist())}
        return np.array([pos[t] for t in most_drifted_ids(drift, vocab, n)], dtype=np.int64)


@dataclass(frozen=True)
class Probe:
    """probe.parquet per model, as dense arrays over token ids: share of templates sayable, best p_target."""

    models: tuple[str, ...]
    sayable: dict[str, np.ndarray]  # float (V,), NaN where not probed
    p_target: dict[str, np.ndarray]
    lost: tuple[int, ...]

    @classmethod
    def of(cls, rd: RunData, size: int) -> Probe:
        import pyarrow as pa
        import pyarrow.compute as pc

        t = rd.probe
        assert t is not None
        t = t.select(["token_id", "model", "p_target"]).append_column(
            "s", pc.cast(rd.probe.column("sayable"), pa.float64()))
        g = t.group_by(["model", "token_id"]).aggregate([("s", "mean"), ("p_target", "max")])
        meta = rd.summary.get("probe") or {}
        models = tuple(meta.get("models") or dict.fromkeys(_np(t, "model", object).tolist()))
        gm, gid = _np(g, "model", object), _np(g, "token_id").astype(np.int64)
        n = max(size, int(gid.max(initial=-1)) + 1)
        say, pt = {}, {}
        for m in models:
            sel = gm == m
            say[m], pt[m] = np.full(n, np.nan), np.full(n, np.nan)
            say[m][gid[sel]] = _np(g, "s_mean", np.float64)[sel]
            pt[m][gid[sel]] = _np(g, "p_target_max", np.float64)[sel]
        if "lost" in meta:
            lost = tuple(int(i) for i in meta["lost"])
        elif "base" in say and len(models) > 1:  # sayable in base, in no template of the post-trained model
            post = next(m for m in models if m != "base")
            lost = tuple(np.flatnonzero((say["base"] > 0) & (say[post] == 0)).tolist())
        else:
            lost = ()
        return cls(models, say, pt, lost)

    def cell(self, model: str, i: int) -> Cell:
        s = self.sayable[model][i] if i < len(self.sayable[model]) else np.nan
        if not np.isfinite(s):
            return Cell("—")
        if s >= 1:
            return Cell("✓", "ok")
        if s <= 0:
            return Cell("✗", "bad")
        return Cell(f"{s:.0%}", "bad")


# ---- numbers as text --------------------------------------------------------------------------------------------

def _f4(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4f}"


def _delta(a: float | None, b: float | None) -> str:
    """b - a, or a dash when either has no value (every row of a run became zero or NaN)."""
    return "—" if a is None or b is None else f"{b - a:+.4f}"


def _count(k: int, n: int) -> str:
    return f"{k:,} ({k / n:.1%})" if n else "0"


def _of(k: int, n: int) -> str:
    return f"{k:,} of {n:,} ({k / n:.1%})" if n else "0 of 0"


def _below(s: dict[str, Any], thr: float) -> int:
    """Rows below the run's threshold (summaries from before `below_threshold` carry only 0.95 and 0.90)."""
    if "below_threshold" in s:
        return int(s["below_threshold"])
    return int(s.get(f"below_{thr:.2f}", s.get("below_0.95", 0)))


def _category_label(cat: str) -> str:
    return category_label(cat)


def verdict(summary: dict[str, Any], *, space: str = "lm_head") -> str:
    """The report in one sentence, e.g. "4.9% of lm_head rows (9,805 of 200,000) fell below 0.95, min cosine
    0.329; Japanese is worst (29.7%)."

    The worst group is the language (the languages of docs/ARCHITECTURE.md) with the largest share below the
    threshold, among those with at least 10 tokens; when no language has a drifted row, the worst other category.
    """
    thr = float(summary.get("threshold", 0.95))
    o = summary["overall"][space]
    n, k = int(o["tokens"]), _below(o, thr)
    if n == 0:
        return f"No {space} row has a finite cosine to compare."
    if k == 0:
        return f"No {space} row fell below {thr:g}: min cosine {_f4(o['min_cos'])} over {n:,} tokens."
    shares: dict[str, tuple[float, int]] = {}
    for cat, block in summary.get("categories", {}).items():
        s = block.get(space, {})
        if cat != "special" and s.get("tokens"):
            shares[cat] = (_below(s, thr) / s["tokens"], int(s["tokens"]))

    def worst(cats: Sequence[str]) -> tuple[str, float] | None:
        pool = [c for c in cats if c in shares and shares[c][0] > 0]
        big = [c for c in pool if shares[c][1] >= 10] or pool
        if not big:
            return None
        c = max(big, key=lambda c: (shares[c][0], shares[c][1]))
        return c, shares[c][0]

    head = f"{k / n:.1%} of {space} rows ({k:,} of {n:,}) fell below {thr:g}, min cosine " + \
        ("—" if o["min_cos"] is None else f"{o['min_cos']:.3f}")
    if o.get("undefined"):  # rows that became zero or NaN: no cosine, below every threshold
        head += f" ({o['undefined']:,} rows became zero or NaN)"
    w = worst(LANGUAGES)
    if w is not None:
        return f"{head}; {_category_label(w[0])} is worst ({w[1]:.1%})."
    w = worst([c for c in CATEGORIES if c not in LANGUAGES])
    if w is not None:
        return f"{head}; no language is affected, {w[0]} tokens are worst ({w[1]:.1%})."
    return f"{head}."


# ---- tables -----------------------------------------------------------------------------------------------------

def _block(summary: dict[str, Any], key: str) -> dict[str, Any] | None:
    return summary.get(key) if key in ("overall", "reachable") else summary.get("categories", {}).get(key)


def language_table(summary: dict[str, Any], *, centered: bool = False) -> Table:
    """The per-language table, in the layout of the reference table of docs/ARCHITECTURE.md; `centered`: over
    the mean-centred cosines (`diff --center`)."""
    folded = bool((summary.get("options") or {}).get("fold_norm"))
    if centered:
        summary = {**summary, **summary["centered"]}
    thr = float(summary.get("threshold", 0.95))
    extra = thr not in (0.95, 0.90)
    headers = ("category", "tokens", "lm_head cos mean / min", "below 0.95 / 0.90",
               *((f"below {thr:g}",) if extra else ()), "embed cos mean / min")
    rows: list[list[CellValue]] = []
    for key, label in category_rows(summary):
        b = _block(summary, key)
        if not b or "lm_head" not in b:
            continue
        s, e = b["lm_head"], b.get("embed", {})
        n = int(s["tokens"])
        row: list[CellValue] = [label, f"{n:,}", f"{_f4(s['mean_cos'])} / {_f4(s['min_cos'])}",
                                f"{_count(int(s['below_0.95']), n)} / {_count(int(s['below_0.90']), n)}"]
        if extra:
            row.append(_count(_below(s, thr), n))
        row.append(f"{_f4(e.get('mean_cos'))} / {_f4(e.get('min_cos'))}")
        rows.append(row)
    title = "lm_head cosine to the pre-trained row, per language and category"
    caption = "Overall counts every non-special token; special and padding rows are often untrained."
    if centered:
        title += ", after subtracting each matrix's mean row (--center)"
        caption += (" Centred cosines discount a shift shared by every row (the direction all never-targeted rows "
                    "drift toward); a row low here moved on its own.")
    if folded:
        caption += " lm_head rows were folded with the final norm weight g first (--fold-norm): W·diag(g)."
    return Table("languages-centered" if centered else "languages", title, headers, rows, caption=caption,
                 numeric=tuple(range(1, len(headers))))


def probe_headline_items(summary: dict[str, Any]) -> list[Para | Table]:
    """The probe's main signal, near the top: top-1 answers and the target's probability, BASE -> POST, for the
    probed tokens against undrifted control tokens, per template too (`analyses.probe.headline`)."""
    from ..analyses.probe import headline_lines

    h = (summary.get("probe") or {}).get("headline")
    if not h or not h.get("tokens"):
        return []
    t, c = h["tokens"], h.get("control")
    bad = t["n"] and (t["top1"]["base"] - t["top1"]["post"]) / t["n"] > (
        (c["top1"]["base"] - c["top1"]["post"]) / c["n"] + 0.1 if c else 0.1)
    items: list[Para | Table] = [Para(line, "bad" if bad and i == 0 else "") for i, line in
                                 enumerate(headline_lines(h))]
    rows: list[list[CellValue]] = []
    groups = [("probed tokens", t), ("undrifted control", c), *((f"template {k}", g)
                                                                for k, g in h.get("templates", {}).items())]
    for label, g in groups:
        if g is None:
            continue
        n = int(g["n"])
        rows.append([label, f"{n:,}", _count(int(g["top1"]["base"]), n), _count(int(g["top1"]["post"]), n),
                     _count(int(g["nucleus"]["base"]), n), _count(int(g["nucleus"]["post"]), n),
                     f"{g['median_p']['base']:.3g} → {g['median_p']['post']:.3g}", f"×{g['p_ratio']:.2g}"])
    top_p = (summary.get("probe") or {}).get("top_p", 0.95)
    items.append(Table("probe-headline", "Probe: can the model still say the token? BASE → POST",
                       ("tokens", "n", "top-1 BASE", "top-1 POST", f"nucleus (top-p {top_p:g}) BASE",
                        "nucleus POST", "median p", "p POST / BASE"), rows, numeric=(1, 2, 3, 4, 5, 6, 7),
                       caption="Top-1: the model's first choice is the token (its best template). Nucleus: top-p "
                               "sampling keeps it. A fall in top-1 far beyond the control tokens' is the drift's "
                               "effect; the nucleus alone hides it when the base model's nucleus is wide."))
    return items


def drifted_table(fr: Frame, vocab: Vocab, probe: Probe | None, top: int) -> Table:
    """The most drifted tokens, with text, category, coverage count and sayability."""
    pos = fr.most_drifted(top)
    headers = ["id", "text", "category", "lm_head cos", "embed cos", "L2", "norm base → post"]
    if fr.count is not None:
        headers.append("coverage count")
    models = probe.models if probe else ()
    headers += [f"sayable ({m})" for m in models]
    rows: list[list[CellValue]] = []
    for i in pos:
        tid = int(fr.token_id[i])
        row: list[CellValue] = [str(tid), Cell(_tok(fr.text[i]), "tok"), category_label(str(fr.category[i])),
                                _f4(fr.lm_cos[i]), _f4(fr.emb_cos[i]), f"{fr.lm_l2[i]:.4g}",
                                f"{fr.norm_base[i]:.3f} → {fr.norm_post[i]:.3f}"]
        if fr.count is not None:
            row.append(f"{int(fr.count[i]):,}")
        row += [probe.cell(m, tid) for m in models] if probe else []
        rows.append(row)
    n_judged = int(fr.judged().sum())
    return Table("drifted", f"The {len(rows)} most drifted tokens (lm_head)", tuple(headers), rows,
                 caption=f"Lowest lm_head cosine first, of {n_judged:,} non-special tokens; every row is in "
                         "drift.parquet.", numeric=(0, 3, 4, 5, *((7,) if fr.count is not None else ())))


def resolve_tokens(tokens: Sequence[str | int], vocab: Vocab) -> list[int]:
    """Token ids of what the user named, by the one rule (`analyses.tokens.TOKEN_RULE`), against the run's
    vocabulary (the report reads only the run folder, so there is no tokenizer to encode a text with)."""
    from ..analyses.tokens import TokenIndex
    from ..analyses.tokens import resolve_tokens as resolve

    return resolve(list(tokens), TokenIndex.of(vocab.text, vocab.piece, where="the run's vocabulary (vocab.parquet)"))


def _no_neighbors(vocab: Vocab, ids: Sequence[int]) -> list[Para]:
    labels = ", ".join(vocab.label(i) for i in ids)
    return [Para(f"No neighbours stored for {labels}: rerun `vocabdrift diff` with --neighbors-of to store them.",
                 "note", code="`" not in labels)] if ids else []


def neighbors_tables(rd: RunData, fr: Frame, vocab: Vocab, chosen: Sequence[int]) -> tuple[list[Table], list[Para]]:
    """Neighbours before and after, for the most drifted tokens and the user's tokens; notes for tokens without."""
    if rd.neighbors is None:
        return [], _no_neighbors(vocab, chosen)
    nt = rd.neighbors
    q, sp, mo = _np(nt, "token_id").astype(np.int64), _np(nt, "space", object), _np(nt, "model", object)
    rank, nid, cos = _np(nt, "rank").astype(np.int64), _np(nt, "neighbor_id").astype(np.int64), _np(nt, "cos")
    stored = set(q.tolist())
    top = [int(fr.token_id[i]) for i in fr.most_drifted(len(fr.token_id)) if int(fr.token_id[i]) in stored]
    queries = list(dict.fromkeys([*chosen, *top[:_NEIGHBOR_QUERIES]]))
    missing = [i for i in chosen if i not in stored]
    notes = _no_neighbors(vocab, missing)
    cos_of = dict(zip(fr.token_id.tolist(), fr.lm_cos.tolist(), strict=True))
    tables = []
    for space in dict.fromkeys(sp.tolist()):
        models = list(dict.fromkeys(mo[sp == space].tolist()))
        rows: list[list[CellValue]] = []
        for tid in queries:
            sel = (q == tid) & (sp == space)
            if not sel.any():
                continue
            lists: dict[str, list[tuple[int, float]]] = {}
            for m in models:
                ms = np.flatnonzero(sel & (mo == m))
                ms = ms[np.argsort(rank[ms], kind="stable")]
                lists[m] = [(int(nid[j]), float(cos[j])) for j in ms]
            first = set(n for n, _ in lists[models[0]]) if models else set()
            row: list[CellValue] = [str(tid), Cell(vocab.label(tid), "tok"), _f4(cos_of.get(tid))]
            for k, m in enumerate(models):
                row.append([Cell(f"{vocab.label(n)}{' ★' if vocab.is_special(n) else ''} ({c:.2f})",
                                 "new" if k and n not in first else "tok") for n, c in lists[m]])
            rows.append(row)
        if rows:
            tables.append(Table(f"neighbors-{space}", f"{space} neighbours before and after",
                                ("id", "token", "lm_head cos", *(f"{m}: nearest rows (cos)" for m in models)), rows,
                                caption=f"Nearest {space} rows by cosine, best first; ★ a special token; "
                                        f"highlighted: not among {models[0] if models else ''}'s neighbours.",
                                numeric=(0, 2)))
    return tables, notes


def lost_table(probe: Probe, fr: Frame, vocab: Vocab, top: int) -> Table:
    """Tokens sayable in the base model and no longer in the post-trained one."""
    cos_of = dict(zip(fr.token_id.tolist(), zip(fr.lm_cos.tolist(), fr.emb_cos.tolist(), strict=True), strict=True))
    count_of = dict(zip(fr.token_id.tolist(), fr.count.tolist(), strict=True)) if fr.count is not None else None
    lost = sorted(probe.lost, key=lambda i: (cos_of.get(i, (2.0, 0))[0], i))
    headers = ["id", "text", "category", "lm_head cos", "embed cos", *(f"p ({m})" for m in probe.models)]
    if count_of is not None:
        headers.append("coverage count")
    rows: list[list[CellValue]] = []
    for tid in lost[:top]:
        lc, ec = cos_of.get(tid, (None, None))
        row: list[CellValue] = [str(tid), Cell(vocab.label(tid), "tok"), vocab.cat(tid), _f4(lc), _f4(ec)]
        for m in probe.models:
            p = probe.p_target[m][tid] if tid < len(probe.p_target[m]) else np.nan
            row.append(f"{p:.3g}" if np.isfinite(p) else "—")
        if count_of is not None:
            row.append(f"{int(count_of.get(tid, 0)):,}")
        rows.append(row)
    shown = f"; the {top} most drifted shown" if len(lost) > top else ""
    return Table("lost", f"Lost tokens: {len(lost):,} sayable in base, not after post-training", tuple(headers),
                 rows, caption=f"p: the best probability of the token as the first answer token{shown}.",
                 numeric=tuple(range(len(headers))[3:]) + (0,))


def cases_tables(cases: list[dict[str, Any]]) -> list[Table]:
    out = []
    for k, c in enumerate(cases):
        rows: list[list[CellValue]] = []
        for case in c.get("cases", []):
            ok = bool(case.get("passed"))
            rows.append([str(case.get("name", "")), Cell("✓ pass" if ok else "✗ fail", "ok" if ok else "bad"),
                         _prose(str(case.get("prompt", ""))), Cell(_tok(str(case.get("expected", ""))), "tok"),
                         [Cell(_tok(str(f)), "tok") for f in case.get("forbidden") or []] or "—",
                         _prose(_clip(str(case.get("output", "")), 160))])
        passed = c.get("passed", sum(1 for x in c.get("cases", []) if x.get("passed")))
        total = c.get("total", len(c.get("cases", [])))
        out.append(Table(f"cases-{k}", f"Cases: {passed}/{total} passed ({c.get('model', 'model')})",
                         ("case", "result", "prompt", "expected", "forbidden", "output"), rows,
                         caption="Greedy answers; an answer passes when it holds the expected text and no forbidden "
                                 "one."))
    return out


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def confusion_tables(conf: dict[str, Any]) -> list[Table]:
    rows: list[list[CellValue]] = []
    for r in conf.get("results", []):
        scripts = ", ".join(f"{k} {v}" for k, v in sorted((r.get("by_script") or {}).items(), key=lambda kv: -kv[1]))
        native = f"{int(r['native']):,} ({int(r['native']) / max(int(r.get('n', 0)), 1):.0%})" \
            if isinstance(r.get("native"), (int, float)) else "—"
        rows.append([_lang(r.get("language", "")), _prose(_clip(str(r.get("prompt", "")), 60)),
                     str(r.get("model", "")), f"{int(r.get('n', 0)):,}", f"{int(r.get('hits', 0)):,}",
                     f"{r.get('rate', 0):.1%}", f"{r.get('ci_low', 0):.1%}–{r.get('ci_high', 0):.1%}", scripts,
                     native])
    out = [Table("confusion", "Script confusion: answers with characters of a foreign script",
                 ("language", "prompt", "model", "samples", "with foreign script", "rate", "95% interval",
                  "by script", "mostly in the prompt's script"), rows,
                 caption="Wilson 95% intervals. The last column counts the answers more than half of whose letters "
                         "are of the prompt language's own scripts (kana and kanji for Japanese): an answer in "
                         "English or tool-call markup has no foreign letter, and no chance to show confusion.",
                 numeric=(3, 4, 5, 6))]
    tests = conf.get("tests") or []
    if tests:
        trows: list[list[CellValue]] = [[_prose(_clip(str(t.get("prompt", "")), 60)),
                                         " vs ".join(map(str, t.get("models", []))), _num(t.get("odds_ratio")),
                                         _num(t.get("p_value"))] for t in tests]
        out.append(Table("confusion-tests", "Difference between models (Fisher exact test)",
                         ("prompt", "models", "odds ratio", "p-value"), trows, numeric=(2, 3)))
    return out


_ANSWER_CHARS = 200  # an answer shown in the report, at most


def answer_cells(text: str, language: str) -> list[Cell]:
    """An answer as segments, its runs of foreign letters in cells of their own ("foreign"; ⟦…⟧ in Markdown)."""
    from ..analyses.confusion import foreign_spans

    text = _clip(text, _ANSWER_CHARS)
    out, at = [], 0
    for a, b, _ in foreign_spans(text, language):
        if a > at:
            out.append(Cell(_prose(text[at:a]), "ans"))
        out.append(Cell(_prose(text[a:b]), "foreign"))
        at = b
    if at < len(text) or not out:
        out.append(Cell(_prose(text[at:]) or "∅", "ans"))
    return out


def answers_table(answers: list[dict[str, Any]], *, per: int = 4, title: str = "") -> Table | None:
    """A few sampled answers per prompt and model (from confusion.jsonl): the first two with foreign letters and
    the first answers without, up to `per`, foreign letters marked."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for a in answers:
        groups.setdefault((str(a.get("prompt", "")), str(a.get("model", ""))), []).append(a)
    if not groups:
        return None
    rows: list[list[CellValue]] = []
    for (prompt, model), items in groups.items():
        items = sorted(items, key=lambda a: int(a.get("sample", 0)))
        hit = [a for a in items if a.get("foreign")][: per // 2]
        clean = [a for a in items if not a.get("foreign")][: per - len(hit)]
        for a in sorted(hit + clean, key=lambda a: int(a.get("sample", 0))):
            found = ", ".join(f"{k} {v}" for k, v in (a.get("foreign") or {}).items()) or "—"
            rows.append([_prose(_clip(prompt, 30)), model, str(a.get("sample", "")), found,
                         answer_cells(str(a.get("text", "")), str(a.get("language", "")))])
    return Table("confusion-answers", "Sampled answers" + (f" ({title})" if title else ""),
                 ("prompt", "model", "sample", "foreign letters", "answer"), rows,
                 caption=f"Up to {per} answers per prompt and model, the first with foreign letters (marked) and "
                         "the first without; every answer is in the run folder's confusion.jsonl.", numeric=(2,))


def _num(x: Any) -> str:
    if x is None:
        return "—"
    x = float(x)
    return "∞" if math.isinf(x) else f"{x:.3g}"


def _lang(code: str) -> str:
    names = {"ja": "Japanese", "ko": "Korean", "zh": "Chinese", "ru": "Russian", "ar": "Arabic", "en": "English"}
    return names.get(code, LANGUAGE_NAMES.get(code, code))


def intrusion_items(summary: dict[str, Any], top: int = 20) -> list[Para | Table]:
    """Neighbour intrusion (summary["neighbors"], from `diff`): special, markup and byte rows among the lm_head
    neighbours of the most drifted tokens, and the token's own category, before and after."""
    nb = summary.get("neighbors")
    if not nb or not nb.get("per_token"):
        return []
    inn, own = nb.get("intrusion") or {}, nb.get("own_category") or {}

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.0f}%"

    head = (f"Among the {nb.get('k')} nearest lm_head rows of {nb.get('tokens'):,} drifted or named tokens, "
            f"special, markup and byte rows were {pct(inn.get('base'))} before and {pct(inn.get('post'))} after; "
            f"rows of the token's own category {pct(own.get('base'))} before and {pct(own.get('post'))} after. "
            "A row whose neighbourhood fills with them has moved toward the direction never-targeted rows share.")
    rows: list[list[CellValue]] = [
        [str(r["token_id"]), Cell(_tok(r.get("text") or ""), "tok"), _category_label(r.get("category") or ""),
         pct(r.get("intrusion_base")), pct(r.get("intrusion_post")), pct(r.get("own_base")), pct(r.get("own_post"))]
        for r in nb["per_token"][:top]]
    return [Para(head), Table("intrusion", "Neighbour intrusion (lm_head)",
                              ("id", "token", "category", "intruders BASE", "intruders POST", "own category BASE",
                               "own category POST"), rows, numeric=(0, 3, 4, 5, 6),
                              caption="Intruders: special, unused, padding, markup and byte rows among the "
                                      "k nearest; the tokens whose share grew most first.")]


def collapse_items(summary: dict[str, Any]) -> list[Para | Table]:
    """Groups of near-identical lm_head rows (summary["collapse"], from `diff`): per category, the tokens that
    collapsed during post-training and those that already were, with a few of each named."""
    c = (summary.get("collapse") or {}).get("lm_head")
    if not c:
        u = ((summary.get("undertrained") or {}).get("collapse") or {}).get("lm_head")
        if not u:
            return []
        rows_u: list[list[CellValue]] = [
            [_category_label(cat), f"{v['collapsed']:,}", f"{v['tokens']:,}"]
            for cat, v in sorted(u.get("categories", {}).items(), key=lambda kv: -kv[1]["collapsed"])]
        return [Para(f"{u.get('rows', 0):,} lm_head rows sit in {u.get('groups', 0):,} groups of near-identical rows "
                     f"(cosine >= {u.get('min_cos', 0):g}; `undertrained`): their tokens cannot be told apart by the "
                     "output layer.", code=True),
                Table("collapse", "Collapsed lm_head rows per category", ("category", "collapsed", "tokens"),
                      rows_u, numeric=(1, 2))]
    post = c.get("post", {})
    head = (f"{post.get('rows', 0):,} lm_head rows of POST sit in {post.get('groups', 0):,} groups of near-identical "
            f"rows (cosine >= {post.get('min_cos', 0):g}): their tokens cannot be told apart by the output layer. "
            f"{c.get('new', 0):,} collapsed during post-training, {c.get('already', 0):,} already were in BASE, "
            f"{c.get('released', 0):,} came apart.")
    rows: list[list[CellValue]] = [
        [_category_label(cat), f"{v.get('new', 0):,}", f"{v.get('already', 0):,}", f"{v.get('released', 0):,}"]
        for cat, v in sorted((c.get("categories") or {}).items(), key=lambda kv: -kv[1].get("new", 0))]
    for key, what in (("new", "Collapsed during post-training"), ("already", "Already collapsed in BASE")):
        if c.get(f"{key}_tokens"):
            more = int(c.get(key, 0)) - len(c[f"{key}_tokens"])
            head += f" {what}: " + ", ".join(c[f"{key}_tokens"]) + (f" and {more:,} more." if more > 0 else ".")
    items: list[Para | Table] = [Para(head)]
    if rows:
        items.append(Table("collapse", "Collapsed lm_head rows per category", ("category", "collapsed in POST",
                                                                               "already in BASE", "came apart"),
                           rows, numeric=(1, 2, 3)))
    return items


def advice_items(rd: RunData) -> list[Para | Table]:
    """What to do, near the top: the run folder's one recommendation (`analyses.recommend`), the same sentences
    `coverage` and `check` print; for a folder without diff's drift, the coverage advice (`analyses.advice`)."""
    from ..analyses.recommend import from_tables

    rec = from_tables(rd.vocab, rd.drift, rd.summary, coverage=rd.coverage,
                      probe=rd.probe_all if rd.probe_all is not None else rd.probe, saymap=rd.saymap)
    return [Para("What to do: " + " ".join(rec.lines), "note", code=True)] if rec.lines else []


def evaluation_items(summary: dict[str, Any]) -> list[Para | Table]:
    """`evaluate`'s verdict: one row per model (BASE, POST, candidates) and one sentence per candidate."""
    from ..analyses.verdict import Evaluation

    raw = summary.get("evaluate")
    if not isinstance(raw, dict):
        return []
    try:
        ev = Evaluation.from_json(raw)
    except (KeyError, TypeError, ValueError):
        return [Para("summary.json's \"evaluate\" entry is damaged; run `vocabdrift evaluate` again.", "note",
                     code=True)]
    rows: list[list[CellValue]] = []
    conf = any(m.confusion_n for m in ev.models)
    for m in ev.models:
        loss = "" if m.heldout_loss is None else f"{m.heldout_loss:.4f}" + (
            f" ({m.loss_vs_post:+.1%})" if m.loss_vs_post is not None and m.role == "candidate" else "")
        rows.append([m.name, f"{m.probed.sayable:,}/{m.probed.n:,}",
                     "" if m.lost_back is None else f"{m.lost_back:,}/{m.lost_total:,}",
                     f"{m.control.sayable:,}/{m.control.n:,}", loss, "" if m.below is None else f"{m.below:,}",
                     _f4(m.min_cos) if m.min_cos is not None else "",
                     *([f"{m.confusion_hits}/{m.confusion_n}" if m.confusion_n else ""] if conf else []),
                     (m.verdict or m.role) + (f" (template failure: {', '.join(m.failed_templates)})"
                                              if m.failed_templates else "")])
    items: list[Para | Table] = [Para(c.sentence, "verdict") for c in ev.candidates]
    items.append(Table("evaluate", f"Say-ability of {ev.probed:,} probed tokens ({len(ev.lost):,} LOST in POST) "
                       f"and {ev.controls:,} undrifted controls",
                       ("model", "probed sayable", "LOST back", "controls sayable", "held-out loss",
                        "rows below 0.95", "min cos", *(("foreign-script answers",) if conf else ()), "verdict"),
                       rows, numeric=(1, 2, 3, 4, 5, 6, *((7,) if conf else ())),
                       caption="Sayable: kept by top-p 0.95 sampling on a template that works on BASE and did not "
                               "fail in the model (a template on which every token, controls included, collapsed "
                               "is a template failure). Held-out loss on the targets coverage counts."))
    return items


def _training(rd: RunData) -> dict[str, Any] | None:
    """How a run's model was trained (repair's settings), for telling whether two runs compare as equals."""
    rep = rd.summary.get("repair")
    if not isinstance(rep, dict):
        return None
    t = rep.get("training") or {}
    return {"mode": rep.get("mode", "retrain"), "from": rep.get("start"), "steps": t.get("steps"),
            "lr": t.get("lr"), "batch size": t.get("batch_size"), "max length": t.get("max_length")}


def comparability(a: RunData, b: RunData, names: tuple[str, str]) -> str | None:
    """A warning when two runs' models were not trained the same way (a difference in drift then says as much
    about the recipe as about the remedy), or None."""
    ta, tb = _training(a), _training(b)
    if ta is None and tb is None:
        return None
    if ta is None or tb is None:
        known, unknown = (names[1], names[0]) if ta is None else (names[0], names[1])
        return (f"Not a like-for-like comparison: {known} was trained by `vocabdrift repair`, {unknown} by a recipe "
                f"this folder does not record; the difference mixes the remedy with the training settings. Judge "
                f"the repair with `vocabdrift evaluate` instead.")
    diff = [f"{k} {ta[k]} vs {tb[k]}" for k in ta if ta[k] != tb[k]]
    if not diff:
        return None
    return (f"Not a like-for-like comparison: the runs were trained differently ({'; '.join(map(str, diff))}); "
            "the difference mixes the remedy with the training settings.")


def coverage_items(summary: dict[str, Any]) -> list[Para | Table]:
    cov = summary.get("coverage")
    if not cov:
        return []
    floor = cov.get("floor", 5)
    rows: list[list[CellValue]] = []
    got = cov.get("categories") or {}
    for cat in sorted(got, key=lambda c: (c not in LANGUAGES, (*LANGUAGES, *CATEGORIES).index(c)
                                          if c in (*LANGUAGES, *CATEGORIES) else 99, c)):
        v = got[cat]
        rows.append([_category_label(cat), f"{int(v.get('tokens', 0)):,}",
                     _count(int(v.get("at_or_above_floor", 0)), int(v.get("tokens", 0))),
                     f"{float(v.get('zero_share', 0)):.1%}"])
    items: list[Para | Table] = [Table(
        "coverage", f"Coverage as a generation target (floor {floor})",
        ("category", "tokens", f"at or above {floor}", "never a target"), rows,
        caption=f"{int(cov.get('samples', 0)):,} samples, {int(cov.get('target_tokens', 0)):,} target tokens "
                f"({cov.get('targets', 'assistant')} turns).", numeric=(1, 2, 3))]
    o = (cov.get("correlation") or {}).get("overall")
    if o and o.get("spearman_rho") is not None:
        items.insert(0, Para(f"Spearman correlation of log(count + 1) with lm_head cosine over {o['n']:,} tokens: "
                             f"rho = {o['spearman_rho']:+.3f} (p = {o['p_value']:.2g}). "
                             + ("A positive rho: the rarer a token is as a target, the further its row drifted."
                                if o.get("informative", True) else
                                f"Not informative: {o.get('tied_share', 0):.0%} of the tokens share one count "
                                "(never a target), so the ranks cannot tell the drifted rows apart.")))
    return items


# ---- charts -----------------------------------------------------------------------------------------------------

def _subsample(keys: Sequence[np.ndarray], n: int, *, seed: int = 0) -> np.ndarray:
    """Positions to plot: the lowest of each key (the most drifted always shown), then a seeded sample of the rest.

    keys: float (m,) arrays, lower = more interesting. Returns sorted positions, at most `n`.
    """
    m = len(keys[0])
    if m <= n:
        return np.arange(m)
    keep: list[np.ndarray] = []
    per = max(1, min(_SCATTER_WORST, n // 2) // len(keys))
    for k in keys:
        kk = np.where(np.isfinite(k), k, np.inf)
        keep.append(np.argpartition(kk, per)[:per])
    chosen = np.unique(np.concatenate(keep))
    rest = np.setdiff1d(np.arange(m), chosen, assume_unique=True)
    extra = np.random.default_rng(seed).choice(rest, size=min(len(rest), n - len(chosen)), replace=False)
    return np.sort(np.concatenate([chosen, extra]))


def _hover(fr: Frame, pos: np.ndarray) -> list[str]:
    return [f"{token_label(fr.text[i], int(fr.token_id[i]))} · {category_label(str(fr.category[i]))}" for i in pos]


def _groups(fr: Frame, pos: np.ndarray) -> list[tuple[str, np.ndarray, str]]:
    """(label, positions, colour): one group per language present, then every other category together."""
    cats = fr.category[pos]
    out = [(category_label(c), pos[cats == c], _LANG_COLORS[c]) for c in LANGUAGES if (cats == c).any()]
    other = pos[~np.isin(cats, list(LANGUAGES))]
    if other.size:
        out.insert(0, ("other categories", other, _OTHER_COLOR))
    return out


def _edges(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    if not hi > lo:
        hi = lo + 1e-6
    return np.linspace(lo, hi, bins + 1)


def _hist(values: np.ndarray, edges: np.ndarray) -> tuple[list[float], list[int]]:
    counts, _ = np.histogram(values, bins=edges)
    centres = (edges[:-1] + edges[1:]) / 2
    return [round(float(c), 6) for c in centres], counts.tolist()


def _cos_range(values: np.ndarray, thr: float) -> tuple[float, float]:
    lo = float(np.nanmin(values)) if values.size else thr
    return math.floor(min(lo, thr - 0.05) * 50) / 50, 1.0


def cosine_histogram(fr: Frame, thr: float) -> Chart:
    """lm_head cosine per category: binned here, so the page holds ~120 numbers per category, not 250,000."""
    ok = fr.judged()
    edges = _edges(fr.lm_cos[ok], *_cos_range(fr.lm_cos[ok], thr), 120)
    series = [Series("all non-special", *_hist(fr.lm_cos[ok], edges), color="#222222")]
    for c in (*LANGUAGES, *(c for c in CATEGORIES if c not in LANGUAGES and c != "special")):
        sel = ok & (fr.category == c)
        if sel.any():
            series.append(Series(_category_label(c), *_hist(fr.lm_cos[sel], edges), color=_LANG_COLORS.get(c),
                                 visible=c in LANGUAGES))
    return Chart("cosine", "lm_head cosine to the pre-trained row, per category", "cosine", "tokens",
                 tuple(series), logy=True, marks=((thr, f"threshold {thr:g}"),),
                 note="Log scale; click a legend entry to show or hide a category (other categories are hidden "
                      "at first).")


def l2_histogram(fr: Frame, vocab: Vocab, chosen: Sequence[int]) -> Chart:
    """L2 distance of lm_head rows, with the largest movers and the user's tokens marked."""
    ok = ~fr.special & np.isfinite(fr.lm_l2)
    v = fr.lm_l2[ok]
    edges = _edges(v, 0.0, float(v.max()) if v.size else 1.0, 100)
    pos_of = {int(t): i for i, t in enumerate(fr.token_id.tolist())}
    idx = np.flatnonzero(ok)
    big = idx[np.argsort(-fr.lm_l2[idx], kind="stable")[:_L2_MARKS]]
    marks = []
    for i in [*(pos_of[t] for t in chosen if t in pos_of), *big.tolist()]:
        label = f"{vocab.label(int(fr.token_id[i]))} #{int(fr.token_id[i])}"
        if all(m[1] != label for m in marks):
            marks.append((float(fr.lm_l2[i]), label))
    return Chart("l2", "L2 distance of lm_head rows from the pre-trained rows", "L2 distance", "tokens",
                 (Series("all non-special", *_hist(v, edges), color="#222222"),), logy=True, marks=tuple(marks),
                 note="Marked: the largest movers and the tokens named with --token.")


def read_say_scatter(fr: Frame, thr: float, tied: bool) -> Chart | None:
    """Embedding drift vs lm_head drift: rows low on y and right on x are tokens the model still reads whose output
    row drifted; whether each can still be said is the probe's to tell, not the plot's."""
    ok = fr.judged() & np.isfinite(fr.emb_cos)
    idx = np.flatnonzero(ok)
    if not idx.size:
        return None
    pos = idx[_subsample([fr.lm_cos[idx], fr.emb_cos[idx]], _SCATTER_POINTS)]
    series = tuple(Series(label, fr.emb_cos[p].round(5).tolist(), fr.lm_cos[p].round(5).tolist(), "scatter",
                          text=_hover(fr, p), color=color) for label, p, color in _groups(fr, pos))
    lo = min(float(fr.lm_cos[idx].min()), thr - 0.05)
    emin = float(fr.emb_cos[idx].min())
    x0 = max(thr, emin - 0.1 * (1 - emin))  # the box starts at the threshold, or where the points start
    note = (f"{len(pos):,} of {len(idx):,} tokens shown: the most drifted in each space, then a random sample. "
            + ("The model ties lm_head to the embedding, so both cosines are the same row's." if tied else ""))
    return Chart("read-say", "Embedding drift vs lm_head drift: still read, output row drifted", "embedding cosine",
                 "lm_head cosine", series, region=(x0, 1.0, lo, thr, "read, drifted: probe whether said"),
                 note=note.strip())


def coverage_scatter(fr: Frame) -> Chart | None:
    if fr.count is None:
        return None
    idx = np.flatnonzero(fr.judged())
    if not idx.size:
        return None
    pos = idx[_subsample([fr.lm_cos[idx], fr.count[idx]], _SCATTER_POINTS)]
    series = tuple(Series(label, (fr.count[p] + 1).tolist(), fr.lm_cos[p].round(5).tolist(), "scatter",
                          text=_hover(fr, p), color=color) for label, p, color in _groups(fr, pos))
    return Chart("coverage", "Coverage as a generation target vs lm_head cosine", "count + 1 (log)",
                 "lm_head cosine", series, logx=True,
                 note=f"{len(pos):,} of {len(idx):,} tokens shown: the most drifted and the rarest, then a random "
                      "sample.")


def probe_chart(probe: Probe, vocab: Vocab) -> Chart:
    cats = [c for c in CATEGORIES if c != "special"]
    series = []
    present: list[str] = []
    for m in probe.models:
        s = probe.sayable[m]
        n = min(len(s), len(vocab))
        probed = np.isfinite(s[:n])
        for c in cats:
            if (probed & (vocab.category[:n] == c)).any() and c not in present:
                present.append(c)
    present = [c for c in cats if c in present]
    for k, m in enumerate(probe.models):
        s = probe.sayable[m]
        n = min(len(s), len(vocab))
        ys = []
        for c in present:
            sel = np.isfinite(s[:n]) & (vocab.category[:n] == c)
            ys.append(round(float(s[:n][sel].mean()), 4) if sel.any() else 0.0)
        series.append(Series(m, [_category_label(c) for c in present], ys, "bar",
                             color=_RUN_COLORS[k % 2] if len(probe.models) <= 2 else None))
    return Chart("probe", "Probe: share of probes in which the token is sayable, per category", "category",
                 "share sayable", tuple(series),
                 note="Sayable: the token is the first answer token inside top-p 0.95 when asked to repeat it.")


_STATUS_COLORS = {"kept": "#2ca02c", "lost": "#d62728", "gained": "#1f77b4", "never": "#bbbbbb"}


def saymap_chart(summary: dict[str, Any]) -> Chart | None:
    """The say-ability map per category: the share of each category's tokens sayable in both models, LOST,
    GAINED and sayable in neither, stacked; the categories with the most LOST first."""
    from ..analyses.saymap import STATUS_NAMES, STATUSES

    m = summary.get("saymap") or {}
    if "counts" not in m:
        return None
    cats = sorted(m["categories"].items(), key=lambda kv: (-(kv[1]["lost_share"] or 0), -kv[1]["tokens"]))
    cats = [(c, v) for c, v in cats if v["tokens"]]
    labels = [f"{_category_label(c)}: {v['tokens']:,}" for c, v in cats]  # how many: 9 Japanese tokens are not 47K
    series = tuple(Series(STATUS_NAMES[st], labels, [round(v[st] / v["tokens"], 4) for _, v in cats], "bar",
                          text=[f"{_category_label(c)}: {v[st]:,} of {v['tokens']:,} tokens" for c, v in cats],
                          color=_STATUS_COLORS[st]) for st in STATUSES)
    return Chart("saymap", "Say-ability of the whole vocabulary, BASE → POST, per category", "category",
                 "share of the category's tokens", series, stacked=True,
                 note=f"Every one of {m['tokens']:,} tokens asked of both models (vocabdrift saymap): sayable when "
                      f"some template gets it kept by top-p {m.get('top_p', 0.95)}.")


def saymap_items(summary: dict[str, Any], vocab: Vocab, top: int) -> list[Para | Table]:
    """The map's sentences and tables: per category (LOST as a share of what BASE could say), the worst LOST
    tokens per category, and LOST by drift, coverage and collapse."""
    from ..analyses.saymap import headline

    m = summary.get("saymap") or {}
    if not m:
        return []
    items: list[Para | Table] = [Para(x, "verdict" if i == 0 else "") for i, x in enumerate(headline(m))]
    cats = m["categories"]
    if "counts" not in m:
        rows = [[_category_label(c), f"{v['tokens']:,}", _of(v["sayable"], v["tokens"])]
                for c, v in sorted(cats.items(), key=lambda kv: -kv[1]["tokens"])]
        items.append(Table("saymap", f"Say-ability of {m['tokens']:,} tokens", ("category", "tokens", "sayable"),
                           rows, numeric=(1, 2)))
        return items
    rows = []
    order = sorted(cats.items(), key=lambda kv: (-(kv[1]["lost_share"] or 0), -kv[1]["tokens"]))
    for c, v in [*order, ("all", {**m["counts"], "tokens": m["tokens"], "lost_share": m.get("lost_share")})]:
        base = v["kept"] + v["lost"]
        rows.append([_category_label(c) if c != "all" else "all", f"{v['tokens']:,}", _of(base, v["tokens"]),
                     _of(v["kept"] + v["gained"], v["tokens"]),
                     Cell(_of(v["lost"], base), "bad" if v["lost"] else "") if base else "—",
                     f"{v['gained']:,}", f"{v['never']:,}"])
    items.append(Table("saymap", f"Say-ability of {m['tokens']:,} tokens, BASE → POST",
                       ("category", "tokens", "sayable BASE", "sayable POST", "LOST (of BASE's)", "GAINED",
                        "neither"), rows, numeric=(1, 2, 3, 4, 5, 6),
                       caption="LOST: sayable in BASE, not in POST, as a share of the tokens BASE could say."))
    worst = m.get("worst") or {}
    if worst:
        wrows = [[_category_label(c), [Cell(vocab.label(i), "tok") for i in ids[:top]]]
                 for c, ids in sorted(worst.items(), key=lambda kv: -(cats[kv[0]]["lost_share"] or 0))]
        items.append(Table("saymap-worst", "LOST tokens per category, the most confident loss first",
                           ("category", "tokens"), wrows))
    names = {"drift": "lm_head cos", "coverage": "SFT target count", "collapsed": "collapse"}
    rel = [[f"{names.get(k, k)}: {r['label']}", f"{r['tokens']:,}", f"{r['sayable_base']:,}",
            _of(r["lost"], r["sayable_base"]) if r["sayable_base"] else "—"]
           for k, rs in (m.get("relations") or {}).items() for r in rs]
    if rel:
        items.append(Table("saymap-relations", "LOST by what else the run knows",
                           ("tokens by", "tokens", "BASE could say", "LOST"), rel, numeric=(1, 2, 3),
                           caption="A LOST share that does not fall with the cosine is say-ability the cosine "
                                   "does not see."))
    return items


def confusion_chart(conf: dict[str, Any]) -> Chart | None:
    res = conf.get("results") or []
    if not res:
        return None
    labels = list(dict.fromkeys(f"{_lang(r.get('language', ''))}: {_clip(str(r.get('prompt', '')), 24)}"
                                for r in res))
    models = list(dict.fromkeys(str(r.get("model", "")) for r in res))
    series = []
    for k, m in enumerate(models):
        by = {f"{_lang(r.get('language', ''))}: {_clip(str(r.get('prompt', '')), 24)}": r for r in res
              if str(r.get("model", "")) == m}
        xs = [lab for lab in labels if lab in by]
        y = [float(by[x]["rate"]) for x in xs]
        lo = [max(0.0, float(by[x]["rate"]) - float(by[x].get("ci_low", by[x]["rate"]))) for x in xs]
        hi = [max(0.0, float(by[x].get("ci_high", by[x]["rate"])) - float(by[x]["rate"])) for x in xs]
        series.append(Series(m, xs, y, "bar", err=(lo, hi), color=_RUN_COLORS[k % 2] if len(models) <= 2 else None))
    return Chart("confusion", "Script confusion: share of answers with characters of a foreign script",
                 "prompt", "rate", tuple(series), note="Bars: the rate; whiskers: the Wilson 95% interval.")


# ---- rendering a chart ------------------------------------------------------------------------------------------

def _log(v: float, on: bool) -> float:
    return math.log10(v) if on and v > 0 else v


def _mark_side(c: Chart, x: float) -> str:
    """Which side of its line a mark's label goes: left of a line in the right part of the x range, so labels at
    the right edge (the largest L2 movers) stay inside the plot instead of running off it and over each other."""
    xs = [float(v) for s in c.series if s.kind != "bar" for v in s.x if isinstance(v, (int, float, np.number))]
    xs += [m[0] for m in c.marks]
    if not xs:
        return "left"
    lo, hi = (_log(min(xs), c.logx), _log(max(xs), c.logx))
    return "right" if hi > lo and (_log(x, c.logx) - lo) / (hi - lo) > 0.6 else "left"


def plotly_spec(c: Chart) -> dict[str, Any]:
    """A Plotly figure as plain JSON (data, layout, config): plotly.js draws it; no Python-side validation."""
    data = []
    for s in c.series:
        t: dict[str, Any] = {"name": _plotly_text(s.name), "x": list(s.x), "y": list(s.y)}
        if s.kind == "step":
            t |= {"type": "scatter", "mode": "lines", "line": {"shape": "hvh", "width": 1.5}}
            if s.color:
                t["line"]["color"] = s.color
        elif s.kind == "scatter":
            t |= {"type": "scatter", "mode": "markers", "marker": {"size": 5, "opacity": 0.7}}
            if s.color:
                t["marker"]["color"] = s.color
        else:
            t |= {"type": "bar"}
            if s.color:
                t["marker"] = {"color": s.color}
            if s.err:
                t["error_y"] = {"type": "data", "symmetric": False, "array": list(s.err[1]),
                                "arrayminus": list(s.err[0])}
        if s.text is not None:
            t["text"] = [_plotly_text(x) for x in s.text]
            t["hovertemplate"] = "%{text}<br>x=%{x:.4g}<br>y=%{y:.4g}<extra></extra>"
        if not s.visible:
            t["visible"] = "legendonly"
        data.append(t)
    shapes, notes = [], []
    for k, (x, label) in enumerate(c.marks):
        xv = _log(x, c.logx)
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": xv, "x1": xv, "y0": 0, "y1": 1,
                       "line": {"color": "#555", "width": 1, "dash": "dot"}})
        notes.append({"x": xv, "y": 1 - 0.07 * (k % 8), "xref": "x", "yref": "paper", "text": _plotly_text(label),
                      "showarrow": False, "xanchor": _mark_side(c, x), "font": {"size": 11},
                      "bgcolor": "rgba(255,255,255,0.7)"})
    if c.region:
        x0, x1, y0, y1, label = c.region
        shapes.append({"type": "rect", "xref": "x", "yref": "y", "x0": _log(x0, c.logx), "x1": _log(x1, c.logx),
                       "y0": _log(y0, c.logy), "y1": _log(y1, c.logy), "fillcolor": "rgba(214,39,40,0.08)",
                       "line": {"width": 0}, "layer": "below"})
        notes.append({"x": _log(x0, c.logx), "y": _log(y0, c.logy), "xref": "x", "yref": "y", "xanchor": "left",
                      "yanchor": "bottom", "text": _plotly_text(label), "showarrow": False,
                      "font": {"color": "#b22222"}})
    layout = {"title": {"text": _plotly_text(c.title), "font": {"size": 15}},
              "xaxis": {"title": {"text": _plotly_text(c.xlabel)}, "type": "log" if c.logx else "-",
                        "automargin": True},
              "yaxis": {"title": {"text": _plotly_text(c.ylabel)}, "type": "log" if c.logy else "-",
                        "automargin": True},
              "shapes": shapes, "annotations": notes, "barmode": "stack" if c.stacked else "group", "height": 440,
              "margin": {"l": 60, "r": 20, "t": 50, "b": 50}, "hovermode": "closest",
              "legend": {"orientation": "v"}, "paper_bgcolor": "white", "plot_bgcolor": "#fafafa",
              "font": {"family": FONT_SANS}}  # labels and hover text hold tokens of every script too
    return {"data": data, "layout": layout, "config": {"displaylogo": False, "responsive": True}}


_MPL_FONTS = ["DejaVu Sans", "Noto Sans CJK JP", "Noto Sans CJK SC", "Droid Sans Fallback", "WenQuanYi Zen Hei"]


def png(c: Chart) -> bytes:
    """The chart as a static PNG (matplotlib, no global state: an Agg canvas of its own)."""
    need_extra("matplotlib", "report", "the Markdown report's plots")
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import blended_transform_factory

    def esc(s: str) -> str:  # legend labels go through mathtext: `$` must not start a formula
        return s.replace("$", r"\$")

    with rc_context({"font.family": "sans-serif", "font.sans-serif": _MPL_FONTS}), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs (CJK without a CJK font) become boxes, not noise
        fig = Figure(figsize=(9, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        shown = [s for s in c.series if s.visible]
        bars = [s for s in shown if s.kind == "bar"]
        labels = list(dict.fromkeys(x for s in bars for x in s.x))
        width = 0.8 / max(1, len(bars)) if not c.stacked else 0.8
        bottom = np.zeros(len(labels))
        for s in shown:
            if s.kind == "step":
                ax.step(s.x, s.y, where="mid", label=esc(s.name), color=s.color, lw=1.2)
            elif s.kind == "scatter":
                ax.scatter(s.x, s.y, s=6, alpha=0.6, label=esc(s.name), color=s.color, linewidths=0)
            else:
                k = bars.index(s)
                at = np.array([labels.index(x) for x in s.x], dtype=int)
                xs = at + (0.0 if c.stacked else (k - (len(bars) - 1) / 2) * width)
                ax.bar(xs, s.y, width=width, label=esc(s.name), color=s.color, bottom=bottom[at] if c.stacked
                       else None, yerr=[list(s.err[0]), list(s.err[1])] if s.err else None, capsize=3)
                if c.stacked:
                    bottom[at] += np.asarray(s.y, dtype=float)
        if bars:
            ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
            for t in ax.get_xticklabels():
                t.set_parse_math(False)
        if c.logx:
            ax.set_xscale("log", nonpositive="mask")
        if c.logy:
            ax.set_yscale("log", nonpositive="mask")
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        for k, (x, label) in enumerate(c.marks):
            ax.axvline(x, color="#555555", lw=0.8, ls=":")
            side = _mark_side(c, x)
            ax.text(x, 0.97 - 0.07 * (k % 8), f" {label} " if side == "left" else f"{label} ", transform=trans,
                    fontsize=8, va="top", ha=side, parse_math=False,
                    bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1})
        if c.region:
            x0, x1, y0, y1, label = c.region
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, color="#d62728", alpha=0.08, lw=0, zorder=0))
            ax.text(x0, y0, " " + label, color="#b22222", fontsize=9, va="bottom", parse_math=False)
        ax.set_title(c.title, fontsize=11, parse_math=False)
        ax.set_xlabel(c.xlabel, parse_math=False)
        ax.set_ylabel(c.ylabel, parse_math=False)
        ax.grid(alpha=0.3)
        if len(shown) > 1:
            ax.legend(fontsize=7, ncol=2 if len(shown) > 4 else 1)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def pngs(charts: Sequence[Chart]) -> list[bytes]:
    """`png` of each chart; on two cores or more, in two forked processes. Most of a report's time is matplotlib
    laying out text, one chart at a time: two processes render 1.8x faster (bench/report_scale.py), the same bytes."""
    import multiprocessing as mp

    from ..device import usable_cpus

    if charts:  # here, not in a worker
        need_extra("matplotlib", "report", "the Markdown report's plots")
    if len(charts) < 2 or usable_cpus() < 2 or "fork" not in mp.get_all_start_methods():
        return [png(c) for c in charts]
    from concurrent.futures import ProcessPoolExecutor

    import matplotlib.backends.backend_agg  # noqa: F401  (imported once, here, for both workers)

    with warnings.catch_warnings():  # Python 3.12+ warns on a fork with threads (an idle torch pool, say)
        warnings.simplefilter("ignore", DeprecationWarning)
        with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("fork")) as pool:
            return list(pool.map(png, charts))


# ---- comparing two runs -----------------------------------------------------------------------------------------

def _stat(rd: RunData, key: str, space: str = "lm_head") -> dict[str, Any] | None:
    b = _block(rd.summary, key)
    return b.get(space) if b else None


def comparison_items(a: RunData, b: RunData, names: tuple[str, str], fa: Frame, fb: Frame
                     ) -> list[Para | Table | Chart]:
    """Two runs side by side, like the published "baseline vs experimental" table, with the differences."""
    na, nb = names
    rows: list[list[CellValue]] = []
    for space in ("lm_head", "embed"):
        sa, sb = _stat(a, "overall", space), _stat(b, "overall", space)
        if not sa or not sb or not sa.get("tokens") or not sb.get("tokens"):
            continue
        rows.append([f"{space} cosine to pre-trained, mean / min", f"{_f4(sa['mean_cos'])} / {_f4(sa['min_cos'])}",
                     f"{_f4(sb['mean_cos'])} / {_f4(sb['min_cos'])}",
                     f"{_delta(sa['mean_cos'], sb['mean_cos'])} / {_delta(sa['min_cos'], sb['min_cos'])}"])
        if space == "lm_head":
            rows.append(["tokens below 0.95 / 0.90",
                         f"{_count(sa['below_0.95'], sa['tokens'])} / {_count(sa['below_0.90'], sa['tokens'])}",
                         f"{_count(sb['below_0.95'], sb['tokens'])} / {_count(sb['below_0.90'], sb['tokens'])}",
                         f"{sb['below_0.95'] - sa['below_0.95']:+,} / {sb['below_0.90'] - sa['below_0.90']:+,}"])
    for c in LANGUAGES:
        sa, sb = _stat(a, c), _stat(b, c)
        if not (sa and sa.get("tokens")) and not (sb and sb.get("tokens")):
            continue
        ka, ta = (sa["below_0.95"], sa["tokens"]) if sa else (0, 0)
        kb, tb = (sb["below_0.95"], sb["tokens"]) if sb else (0, 0)
        d = f"{100 * (kb / tb - ka / ta):+.1f} pp" if ta and tb else "—"
        rows.append([f"{category_label(c)} tokens below 0.95", _of(ka, ta), _of(kb, tb), d])
    res_a, res_b = (a.confusion or {}).get("results", []), (b.confusion or {}).get("results", [])
    # each run sampled its own model (the lab's baseline and repaired): compare them prompt by prompt
    one = all(len({r.get("model") for r in res}) <= 1 for res in (res_a, res_b))
    ca = {(r.get("language"), r.get("prompt"), "" if one else r.get("model")): r for r in res_a}
    cb = {(r.get("language"), r.get("prompt"), "" if one else r.get("model")): r for r in res_b}
    for key in dict.fromkeys([*ca, *cb]):
        ra, rb = ca.get(key), cb.get(key)
        lang, prompt, model = key
        rate = [f"{r['rate']:.0%} of {int(r.get('n', 0))}" if r else "—" for r in (ra, rb)]
        d = f"{100 * (rb['rate'] - ra['rate']):+.0f} pp" if ra and rb else "—"
        if ra and rb:
            from ..analyses.confusion import fisher_test

            d += f" (Fisher p {_num(fisher_test(int(rb['hits']), int(rb['n']), int(ra['hits']), int(ra['n']))[1])})"
        rows.append([f"{_lang(str(lang))} prompt → foreign script{f' ({model})' if model else ''}: "
                     f"{_clip(str(prompt), 30)}", *rate, d])
    cs_a, cs_b = a.summary.get("cases") or {}, b.summary.get("cases") or {}
    for m in dict.fromkeys([*cs_a, *cs_b]):
        va, vb = cs_a.get(m), cs_b.get(m)
        d = f"{vb['passed'] - va['passed']:+d}" if va and vb else "—"
        rows.append([f"qualitative cases passed ({m})", *(f"{v['passed']}/{v['total']}" if v else "—"
                                                           for v in (va, vb)), d])
    warning = comparability(a, b, names)
    items: list[Para | Table | Chart] = [
        *([Para(warning, "verdict", code=True)] if warning else []),
        Para(f"{na}: {verdict(a.summary)}"), Para(f"{nb}: {verdict(b.summary)}"),
        Table("compare", f"{na} vs {nb}", ("metric", na, nb, f"difference ({nb} − {na})"), rows,
              numeric=(1, 2, 3))]
    crows: list[list[CellValue]] = []
    for key, label in category_rows({"categories": {**a.summary.get("categories", {}),
                                                    **b.summary.get("categories", {})}}):
        sa, sb = _stat(a, key), _stat(b, key)
        if not (sa and sa.get("tokens")) or not (sb and sb.get("tokens")):
            continue
        crows.append([label, f"{sa['tokens']:,}" + ("" if sa["tokens"] == sb["tokens"] else f" / {sb['tokens']:,}"),
                      _count(sa["below_0.95"], sa["tokens"]), _f4(sa["min_cos"]),
                      _count(sb["below_0.95"], sb["tokens"]), _f4(sb["min_cos"]),
                      f"{100 * (sb['below_0.95'] / sb['tokens'] - sa['below_0.95'] / sa['tokens']):+.1f} pp"])
    items.append(Table("compare-categories", "Per category, side by side (lm_head)",
                       ("category", "tokens", f"{na}: below 0.95", f"{na}: min cos", f"{nb}: below 0.95",
                        f"{nb}: min cos", "difference"), crows, numeric=(1, 2, 3, 4, 5, 6)))
    thr = float(a.summary.get("threshold", 0.95))
    va, vb = fa.lm_cos[fa.judged()], fb.lm_cos[fb.judged()]
    edges = _edges(va, *_cos_range(np.concatenate([va, vb]), thr), 120)
    items.append(Chart("compare", f"lm_head cosine: {na} vs {nb}", "cosine", "tokens",
                       (Series(na, *_hist(va, edges), color=_RUN_COLORS[0]),
                        Series(nb, *_hist(vb, edges), color=_RUN_COLORS[1])), logy=True,
                       marks=((thr, f"threshold {thr:g}"),)))
    return items


# ---- the page ---------------------------------------------------------------------------------------------------

def _origin(rd: RunData) -> str:
    """What the run compared, from manifest.json's diff entry: "base → post"."""
    for cmd in reversed(rd.manifest.get("commands", [])):
        args = cmd.get("arguments", {})
        if "base" in args and "post" in args:
            return f"{args['base']} → {args['post']} ({cmd.get('command', '')}, {cmd.get('finished', '')})"
    return ""


def build_sections(rd: RunData, *, compare: RunData | None = None, names: tuple[str, str] | None = None,
                   tokens: Sequence[str | int] = (), top: int = 50, findings: Sequence[str] = ()) -> list[Section]:
    """The page as data: the sections both renderers draw. `findings`: sentences of a verdict computed elsewhere
    (the lab's), shown first; a REGRESSION in red, "No signal" and "Worse, not significantly" as notes."""
    vocab = Vocab.of(rd.vocab)
    chosen = resolve_tokens(tokens, vocab)
    fr = Frame.of(rd, vocab)
    s = rd.summary
    thr = float(s.get("threshold", 0.95))
    probe = Probe.of(rd, len(vocab)) if rd.probe is not None else None

    overview = Section("overview", "Overview", [Para(verdict(s), "verdict"), *probe_headline_items(s),
                                                *advice_items(rd), language_table(s)])
    notes = []
    opts = s.get("options") or {}
    if opts.get("fold_norm"):
        notes.append("lm_head rows were folded with each model's final norm weight g before comparing "
                     "(diff --fold-norm): the cosines are of W·diag(g), what the logits are computed from.")
    if s.get("centered"):
        overview.items.append(language_table(s, centered=True))
    if s.get("nonfinite_rows"):
        notes.append(f"{len(s['nonfinite_rows']):,} rows hold NaN or infinite weights (ids "
                     f"{', '.join(map(str, s['nonfinite_rows'][:5]))}…); they are left out of every number.")
    if s.get("added_tokens"):
        notes.append(f"{len(s['added_tokens']):,} tokens exist only in the post-trained model; they have no "
                     "pre-trained row to compare with.")
    chk = s.get("check")
    if chk:
        overview.items.insert(1, Para(f"Check: {chk.get('verdict', '')}", "ok" if chk.get("passed") else "bad"))
    overview.items += [Para(n, "note") for n in notes]

    tied = bool((s.get("tied") or {}).get("post"))
    charts: list[Chart | None] = [cosine_histogram(fr, thr), l2_histogram(fr, vocab, chosen),
                                  read_say_scatter(fr, thr, tied), coverage_scatter(fr)]
    if probe is not None:
        charts.append(probe_chart(probe, vocab))
    charts.append(saymap_chart(s))
    if rd.confusion:
        charts.append(confusion_chart(rd.confusion))
    plots = Section("plots", "Plots", [c for c in charts if c is not None])

    tables = Section("tables", "Tables", [drifted_table(fr, vocab, probe, top)])
    nts, nnotes = neighbors_tables(rd, fr, vocab, chosen)
    tables.items += [*nts, *nnotes]
    tables.items += intrusion_items(s)
    tables.items += collapse_items(s)
    if probe is not None:
        tables.items.append(lost_table(probe, fr, vocab, top))
    if rd.cases:
        tables.items += cases_tables(rd.cases)
    if rd.confusion:
        tables.items += confusion_tables(rd.confusion)
    for run_data in (rd, compare):
        if run_data is not None and run_data.answers:
            t = answers_table(run_data.answers, title=run_data.name)
            if t is not None:
                tables.items.append(t)
    tables.items += coverage_items(s)

    sections = [overview, plots, tables]
    said = saymap_items(s, vocab, top)
    if said:
        sections.insert(1, Section("saymap", "Say-ability of the whole vocabulary (saymap)", said))
    ev = evaluation_items(s)
    if ev:
        sections.insert(1, Section("evaluate", "Did the repair work? (evaluate)", ev))
    if compare is not None:
        assert names is not None
        fb = Frame.of(compare, Vocab.of(compare.vocab))
        sections.insert(1, Section("compare", f"Comparing runs: {names[0]} vs {names[1]}",
                                   comparison_items(rd, compare, names, fr, fb)))
    if findings:
        sections.insert(0, Section("verdict", "Verdict", [
            Para(x, "bad" if x.startswith("REGRESSION") else "note" if x.startswith(("No signal", "Worse"))
                 else "verdict") for x in findings]))
    return sections


def _template() -> Any:
    from jinja2 import Environment, StrictUndefined

    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string((resources.files("vocabdrift") / "data" / "report.html.j2").read_text(encoding="utf-8"))


def _plotly_js() -> str:
    js = need_extra("plotly.offline", "report", "the HTML report").get_plotlyjs()
    if "</script" in js.lower():  # inlined as-is; it must not be able to end its own element
        raise VocabdriftError("this plotly version's JavaScript contains '</script'; install another plotly")
    return js


def render_html(sections: list[Section], *, title: str, origin: str) -> str:
    """The self-contained page: plotly.js inline once, each figure's JSON in a non-executing script element."""
    from .. import __version__

    specs = [(it.key, _script_json(plotly_spec(it))) for s in sections for it in s.items if isinstance(it, Chart)]
    return _template().render(title=title, origin=origin, sections=sections, specs=specs, plotly_js=_plotly_js(),
                              version=__version__, font_sans=FONT_SANS, font_mono=FONT_MONO)


def _md_table(t: Table) -> str:
    def cell(v: CellValue) -> str:
        if isinstance(v, Cell):
            return _md(v.text)
        if isinstance(v, list) and v and all(c.cls in ("ans", "foreign") for c in v):  # an answer, marked
            return "".join(f"⟦{_md(c.text)}⟧" if c.cls == "foreign" else _md(c.text) for c in v)
        if isinstance(v, list):
            return _md(", ".join(c.text for c in v))
        return _md(v)

    align = ["---:" if k in t.numeric else "---" for k in range(len(t.headers))]
    lines = ["| " + " | ".join(_md(h) for h in t.headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in t.rows]
    if not t.rows:
        lines.append("| " + " | ".join(["(none)"] + [""] * (len(t.headers) - 1)) + " |")
    out = f"### {_md(t.title)}\n\n" + "\n".join(lines) + "\n"
    return out + (f"\n{_md(t.caption)}\n" if t.caption else "")


def render_markdown(sections: list[Section], *, title: str, origin: str, images: dict[str, str]) -> str:
    """The Markdown page; `images` maps a chart's key to its PNG's path relative to report.md."""
    out = [f"# {_md(title)}\n"]
    if origin:
        out.append(f"{_md(origin)}\n")
    for s in sections:
        out.append(f"## {_md(s.title)}\n")
        for it in s.items:
            if isinstance(it, Para):
                text = "".join(f"`{x}`" if code else _md(x) for code, x in it.parts)
                out.append(f"**{text}**\n" if it.cls in ("verdict", "bad") else f"{text}\n")
            elif isinstance(it, Table):
                out.append(_md_table(it))
            elif it.key in images:
                note = _static_note(it.note)
                out.append(f"![{_md(it.title)}]({images[it.key]})\n" + (f"\n{_md(note)}\n" if note else ""))
    return "\n".join(out)


def _names(run: Path, compare: Path, names: str | Sequence[str] | None) -> tuple[str, str]:
    if names is None:
        a, b = run.resolve().name, compare.resolve().name
        return (a, b) if a != b else (f"A ({a})", f"B ({b})")
    parts = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise VocabdriftError(f"--names {names!r}: give two different names separated by a comma, e.g. "
                              "--names baseline,repaired")
    return parts[0], parts[1]


def report(run: PathLike, *, compare: PathLike | None = None, names: str | Sequence[str] | None = None,
           tokens: Sequence[str | int] | None = None, top: int = 50, findings: Sequence[str] = ()
           ) -> tuple[Path, Path]:
    """Write RUN/report.html and RUN/report.md (with PNG plots in RUN/report_files/) from the run folder alone.

    Args:
        run: a run folder holding at least diff's vocab.parquet, drift.parquet and summary.json; coverage,
            probe, neighbours, cases and confusion results are shown when present.
        compare: a second run folder to put side by side with the first (e.g. a repaired model's run).
        names: the two runs' names, "baseline,repaired" or a pair (default: the folders' names).
        tokens: tokens to mark and show the neighbours of: ids, exact texts or raw pieces.
        top: rows in the tables of most drifted and lost tokens.
        findings: a verdict's sentences to open the page with (the lab passes its own: what reproduced, the
            repaired model's regressions, the measurements without signal).
    Returns:
        (path of report.html, path of report.md).

    Example:
        >>> html_path, md_path = report("runs/sft1", compare="runs/fixed", names="baseline,repaired")
    """
    if top < 1:
        raise VocabdriftError(f"--top {top}: give a positive number of rows")
    if names is not None and compare is None:
        raise VocabdriftError("--names names two runs: give a second run folder to compare with")
    p = Path(run)
    pair = _names(p, Path(compare), names) if compare is not None else None
    rd = read_run(p, name=pair[0] if pair else None)
    rb = read_run(compare, name=pair[1]) if compare is not None and pair else None
    sections = build_sections(rd, compare=rb, names=pair, tokens=tokens or (), top=top, findings=findings)
    title = f"vocabdrift report: {rd.name}" + (f" vs {rb.name}" if rb else "")
    origin = _origin(rd)
    page = render_html(sections, title=title, origin=origin)  # before any write: a failure leaves nothing new

    # a comparison goes beside RUN's own report, named for both runs: it never overwrites it
    html_name, md_name, files_name = (R.comparison_files(*pair) if pair is not None
                                      else (R.REPORT_HTML, R.REPORT_MD, _FILES))
    charts = [it for s in sections for it in s.items if isinstance(it, Chart)]
    images_data = pngs(charts)  # before any write too
    files = p / files_name
    files.mkdir(exist_ok=True)
    images = {}
    for c, data in zip(charts, images_data, strict=True):
        write_bytes_atomic(files / f"{c.key}.png", data)
        images[c.key] = f"{files_name}/{c.key}.png"
    md_path, html_path = p / md_name, p / html_name
    write_bytes_atomic(md_path, render_markdown(sections, title=title, origin=origin, images=images).encode())
    write_bytes_atomic(html_path, page.encode())
    with R.open_run(p, create=False) as rf:  # stamped in the manifest: a change of pair removes them
        rf.wrote(html_name, md_name, files_name)
        rf.record("report", arguments={"compare": None if compare is None else str(compare), "names": list(pair or ()),
                                       "tokens": [str(t) for t in tokens or ()], "top": top})
    log.info("wrote %s and %s", html_path, md_path)
    return html_path, md_path
