"""The before/after verdict on a repair: can the repaired model say again what POST lost, without costing the task?

An lm_head cosine is not the verdict (the anchor and the gate keep every row near 1 while names fall to rank
5,000): say-ability of the tokens and the task loss are. This module judges them from probe rows of BASE, POST and
each candidate (the same tokens, the same templates) and the held-out losses, as pure functions.

Three rules keep the verdict honest:

- **Templates that work.** A prompt family counts only where BASE says most undrifted control tokens on it; a
  family on which a model lost the controls *and* the probed tokens alike (both at the median below 1% of BASE's
  probability) is a *template failure* of that model, reported as such and left out of its say-ability, never
  counted as lost tokens.
- **Controls.** LOST is counted for the control tokens too, and a candidate's recovery is judged beyond what the
  controls did: a model that learned to repeat words in general raises both.
- **Statistics.** McNemar's exact test of the probed tokens' say-ability, POST against the candidate (did more
  come back than were lost?), the same for the controls (did they change?), and a one-sided Mann-Whitney test of
  the change in log-probability, probed against controls ("beyond the controls").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

WORKS_ON_BASE = 0.5  # a template works when BASE keeps at least this share of the controls in its nucleus
FAIL_RATIO = 0.01  # a template failed in a model when its median probability is below 1% of BASE's, controls too
MIN_BACK = 0.9  # REPAIRED: at least 90% of POST's LOST tokens sayable again ...
MAX_LOSS_RISE = 0.02  # ... with held-out loss at most 2% above POST's ...
ALPHA = 0.05  # ... and the controls not significantly worse than POST's (McNemar, two-sided)

VERDICTS = ("REPAIRED", "PARTIAL", "NOT REPAIRED", "COSTS THE TASK", "NOTHING TO REPAIR")


@dataclass(frozen=True)
class TemplateHealth:
    """One prompt family in one model: BASE's control share, and whether the model lost it as a whole."""

    template: str
    model: str
    base_control_share: float  # controls BASE keeps in its nucleus on this template
    works_on_base: bool
    control_ratio: float | None  # median p(model) / p(BASE) over the controls
    probed_ratio: float | None  # the same over the probed tokens
    failed: bool


@dataclass(frozen=True)
class Sayability:
    """A model's say-ability of one group of tokens, over the templates that work for it."""

    n: int
    sayable: int
    top1: int
    lost: int  # sayable in BASE, not in this model
    median_p: float | None


@dataclass(frozen=True)
class Stat:
    """A test: its statistic's counts and its p-value."""

    name: str
    p: float | None
    detail: str


@dataclass(frozen=True)
class ModelVerdict:
    """One model of the evaluation: say-ability, loss, drift and (for a candidate) the verdict in words."""

    name: str
    role: str  # "base", "post" or "candidate"
    templates: tuple[str, ...]  # the templates its say-ability is read over
    failed_templates: tuple[str, ...]
    probed: Sayability
    control: Sayability
    lost_back: int | None = None  # POST's LOST tokens sayable again (candidates)
    lost_total: int | None = None
    newly_lost: int | None = None  # probed tokens sayable in POST, not here
    control_newly_lost: int | None = None
    heldout_loss: float | None = None
    loss_vs_post: float | None = None  # relative change of the held-out loss against POST's
    below: int | None = None  # lm_head rows below the threshold against BASE (reachable, non-special)
    min_cos: float | None = None
    confusion_hits: int | None = None  # sampled answers to the confusion prompts with a foreign script, of ...
    confusion_n: int | None = None
    stats: tuple[Stat, ...] = ()
    verdict: str | None = None
    reasons: tuple[str, ...] = ()
    sentence: str = ""


@dataclass(frozen=True)
class Evaluation:
    """evaluate's result: every model's row, POST's LOST tokens, the template health, the thresholds used."""

    models: tuple[ModelVerdict, ...]
    lost: tuple[int, ...]  # POST's LOST probed tokens (sayable in BASE, not in POST)
    control_lost: tuple[int, ...]
    probed: int
    controls: int
    templates: tuple[TemplateHealth, ...]
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def candidates(self) -> tuple[ModelVerdict, ...]:
        return tuple(m for m in self.models if m.role == "candidate")

    @property
    def passed(self) -> bool:
        """Every candidate repaired (or POST lost nothing): `check`'s exit code 0."""
        return all(m.verdict in ("REPAIRED", "NOTHING TO REPAIR") for m in self.candidates)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Evaluation:
        """The result as summary.json holds it (validated: a damaged file is one clear error upstream)."""
        def mv(m: dict[str, Any]) -> ModelVerdict:
            return ModelVerdict(**{**m, "templates": tuple(m["templates"]),
                                   "failed_templates": tuple(m["failed_templates"]),
                                   "probed": Sayability(**m["probed"]), "control": Sayability(**m["control"]),
                                   "stats": tuple(Stat(**s) for s in m["stats"]), "reasons": tuple(m["reasons"])})

        return cls(models=tuple(mv(m) for m in d["models"]), lost=tuple(d["lost"]),
                   control_lost=tuple(d["control_lost"]), probed=int(d["probed"]), controls=int(d["controls"]),
                   templates=tuple(TemplateHealth(**t) for t in d["templates"]),
                   thresholds=dict(d.get("thresholds") or {}))


# ---- the pieces -----------------------------------------------------------------------------------------------

Rows = dict[tuple[str, str, int], dict[str, Any]]  # (model, template, token) -> probe row


def index_rows(table: pa.Table) -> Rows:
    """Probe rows by (model, template, token)."""
    cols = {c: table[c].to_pylist() for c in ("model", "template", "token_id", "p_target", "rank", "sayable")}
    return {(m, t, int(i)): {"p": float(p), "rank": int(r), "sayable": bool(s)}
            for m, t, i, p, r, s in zip(*cols.values(), strict=True)}


def _median_ratio(rows: Rows, model: str, template: str, ids: Sequence[int], base: str) -> float | None:
    logs = [math.log(max(rows[(model, template, t)]["p"], 1e-30)) - math.log(max(rows[(base, template, t)]["p"],
                                                                                1e-30))
            for t in ids if (model, template, t) in rows and (base, template, t) in rows]
    return math.exp(statistics.median(logs)) if logs else None


def template_health(rows: Rows, models: Sequence[str], templates: Sequence[str], probed: Sequence[int],
                    controls: Sequence[int], *, base: str = "base") -> list[TemplateHealth]:
    """Each template in each model: does it work on BASE, and did the model lose it as a whole?

    Without controls, BASE's share is read over the probed tokens (a weaker reading: they drifted)."""
    ref = list(controls) or list(probed)
    out = []
    for tmpl in templates:
        kept = [rows[(base, tmpl, t)]["sayable"] for t in ref if (base, tmpl, t) in rows]
        share = sum(kept) / len(kept) if kept else 0.0
        works = share >= WORKS_ON_BASE
        for m in models:
            cr = _median_ratio(rows, m, tmpl, controls, base) if m != base else 1.0
            pr = _median_ratio(rows, m, tmpl, probed, base) if m != base else 1.0
            failed = bool(m != base and works and cr is not None and pr is not None and cr <= FAIL_RATIO
                          and pr <= FAIL_RATIO)
            out.append(TemplateHealth(tmpl, m, round(share, 4), works, cr, pr, failed))
    return out


def usable_templates(health: Sequence[TemplateHealth], model: str, *, also_failed_in: Sequence[str] = ()
                     ) -> tuple[str, ...]:
    """The templates a model's say-ability is read over: those that work on BASE and did not fail in this model
    (nor in `also_failed_in`: POST's failures are left out of LOST, for every model alike)."""
    failed = {h.template for h in health if h.failed and h.model in (model, *also_failed_in)}
    return tuple(dict.fromkeys(h.template for h in health if h.works_on_base and h.template not in failed))


def sayable_ids(rows: Rows, model: str, templates: Sequence[str], ids: Sequence[int]) -> set[int]:
    """The tokens some usable template gets kept by top-p sampling."""
    return {t for t in ids if any(rows.get((model, tm, t), {}).get("sayable") for tm in templates)}


def _best(rows: Rows, model: str, templates: Sequence[str], t: int) -> dict[str, Any] | None:
    got = [rows[(model, tm, t)] for tm in templates if (model, tm, t) in rows]
    return max(got, key=lambda r: r["p"]) if got else None


def sayability(rows: Rows, model: str, templates: Sequence[str], ids: Sequence[int], base_sayable: set[int]
               ) -> Sayability:
    best = [b for b in (_best(rows, model, templates, t) for t in ids) if b is not None]
    say = sayable_ids(rows, model, templates, ids)
    return Sayability(n=len(ids), sayable=len(say), top1=sum(b["rank"] == 1 for b in best),
                      lost=len(base_sayable - say), median_p=statistics.median(b["p"] for b in best) if best else None)


def mcnemar(gained: int, lost: int, *, alternative: str = "two-sided") -> float | None:
    """McNemar's exact test on the discordant pairs (binomial at 1/2); None when there are none."""
    if gained + lost == 0:
        return None
    from scipy.stats import binomtest

    return float(binomtest(gained, gained + lost, 0.5, alternative=alternative).pvalue)


def fisher_greater(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float | None:
    """Fisher's exact test, one-sided: is A's rate above B's? None when a side is empty.

    The hypergeometric upper tail in log space with `scipy.special` (equal to `scipy.stats.fisher_exact(...,
    alternative="greater")`, tested): importing scipy.stats costs a command that reads a run folder most of its
    second."""
    if n_a == 0 or n_b == 0:
        return None
    from scipy.special import gammaln, logsumexp

    def log_choose(n: float, k: np.ndarray) -> np.ndarray:
        return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)

    total, hits = n_a + n_b, hits_a + hits_b  # n_a of `total` drawn, `hits` of them marked: P(X >= hits_a)
    x = np.arange(hits_a, min(hits, n_a) + 1, dtype=np.float64)
    if len(x) == 0:
        return 0.0
    logp = log_choose(hits, x) + log_choose(total - hits, n_a - x) - log_choose(total, np.float64(n_a))
    return float(min(1.0, np.exp(logsumexp(logp))))


def beyond_controls(delta_probed: Sequence[float], delta_control: Sequence[float]) -> float | None:
    """One-sided Mann-Whitney U: did the probed tokens' log-probability rise more than the controls'?"""
    if len(delta_probed) < 2 or len(delta_control) < 2:
        return None
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(delta_probed, delta_control, alternative="greater").pvalue)


def _delta(rows: Rows, model: str, ref: str, tm_model: Sequence[str], tm_ref: Sequence[str], ids: Sequence[int]
           ) -> list[float]:
    out = []
    for t in ids:
        a, b = _best(rows, model, tm_model, t), _best(rows, ref, tm_ref, t)
        if a is not None and b is not None:
            out.append(math.log(max(a["p"], 1e-30)) - math.log(max(b["p"], 1e-30)))
    return out


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def post_lost(table: pa.Table, *, base: str = "base", post: str = "post"
              ) -> tuple[list[int], list[int], list[int], list[int], list[str], list[str]]:
    """A probe of BASE and POST read with the template rule: (asked, LOST, controls, controls LOST, templates that
    failed in POST, templates read). LOST is over the templates that work on BASE and did not fail in POST, as
    `evaluate` reads it, so `probe`, `check`, the recommendation and `evaluate` count the same tokens."""
    import pyarrow.compute as pc

    ctrl = table["control"] if "control" in table.column_names else None
    controls = sorted(set(table.filter(ctrl)["token_id"].to_pylist())) if ctrl is not None else []
    asked = sorted(set((table.filter(pc.invert(ctrl)) if ctrl is not None else table)["token_id"].to_pylist()))
    rows = index_rows(table)
    templates = sorted({k[1] for k in rows})
    health = template_health(rows, [base, post], templates, asked, controls, base=base)
    tm = usable_templates(health, post)
    failed = sorted(h.template for h in health if h.model == post and h.failed)

    def lost_of(ids: list[int]) -> list[int]:
        out = sayable_ids(rows, base, tm, ids) - sayable_ids(rows, post, tm, ids)
        return sorted(out, key=lambda t: ((_best(rows, post, tm, t) or {"p": 0.0})["p"], t))

    return asked, lost_of(asked), controls, lost_of(controls), failed, list(tm)


# ---- the verdict ----------------------------------------------------------------------------------------------

def evaluate_rows(table: pa.Table, *, probed: Sequence[int], controls: Sequence[int], candidates: Sequence[str],
                  base: str = "base", post: str = "post", losses: dict[str, float] | None = None,
                  drift: dict[str, dict[str, Any]] | None = None,
                  confusion: dict[str, tuple[int, int]] | None = None, min_back: float = MIN_BACK,
                  max_loss_rise: float = MAX_LOSS_RISE, alpha: float = ALPHA) -> Evaluation:
    """The verdict for each candidate from probe rows of BASE, POST and the candidates (same tokens and templates).

    Args:
        table: probe.parquet-shaped rows (token_id, model, template, p_target, rank, sayable).
        probed / controls: the asked tokens (most drifted, POST's LOST...) and the undrifted control tokens.
        losses: held-out loss per model name (BASE, POST, candidates), when the user gave held-out chats.
        drift: per model name {"below": rows below the threshold, "min_cos": ...} against BASE.
        confusion: per model name (answers with a foreign script, answers) to the language-confusion prompts; a
            candidate whose rate rose significantly above POST's (Fisher's exact test) is not REPAIRED.
    """
    rows = index_rows(table)
    models = [base, post, *candidates]
    templates = sorted({k[1] for k in rows})
    health = template_health(rows, models, templates, probed, controls, base=base)
    tm = {m: usable_templates(health, m, also_failed_in=(post,) if m in (base, post) else (post, m))
          for m in models}
    # LOST is read over the templates that work on BASE and did not fail in POST, in both models alike
    base_say = sayable_ids(rows, base, tm[post], probed)
    base_say_c = sayable_ids(rows, base, tm[post], controls)
    post_say = sayable_ids(rows, post, tm[post], probed)
    post_say_c = sayable_ids(rows, post, tm[post], controls)
    lost = sorted(base_say - post_say, key=lambda t: (_best(rows, post, tm[post], t) or {"p": 0})["p"])
    lost_c = sorted(base_say_c - post_say_c)
    losses, drift, confusion = losses or {}, drift or {}, confusion or {}
    out = []
    for m in models:
        role = "base" if m == base else "post" if m == post else "candidate"
        t_m = tm[post] if role != "candidate" else tm[m]
        failed = tuple(sorted(h.template for h in health if h.model == m and h.failed))
        row: dict[str, Any] = {
            "name": m, "role": role, "templates": t_m, "failed_templates": failed,
            "probed": sayability(rows, m, t_m, probed, sayable_ids(rows, base, t_m, probed)),
            "control": sayability(rows, m, t_m, controls, sayable_ids(rows, base, t_m, controls)),
            "heldout_loss": losses.get(m),
            "loss_vs_post": (losses[m] / losses[post] - 1.0) if m in losses and losses.get(post) else None,
            "below": (drift.get(m) or {}).get("below"), "min_cos": (drift.get(m) or {}).get("min_cos"),
            "confusion_hits": confusion[m][0] if m in confusion else None,
            "confusion_n": confusion[m][1] if m in confusion else None}
        if role == "candidate":
            say = sayable_ids(rows, m, t_m, probed)
            say_c = sayable_ids(rows, m, t_m, controls)
            back = len(set(lost) & say)
            newly = len(post_say - say)
            gained = len(say - post_say)
            c_gained, c_newly = len(say_c - post_say_c), len(post_say_c - say_c)
            stats = (
                Stat("mcnemar_probed", mcnemar(gained, newly, alternative="greater"),
                     f"probed tokens sayable again {gained}, newly unsayable {newly} (POST -> {m})"),
                Stat("mcnemar_control", mcnemar(c_gained, c_newly),
                     f"control tokens sayable again {c_gained}, newly unsayable {c_newly}"),
                Stat("beyond_controls", beyond_controls(_delta(rows, m, post, t_m, tm[post], lost or probed),
                                                        _delta(rows, m, post, t_m, tm[post], controls)),
                     "log-probability change against POST, " + ("LOST" if lost else "probed")
                     + " tokens above the controls' (one-sided Mann-Whitney)"),
            )
            if m in confusion and post in confusion:
                stats += (Stat("confusion", fisher_greater(*confusion[m], *confusion[post]),
                               f"answers with a foreign script {confusion[m][0]}/{confusion[m][1]} against POST's "
                               f"{confusion[post][0]}/{confusion[post][1]} (one-sided Fisher)"),)
            row.update(lost_back=back, lost_total=len(lost), newly_lost=newly, control_newly_lost=c_newly,
                       stats=stats)
            row.update(_judge(m, row, failed, min_back=min_back, max_loss_rise=max_loss_rise, alpha=alpha,
                              c_gained=c_gained))
        out.append(ModelVerdict(**row))
    return Evaluation(models=tuple(out), lost=tuple(lost), control_lost=tuple(lost_c), probed=len(probed),
                      controls=len(controls), templates=tuple(health),
                      thresholds={"min_back": min_back, "max_loss_rise": max_loss_rise, "alpha": alpha,
                                  "works_on_base": WORKS_ON_BASE, "fail_ratio": FAIL_RATIO})


def _judge(name: str, row: dict[str, Any], failed: tuple[str, ...], *, min_back: float, max_loss_rise: float,
           alpha: float, c_gained: int) -> dict[str, Any]:
    """The verdict word, the reasons and one sentence."""
    back, total, c_new = row["lost_back"], row["lost_total"], row["control_newly_lost"]
    st = {s.name: s for s in row["stats"]}
    p_ctrl, p_beyond = st["mcnemar_control"].p, st["beyond_controls"].p
    loss = row["loss_vs_post"]
    controls_worse = c_new > c_gained and p_ctrl is not None and p_ctrl < alpha
    p_conf = st["confusion"].p if "confusion" in st else None
    confused = p_conf is not None and p_conf < alpha
    controls = (f"controls: {c_new} newly unsayable, p={p_ctrl:.2g}" if controls_worse
                else "controls unchanged" if c_new == 0 and c_gained == 0
                else f"controls {c_gained} back, {c_new} lost" + (f", p={p_ctrl:.2g}" if p_ctrl is not None else ""))
    beyond = f"beyond controls p={p_beyond:.2g}" if p_beyond is not None else None
    task = f"task loss {_pct(loss)} vs POST" if loss is not None else "no held-out loss (pass --heldout)"
    reasons: list[str] = []
    if total == 0:
        verdict = "NOTHING TO REPAIR"
        head = "POST lost no probed token"
    else:
        share = back / total
        head = f"{back} of {total} LOST tokens sayable again ({share:.0%})"
        if share < min_back:
            reasons.append(f"fewer than {min_back:.0%} of the LOST tokens came back")
        if controls_worse:
            reasons.append("the controls got worse")
        if loss is not None and loss > max_loss_rise:
            reasons.append(f"held-out loss rose {_pct(loss)} against POST (limit {_pct(max_loss_rise)})")
        if confused:
            reasons.append(f"language confusion rose: {row['confusion_hits']}/{row['confusion_n']} answers with a "
                           f"foreign script (p={p_conf:.2g} against POST)")
        if failed:
            reasons.append(f"template failure: {', '.join(failed)} (every token, controls included, collapsed)")
        tokens_ok = share >= min_back and not controls_worse
        if tokens_ok and not (loss is not None and loss > max_loss_rise) and not confused:
            verdict = "REPAIRED"
        elif tokens_ok:
            verdict = "COSTS THE TASK"
        else:
            verdict = "PARTIAL" if back > 0 else "NOT REPAIRED"
    bits = [x for x in (controls, beyond) if x]
    sentence = f"{verdict}: {head} ({'; '.join(bits)}), {task}"
    if reasons and verdict != "REPAIRED":
        sentence += " — " + "; ".join(reasons)
    elif failed:
        sentence += f" (template failure: {', '.join(failed)})"
    return {"verdict": verdict, "reasons": tuple(reasons), "sentence": sentence}
