"""One recommendation from the whole run folder: which tokens are at risk, which languages need data, and the one
repair recipe vocabdrift stands behind, sized from the same numbers everywhere (`coverage`, `report`, `check`,
`synth --run`, `mix`, `repair`).

Why one function: when `coverage` judged a language against the vocabulary as a whole while `probe` found 81 LOST
English tokens, the advice said "not a problem" beside a failing gate; and each command sized the coverage set its
own way (67 samples, 6,146, 29,741). Here every command reads one `Recommendation`.

The tokens at risk, in order: POST's LOST tokens (sayable in BASE, not in POST), rows that collapsed during
post-training, then the rows that fell below the threshold and are rarely targeted by the SFT data, lowest cosine
first. The recipe covers at most `MAX_TOKENS` of them (the measured dose: bench/recipe_real.py) by healing POST.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .verdict import fisher_greater
from .vocab import LANGUAGES, category_label

if TYPE_CHECKING:
    import pyarrow as pa

# The endorsed recipe: heal POST with a short run on coverage samples of the tokens at risk plus a replay of the
# SFT data, at a low learning rate. Measured on SmolLM2-135M (README, "The remedies on real weights").
MAX_TOKENS = 512  # tokens at risk covered at most (LOST first)
PLACEMENTS = 2  # times each is a generation target
TOKENS_PER_SAMPLE = 8  # tokens per coverage sample (synth's default)
REPLAY = 1.0  # SFT samples replayed per coverage sample
HEAL_LR = 5e-4  # AdamW, constant
# Retraining from BASE instead: the whole-vocabulary coverage set at this share of the samples (measured on the
# quickstart pair: 91% of LOST back, task loss -5%; 20% gave back 78%, the at-risk set added whole cost +3.3%)
RETRAIN_SHARE = 0.05
HEAL_EPOCHS = 1  # passes over the heal set
RARE = 5  # a token targeted fewer times than this by the SFT data is rarely targeted (coverage's floor)
DRIFTED_SHARE = 0.01  # a category is drifted when more than this share of its rows fell below the threshold ...
# ... and more than twice the share of the rest of the vocabulary (not the whole: an English-only SFT moves
# mostly English rows, and judging English against a vocabulary that is mostly English hides it)
DRIFT_RATIO = 2.0
MIN_LOST = 3  # a category with at least this many LOST tokens, at a rate beyond the controls', needs data
MAP_RATIO = 1.5  # ... in a say-ability map: beyond the rest of the vocabulary's rate, and at least 1.5 times it
ALPHA = 0.05


@dataclass(frozen=True)
class CategoryAdvice:
    category: str
    tokens: int
    below: int  # rows below the threshold
    drifted_share: float
    rest_share: float  # the same share over every other category
    rarely_targeted: float | None  # share of its tokens the SFT data targets fewer than RARE times
    probed: int
    lost: int
    lost_p: float | None  # Fisher's exact test: LOST rate in this category against the controls'
    verdict: str  # "needs data", "drifted, targeted", "not at risk"
    why: str


@dataclass(frozen=True)
class Recommendation:
    """What to do about a run folder's drift, with the numbers it rests on."""

    status: str  # "repair" (tokens at risk), "watch" (drift without evidence of loss), "fine"
    at_risk: tuple[int, ...]  # every token at risk, in order (LOST, collapsed, drifted and rare)
    covered: tuple[int, ...]  # the ones the recipe covers (the first MAX_TOKENS)
    lost: int
    control_lost: int | None
    controls: int | None
    categories: tuple[CategoryAdvice, ...]
    recipe: dict[str, Any] = field(default_factory=dict)
    lines: tuple[str, ...] = ()
    mapped_lost: int = 0  # LOST in the say-ability map (the whole vocabulary), when the folder holds one
    mapped: int = 0  # ... of this many tokens BASE could say

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["at_risk_count"] = len(self.at_risk)
        d["at_risk"] = list(self.at_risk[:2000])  # the list is rebuilt from the tables; summary.json keeps the head
        return d


def at_risk(token_ids: np.ndarray, cos: np.ndarray, eligible: np.ndarray, *, threshold: float = 0.95,
            counts: np.ndarray | None = None, rare: int = RARE, lost: Sequence[int] = (),
            collapsed: Sequence[int] = ()) -> list[int]:
    """Tokens at risk, most urgent first: `lost`, then `collapsed`, then eligible rows below `threshold` (NaN
    cosines count as below) targeted fewer than `rare` times (every such row when there are no counts), lowest
    cosine first."""
    ids = np.asarray(token_ids, dtype=np.int64)
    c = np.asarray(cos, dtype=np.float64)
    ok = np.asarray(eligible, dtype=bool)
    low = ok & ~(c >= threshold)  # NaN is below every threshold
    if counts is not None:
        low &= np.asarray(counts)[: len(ids)] < rare
    order = ids[low][np.argsort(np.nan_to_num(c[low], nan=-2.0), kind="stable")]
    out = list(dict.fromkeys([*map(int, lost), *map(int, collapsed), *order.tolist()]))
    allowed = set(ids[ok].tolist())
    return [t for t in out if t in allowed]


def synth_samples(categories: Sequence[str], *, placements: int = PLACEMENTS,
                  tokens_per_sample: int = TOKENS_PER_SAMPLE) -> int:
    """How many samples `synth --run RUN` writes to place tokens of these categories `placements` times each."""
    from .synth import estimate_samples

    return estimate_samples(categories, [placements] * len(categories), tokens_per_sample=tokens_per_sample)


def heal_plan(synth: int, n_tokens: int, *, replay: float = REPLAY, batch_size: int = 4, epochs: int = HEAL_EPOCHS,
              lr: float = HEAL_LR, placements: int = PLACEMENTS) -> dict[str, Any]:
    """The heal run's size: `synth` coverage samples for `n_tokens` tokens, replayed SFT samples, steps."""
    rep = round(synth * replay)
    steps = max(1, math.ceil((synth + rep) * epochs / max(1, batch_size)))
    return {"method": "heal", "tokens": n_tokens, "placements": placements, "synth_samples": synth,
            "replay_samples": rep, "batch_size": batch_size, "steps": steps, "lr": lr, "epochs": epochs}


def recommend(token_ids: np.ndarray, categories: np.ndarray, cos: np.ndarray, eligible: np.ndarray, *,
              threshold: float = 0.95, counts: np.ndarray | None = None, sft_samples: int | None = None,
              probed: Sequence[int] = (), lost: Sequence[int] = (), controls: Sequence[int] = (),
              control_lost: Sequence[int] = (), collapsed: Sequence[int] = (), max_tokens: int = MAX_TOKENS,
              batch_size: int = 4, mapped_lost: Sequence[int] = (), mapped: int = 0,
              mapped_categories: dict[str, tuple[int, int]] | None = None) -> Recommendation:
    """The one recommendation for a run folder (pure: arrays in).

    Args:
        token_ids, categories, cos, eligible: the vocabulary (ids, category keys), each row's lm_head cosine
            to BASE, and which rows count (reachable and not special).
        counts: generation-target counts in the SFT data (coverage), when known; sft_samples: its size.
        probed, lost, controls, control_lost: the probe's asked tokens, its LOST ones, its control tokens and the
            controls it lost (when the folder holds a probe with BASE).
        collapsed: rows that collapsed during post-training (diff's collapse change).
        mapped_lost, mapped: the say-ability map's LOST tokens (the most confident first) and how many tokens BASE
            could say there; they join the tokens at risk after the probe's LOST ones.
        mapped_categories: per category, the map's (LOST, could say in BASE): a language whose LOST share is
            beyond the rest of the vocabulary's (Fisher's exact test, the rest as its control) and at least
            MAP_RATIO times it needs data; a loss across the board is no one language's.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    cats = np.asarray(categories).astype(str)
    c = np.asarray(cos, dtype=np.float64)
    ok = np.asarray(eligible, dtype=bool)
    below = ok & ~(c >= threshold)
    cnt = None if counts is None else np.asarray(counts)[: len(ids)]
    risk = at_risk(ids, c, ok, threshold=threshold, counts=cnt, lost=[*lost, *mapped_lost], collapsed=collapsed)
    cov = risk[:max_tokens]
    pos = {int(t): i for i, t in enumerate(ids.tolist())}
    probed_cat = [cats[pos[t]] for t in probed if t in pos]
    lost_cat = [cats[pos[t]] for t in lost if t in pos]
    n_ctrl, n_ctrl_lost = len(controls), len(set(control_lost))
    per_cat = list((mapped_categories or {}).values())
    map_total = (sum(k for k, _ in per_cat), sum(n for _, n in per_cat))
    advice = []
    for cat in LANGUAGES:
        m = ok & (cats == cat)
        n = int(m.sum())
        if not n:
            continue
        nb = int((below & m).sum())
        rest = ok & (cats != cat)
        share = nb / n
        rest_share = float((below & rest).sum()) / max(1, int(rest.sum()))
        rare_share = None if cnt is None else float((cnt[m] < RARE).mean())
        k_probed, k_lost = probed_cat.count(cat), lost_cat.count(cat)
        p = fisher_greater(k_lost, k_probed, n_ctrl_lost, n_ctrl) if probed and controls else None
        drifted = share > DRIFTED_SHARE and share > DRIFT_RATIO * rest_share
        loses = k_lost >= MIN_LOST and (p is None or p < ALPHA)
        rare = rare_share is None or rare_share >= 0.5
        mk, mn = (mapped_categories or {}).get(cat, (0, 0))
        rk, rn = map_total[0] - mk, map_total[1] - mn
        mp = fisher_greater(mk, mn, rk, rn) if mn and rn else None
        map_loses = (mk >= MIN_LOST and mp is not None and mp < ALPHA  # significant, and large: 53% against 49%
                     and mk / mn >= MAP_RATIO * (rk / rn))                # over 45K tokens is no one language's

        if loses:
            verdict = "needs data"
            why = (f"{k_lost} of {k_probed} probed tokens LOST"
                   + (f" against {n_ctrl_lost} of {n_ctrl} controls (p={p:.2g})" if p is not None else ""))
        elif map_loses:
            verdict = "needs data"
            why = (f"the say-ability map: {mk:,} of the {mn:,} tokens BASE could say LOST, against {rk:,} of "
                   f"{rn:,} elsewhere (p={mp:.2g})")
        elif drifted and rare:
            verdict = "needs data"
            why = f"{share:.1%} of its rows below {threshold:g}, {rest_share:.1%} elsewhere, rarely targeted"
        elif drifted:
            verdict = "drifted, targeted"
            why = f"{share:.1%} of its rows below {threshold:g} ({rest_share:.1%} elsewhere) though targeted"
        else:
            verdict = "not at risk"
            why = f"{share:.1%} of its rows below {threshold:g} ({rest_share:.1%} elsewhere)"
        advice.append(CategoryAdvice(cat, n, nb, round(share, 4), round(rest_share, 4),
                                     None if rare_share is None else round(rare_share, 4), k_probed, k_lost, p,
                                     verdict, why))
    status = "repair" if (lost or mapped_lost or collapsed or any(a.verdict == "needs data" for a in advice)) and risk \
        else "watch" if int(below.sum()) else "fine"
    recipe = heal_plan(synth_samples([cats[pos[t]] for t in cov]), len(cov), batch_size=batch_size) if cov else {}
    if recipe and sft_samples:
        recipe["sft_samples"] = sft_samples
        recipe["retrain_share"] = round(recipe["synth_samples"] / (recipe["synth_samples"] + sft_samples), 4)
    rec = Recommendation(status, tuple(risk), tuple(cov), len(set(lost)), n_ctrl_lost if controls else None,
                         n_ctrl if controls else None, tuple(advice), recipe,
                         mapped_lost=map_total[0] if mapped_categories else len(set(mapped_lost)), mapped=mapped)
    return Recommendation(**{**asdict_shallow(rec), "lines": tuple(recommendation_lines(rec))})


def asdict_shallow(x: Any) -> dict[str, Any]:
    return {f: getattr(x, f) for f in x.__dataclass_fields__}


def recommendation_lines(r: Recommendation) -> list[str]:
    """The recommendation as sentences: the same words in coverage's console, the report and check."""
    lines = []
    need = [category_label(a.category) for a in r.categories if a.verdict == "needs data"]
    fine = [category_label(a.category) for a in r.categories if a.verdict == "not at risk"]
    if r.lost:
        ctrl = (f", against {r.control_lost} of {r.controls} undrifted control tokens" if r.controls else "")
        lines.append(f"POST lost {r.lost} probed tokens (sayable in BASE, not in POST){ctrl}.")
    if r.mapped_lost:
        lines.append(f"The say-ability map: POST lost {r.mapped_lost:,} of the {r.mapped:,} tokens BASE could say "
                     f"({r.mapped_lost / max(r.mapped, 1):.1%}); they are at risk too, the most confident loss first.")
    if need:
        lines.append("Needs coverage data: " + "; ".join(
            f"{category_label(a.category)} ({a.why})" for a in r.categories if a.verdict == "needs data") + ".")
    drifted_ok = [a for a in r.categories if a.verdict == "drifted, targeted"]
    if drifted_ok:
        lines.append("Drifted though targeted (watch, probe them): "
                     + ", ".join(category_label(a.category) for a in drifted_ok) + ".")
    if fine:
        lines.append(f"Not at risk: {', '.join(fine)}.")
    if r.status == "repair" and r.recipe:
        k = r.recipe
        more = f" (the first {len(r.covered):,} of {len(r.at_risk):,} at risk)" if len(r.at_risk) > len(r.covered) \
            else ""
        lines.append(
            f"Repair: heal POST on the {len(r.covered):,} tokens at risk{more}: `vocabdrift repair BASE SFT_DATA "
            f"--heal POST --run RUN -o FIXED` ({k['synth_samples']:,} coverage samples, {k['replay_samples']:,} "
            f"replayed SFT samples, {k['steps']:,} steps at lr {k['lr']:g}); then `vocabdrift evaluate FIXED/model "
            "--base BASE --post POST --run RUN --heldout HELDOUT`.")
        lines.append(f"Retraining from BASE instead: `vocabdrift repair BASE SFT_DATA -o FIXED` (the whole-vocabulary "
                     f"coverage set at {RETRAIN_SHARE:.0%} of the samples; with your own trainer: `vocabdrift synth "
                     f"BASE -o cov.jsonl`, then `vocabdrift mix SFT_DATA cov.jsonl -o MIXED --ratio {RETRAIN_SHARE:g}`)"
                     ", and judge it with `vocabdrift evaluate`.")
    elif r.status == "watch":
        lines.append("Rows drifted, but no token is shown lost: probe them (`vocabdrift probe POST --base BASE "
                     "--run RUN`) before adding data.")
    else:
        lines.append("Nothing to repair.")
    return lines


# ---- from a run folder's tables -------------------------------------------------------------------------------

def probe_lost(probe: pa.Table | None) -> tuple[list[int], list[int], list[int], list[int]]:
    """(asked, LOST, controls, controls LOST) of a probe with BASE (`analyses.verdict.post_lost`: templates that
    failed in POST left out); empty lists without one."""
    if probe is None or not {"base", "post"} <= set(probe["model"].to_pylist()):
        return [], [], [], []
    from .verdict import post_lost

    asked, lost, controls, control_lost, _, _ = post_lost(probe)
    return asked, lost, controls, control_lost


def from_tables(vocab: pa.Table, drift: pa.Table, summary: dict[str, Any], *, coverage: pa.Table | None = None,
                probe: pa.Table | None = None, saymap: pa.Table | None = None, threshold: float | None = None,
                max_tokens: int = MAX_TOKENS, batch_size: int = 4) -> Recommendation:
    """`recommend` over a run folder's tables: vocab.parquet, drift.parquet and summary.json (diff's threshold and
    collapsed rows, coverage's sample count), with coverage.parquet, probe.parquet and saymap.parquet (with BASE:
    its LOST tokens, the most confident loss first, and its counts per category) when the folder has them."""
    th = float(threshold if threshold is not None else summary.get("threshold", 0.95))
    ids = np.asarray(vocab["token_id"], dtype=np.int64)

    def by_vocab_row(table: pa.Table, column: str, fill: float) -> np.ndarray:
        """`column` of `table` (keyed by token_id) aligned to the vocabulary's rows; `fill` where absent."""
        out = np.full(len(ids), fill, dtype=np.float64)
        where = np.full(int(ids.max(initial=-1)) + 1, -1, dtype=np.int64)
        where[ids] = np.arange(len(ids))
        t = np.asarray(table["token_id"], dtype=np.int64)
        keep = (t >= 0) & (t < len(where))
        rows = where[t[keep]]
        vals = table[column].to_numpy(zero_copy_only=False).astype(np.float64)[keep]  # nulls become NaN
        out[rows[rows >= 0]] = vals[rows >= 0]
        return out

    cos = by_vocab_row(drift, "lm_head_cos", np.nan)
    special = np.asarray(vocab["is_special"].to_pylist(), dtype=bool)
    reach = np.asarray(vocab["reachable"].to_pylist(), dtype=bool) if "reachable" in vocab.column_names \
        else np.ones(len(ids), bool)
    counts, samples = None, None
    if coverage is not None:
        counts = by_vocab_row(coverage, "count", 0).astype(np.int64)
        samples = (summary.get("coverage") or {}).get("samples")
    asked, lost, controls, control_lost = probe_lost(probe)
    collapsed = [int(t) for t in ((summary.get("collapse") or {}).get("new_ids") or [])]
    mapped_lost: list[int] = []
    mapped_categories: dict[str, tuple[int, int]] | None = None
    if saymap is not None and "status" in saymap.column_names:
        status = np.asarray(saymap["status"].to_pylist(), dtype=object)
        mids = np.asarray(saymap["token_id"], dtype=np.int64)
        mcat = np.asarray(saymap["category"].to_pylist(), dtype=object)
        gone = np.flatnonzero(status == "lost")
        order = np.argsort(saymap["post_p"].to_numpy(zero_copy_only=False)[gone], kind="stable")
        mapped_lost = mids[gone[order]].tolist()
        could = (status == "kept") | (status == "lost")
        mapped_categories = {str(c): (int(((mcat == c) & (status == "lost")).sum()), int(((mcat == c) & could).sum()))
                             for c in sorted(set(mcat.tolist()))}
    return recommend(ids, vocab["category"].cast("string").to_numpy(zero_copy_only=False), cos, reach & ~special,
                     threshold=th, counts=counts, sft_samples=samples, probed=asked, lost=lost, controls=controls,
                     control_lost=control_lost, collapsed=collapsed, max_tokens=max_tokens, batch_size=batch_size,
                     mapped_lost=mapped_lost, mapped=sum(n for _, n in (mapped_categories or {}).values()),
                     mapped_categories=mapped_categories)
