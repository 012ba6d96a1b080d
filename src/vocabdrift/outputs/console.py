"""Terminal tables (rich), built from the run folder's contents. Nothing here computes a number."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..analyses.vocab import CATEGORIES, LANGUAGE_NAMES, LANGUAGES, printable

if TYPE_CHECKING:
    import pyarrow as pa
    from rich.table import Table


def _pct(k: int, n: int) -> str:
    return f"{k:,} ({100.0 * k / n:.1f}%)" if n else "0"


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def category_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) for the per-language table: overall, the languages of DESIGN.md, then the other categories."""
    cats = summary.get("categories", {})
    rows = [("overall", "All (non-special)"), ("reachable", "Reachable")]
    rows += [(c, LANGUAGE_NAMES[c]) for c in LANGUAGES if c in cats]
    rows += [(c, c) for c in CATEGORIES if c in cats and c not in LANGUAGES]
    return rows


def drift_summary_table(summary: dict[str, Any], *, space: str = "lm_head") -> Table:
    """The per-language table in the layout of DESIGN.md's reference table."""
    from rich.table import Table

    thr = summary.get("threshold", 0.95)
    t = Table(title=f"{space} cosine to BASE, per category", title_justify="left")
    for col in ("category", "tokens", "mean cos", "min cos", f"below {thr:g}", "below 0.90"):
        t.add_column(col, justify="left" if col == "category" else "right")
    for key, label in category_rows(summary):
        block = summary[key] if key in ("overall", "reachable") else summary["categories"][key]
        s = block[space]
        t.add_row(label, f"{s['tokens']:,}", _f(s["mean_cos"]), _f(s["min_cos"]),
                  _pct(s["below_threshold"], s["tokens"]), _pct(s["below_0.90"], s["tokens"]))
    return t


def drifted_tokens_table(top: pa.Table, *, title: str = "Most drifted lm_head rows") -> Table:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("id", "text", "category", "lm_head cos", "embed cos", "norm base→post"):
        t.add_column(col, justify="left" if col in ("text", "category") else "right")
    for r in top.to_pylist():
        t.add_row(str(r["token_id"]), printable(r["text"]), r["category"], f"{r['lm_head_cos']:.4f}",
                  _f(r["embed_cos"]), f"{r['lm_head_norm_base']:.3f}→{r['lm_head_norm_post']:.3f}")
    return t


def neighbors_console_table(nt: pa.Table, *, title: str) -> Table:
    """Neighbours side by side, one column per model; special tokens are marked ★."""
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
    for rank in range(1, k + 1):
        cells = [str(rank)]
        for m in models:
            r = by.get((m, rank))
            if r is None:
                cells += ["", ""]
            else:
                mark = " ★" if r["is_special"] else ""
                cells += [f"{printable(r['text'])} [{r['neighbor_id']}]{mark}", f"{r['cos']:.3f}"]
        t.add_row(*cells)
    return t
