"""The say-ability map as data: which tokens of the whole vocabulary BASE and POST can say, and how the losses
relate to drift, coverage and collapsed rows.

A token is sayable by a model when some probe template gets it kept by top-p sampling (`analyses.probe`). Asking
every token every template costs too much on a whole vocabulary, so the map asks each token only what decides its
verdict (`api.saymap`): templates in the order that settles most tokens first, a stop at the first template that
keeps the token, and a fast, rounded pass (bfloat16) whose verdicts are taken only when they are far from the top-p
cut; the rest are asked again in the exact dtype. This module holds the pure pieces of that: the order, the
screen, its margin, the statuses and the summary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

STATUSES = ("kept", "lost", "gained", "never")  # sayable in both / BASE only / POST only / neither
STATUS_NAMES = {"kept": "sayable in both", "lost": "LOST (BASE only)", "gained": "GAINED (POST only)",
                "never": "sayable in neither"}
MIN_MARGIN = 0.25  # nats: the smallest margin the screen takes, however close the two passes agreed
DEFAULT_MARGIN = 1.0  # nats: the margin when the sample held no token near the cut to measure it on
SURE, CUT, UNSURE = 1, 0, -1


def template_order(kept: np.ndarray, names: Sequence[str], cost: Sequence[float] | None = None) -> list[str]:
    """Templates in the order that settles most tokens per unit of work first: the one that keeps most of a
    sample for its cost, then the one that keeps most of what is left for its cost, and so on (a greedy cover;
    ties keep `names`' order). Every template stays in the order: a token no template keeps is asked them all.

    Args:
        kept: (tokens, templates) booleans, the sample's exact verdicts per template.
        cost: the work of asking one token each template (the positions its prompt runs after the shared
            prefix); equal when not given.
    """
    kept = np.asarray(kept, bool)
    cost = [1.0] * len(names) if cost is None else [max(float(c), 1e-9) for c in cost]
    left = np.ones(kept.shape[0], bool)
    order: list[int] = []
    rest = list(range(len(names)))
    while rest:
        gains = [(kept[:, j] & left).sum() / cost[j] for j in rest]
        j = rest[int(np.argmax(gains))]  # argmax takes the first of equal gains
        order.append(j)
        rest.remove(j)
        left &= ~kept[:, j]
    return [names[j] for j in order]


def template_rule(base: dict[str, Any], post: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The templates a map reads, by `probe`'s template rule (`analyses.verdict.template_health`): every one but
    those POST lost as a whole (a template that works on BASE, keeping at least half of the sample, and whose
    median probability in POST fell below 1% of BASE's); and the ones it lost. So the map's LOST never counts a
    prompt POST stopped following as tokens it cannot say. (A template that does not work on BASE stays: over a
    whole vocabulary, each template's verdicts are read where it works.)

    Args:
        base / post: each model's calibration: "templates", "sample" (token ids), "kept" and "p" (sample x
            templates, exact).
    """
    from .verdict import template_health

    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for name, c in (("base", base), ("post", post)):
        for i, t in enumerate(c["sample"]):
            for j, tmpl in enumerate(c["templates"]):
                rows[(name, tmpl, int(t))] = {"p": float(c["p"][i][j]), "sayable": bool(c["kept"][i][j]), "rank": 0}
    if set(base["templates"]) != set(post["templates"]):  # different prompts for each model: no common rule
        return list(dict.fromkeys([*base["templates"], *post["templates"]])), []
    templates = list(base["templates"])
    health = template_health(rows, ["base", "post"], templates, base["sample"], base["sample"])
    failed = sorted(h.template for h in health if h.model == "post" and h.failed)
    return [t for t in templates if t not in failed], failed


def cut_distance(mass_above: np.ndarray, top_p: float) -> np.ndarray:
    """How far each target is from the top-p cut, in nats: log of the mass at or below the target minus log of
    the mass top-p leaves out (1 - top_p). Positive: kept; negative: cut. Measured in logs because a rounded pass
    errs by a factor on probabilities, not by an amount."""
    m = np.clip(np.asarray(mass_above, np.float64), 0.0, 1.0 - 1e-15)
    with np.errstate(divide="ignore"):
        return np.log1p(-m) - math.log1p(-top_p) if top_p < 1 else np.full(m.shape, np.inf)


def screen(mass_above: np.ndarray, top_p: float, margin: float) -> np.ndarray:
    """The fast pass's verdict per score: SURE (kept, farther than `margin` inside the cut), CUT (farther than
    `margin` outside it) or UNSURE (near the cut, or no number: ask again in the exact dtype).

    The first choice has nothing above it (distance log(1/(1 - top_p))), so it is SURE only when that clears the
    margin too: at a small top-p the rounded pass's first choice may not be the exact one's."""
    d = cut_distance(mass_above, top_p)
    out = np.full(d.shape, UNSURE, np.int8)
    out[d > margin] = SURE
    out[d < -margin] = CUT
    out[~np.isfinite(np.asarray(mass_above, np.float64))] = UNSURE
    return out


def calibrate_margin(exact_mass: np.ndarray, fast_mass: np.ndarray, top_p: float) -> float:
    """The screen's margin for one model: twice the largest disagreement between the exact and the fast pass on
    a sample, counted where either puts the target within 3 nats of the cut (far from it, a disagreement changes
    no verdict), and at least MIN_MARGIN. DEFAULT_MARGIN when no sampled target came near the cut."""
    e, f = cut_distance(exact_mass, top_p), cut_distance(fast_mass, top_p)
    near = np.isfinite(e) & np.isfinite(f) & ((np.abs(e) < 3) | (np.abs(f) < 3))
    if not near.any():
        return DEFAULT_MARGIN
    return float(max(MIN_MARGIN, 2 * np.abs(e[near] - f[near]).max()))


def statuses(base_sayable: np.ndarray, post_sayable: np.ndarray) -> np.ndarray:
    """kept / lost / gained / never per token."""
    b, p = np.asarray(base_sayable, bool), np.asarray(post_sayable, bool)
    return np.where(b & p, "kept", np.where(b, "lost", np.where(p, "gained", "never")))


# ---- the summary ---------------------------------------------------------------------------------------------

DRIFT_BINS = ((-math.inf, 0.90, "cos < 0.90"), (0.90, 0.95, "0.90-0.95"), (0.95, 0.99, "0.95-0.99"),
              (0.99, math.inf, "cos >= 0.99"))
COVERAGE_BINS = ((0, 1, "0 (never a target)"), (1, 10, "1-9"), (10, 100, "10-99"), (100, math.inf, "100+"))


def _rate(rows: np.ndarray, label: str, base_ok: np.ndarray, lost: np.ndarray) -> dict[str, Any]:
    """LOST among the tokens of `rows` that BASE could say (only those can be lost)."""
    n = int((rows & base_ok).sum())
    k = int((rows & lost).sum())
    return {"label": label, "tokens": int(rows.sum()), "sayable_base": n, "lost": k,
            "share": k / n if n else None}


def relations(status: np.ndarray, token_ids: np.ndarray, *, drift: pa.Table | None = None,
              coverage: pa.Table | None = None) -> dict[str, list[dict[str, Any]]]:
    """How LOST relates to what else the run knows: the LOST share (of the tokens BASE could say) by lm_head
    cosine, by the SFT data's count of the token as a target, and for rows that collapsed into a group in POST
    against the rest. A section is left out when its table is not in the run folder."""
    base_ok = (status == "kept") | (status == "lost")
    lost = status == "lost"
    ids = np.asarray(token_ids, np.int64)
    out: dict[str, list[dict[str, Any]]] = {}

    def joined(table: pa.Table, column: str) -> np.ndarray:  # the column's value per token of the map (NaN: none)
        tid = table["token_id"].to_numpy().astype(np.int64)
        lut = np.full(int(max(tid.max(initial=-1), ids.max(initial=-1))) + 1, np.nan)
        lut[tid] = table[column].to_numpy(zero_copy_only=False).astype(np.float64)
        return lut[ids]

    if drift is not None and "lm_head_cos" in drift.column_names:
        cos = joined(drift, "lm_head_cos")
        out["drift"] = [_rate((cos >= lo) & (cos < hi), label, base_ok, lost) for lo, hi, label in DRIFT_BINS]
        if "lm_head_group_size_post" in drift.column_names:
            size = joined(drift, "lm_head_group_size_post")
            was = joined(drift, "lm_head_group_size_base") if "lm_head_group_size_base" in drift.column_names \
                else np.zeros_like(size)
            new = (np.nan_to_num(size) > 1) & ~(np.nan_to_num(was) > 1)
            out["collapsed"] = [_rate(new, "collapsed into a group in POST", base_ok, lost),
                                _rate(~new, "the other rows", base_ok, lost)]
    if coverage is not None and "count" in coverage.column_names:
        cnt = np.nan_to_num(joined(coverage, "count"), nan=0.0)
        out["coverage"] = [_rate((cnt >= lo) & (cnt < hi), label, base_ok, lost) for lo, hi, label in COVERAGE_BINS]
    return out


def summarize(table: pa.Table, *, paired: bool, drift: pa.Table | None = None, coverage: pa.Table | None = None,
              top: int = 10, keep: int = 500) -> dict[str, Any]:
    """summary["saymap"] from saymap.parquet: counts and shares of each status overall and per category, the
    LOST tokens (the most confident loss first: the lowest POST probability), the worst `top` per category, and
    the relations to drift, coverage and collapsed rows (`relations`)."""
    ids = table["token_id"].to_numpy()
    cats = np.asarray(table["category"].to_pylist(), dtype=object)
    models = ["base", "post"] if paired else ["post"]
    out: dict[str, Any] = {"models": models, "tokens": int(len(ids)),
                           "sayable": {m: int(np.asarray(table[f"{m}_sayable"]).sum()) for m in models}}
    if not paired:
        out["categories"] = {
            str(c): {"tokens": int((cats == c).sum()),
                     "sayable": int(np.asarray(table["post_sayable"])[cats == c].sum())}
            for c in sorted(set(cats))}
        return out
    status = np.asarray(table["status"].to_pylist(), dtype=object)
    post_p = table["post_p"].to_numpy()
    out["counts"] = {s: int((status == s).sum()) for s in STATUSES}
    cats_out: dict[str, Any] = {}
    worst: dict[str, list[int]] = {}
    for c in sorted(set(cats)):
        sel = cats == c
        counts = {s: int((status[sel] == s).sum()) for s in STATUSES}
        base_ok = counts["kept"] + counts["lost"]
        cats_out[str(c)] = {"tokens": int(sel.sum()), **counts,
                            "lost_share": counts["lost"] / base_ok if base_ok else None}
        lost_here = np.flatnonzero(sel & (status == "lost"))
        if len(lost_here):
            worst[str(c)] = [int(ids[i]) for i in lost_here[np.argsort(post_p[lost_here], kind="stable")][:top]]
    out["categories"] = cats_out
    lost = np.flatnonzero(status == "lost")
    out["lost"] = [int(ids[i]) for i in lost[np.argsort(post_p[lost], kind="stable")][:keep]]
    gained = np.flatnonzero(status == "gained")
    out["gained"] = [int(ids[i]) for i in gained[np.argsort(-post_p[gained], kind="stable")][:keep]]
    base_ok = out["counts"]["kept"] + out["counts"]["lost"]
    out["lost_share"] = out["counts"]["lost"] / base_ok if base_ok else None
    out["worst"] = worst
    out["relations"] = relations(status, ids, drift=drift, coverage=coverage)
    return out


def headline(s: dict[str, Any]) -> list[str]:
    """The map as sentences, for the console and the report."""
    n = s["tokens"]
    if "counts" not in s:
        k = s["sayable"]["post"]
        return [f"{k:,} of {n:,} tokens sayable ({k / max(n, 1):.1%}); {n - k:,} the model cannot say"]
    c = s["counts"]
    share = s.get("lost_share")
    lines = [f"LOST: {c['lost']:,} tokens that BASE could say and POST cannot"
             + (f" ({share:.1%} of BASE's {c['kept'] + c['lost']:,} sayable tokens)" if share is not None else ""),
             f"GAINED: {c['gained']:,}; sayable in both: {c['kept']:,}; in neither: {c['never']:,} (of {n:,} tokens)"]
    worst = sorted(((v["lost_share"], k) for k, v in s["categories"].items()
                    if v.get("lost_share") is not None and v["lost"]), reverse=True)
    if worst:
        lines.append("Most LOST by category: " + ", ".join(
            f"{k} {share:.1%} ({s['categories'][k]['lost']:,})" for share, k in worst[:4]))
    return lines
