"""The before/after verdict (`analyses.verdict`) on probe rows made by hand: the template-failure rule, LOST for
the controls, the statistics against independent computations, and the verdict words."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from vocabdrift.analyses import verdict as V

PROBED = list(range(1, 21))  # 20 probed tokens
CONTROLS = list(range(100, 120))  # 20 undrifted controls


def _rows(spec: dict[tuple[str, str], dict[int, float]]) -> pa.Table:
    """Probe rows from {(model, template): {token: p}}; sayable when p >= 0.05 (as a nucleus would keep it)."""
    cols: dict[str, list] = {"token_id": [], "model": [], "template": [], "p_target": [], "rank": [], "sayable": []}
    for (m, t), ps in spec.items():
        for tok, p in ps.items():
            cols["token_id"].append(tok)
            cols["model"].append(m)
            cols["template"].append(t)
            cols["p_target"].append(p)
            cols["rank"].append(1 if p >= 0.3 else 5)
            cols["sayable"].append(p >= 0.05)
    return pa.table(cols)


def _scene(back: int = 10, loss: float | None = None, controls_lost_in_cand: int = 0) -> pa.Table:
    """BASE says everything on A and B. POST: template B collapsed for every token (controls too); on A, tokens
    1-10 are LOST (p 1e-4) and the rest kept. The candidate gives `back` of the 10 back on A, keeps B collapsed,
    and loses `controls_lost_in_cand` controls."""
    ids = PROBED + CONTROLS
    spec: dict[tuple[str, str], dict[int, float]] = {}
    for t in ("A", "B"):
        spec[("base", t)] = dict.fromkeys(ids, 0.5)
        spec[("post", t)] = {i: (1e-4 if (t == "B" or i <= 10) else 0.4) for i in ids}
        spec[("fix", t)] = {i: 1e-4 if t == "B" else (0.4 if i > 10 or i <= back else 1e-4) for i in ids}
    for c in CONTROLS[:controls_lost_in_cand]:
        spec[("fix", "A")][c] = 1e-4
    return _rows(spec)


def test_a_template_that_lost_every_token_is_a_template_failure_not_lost_tokens() -> None:
    ev = V.evaluate_rows(_scene(), probed=PROBED, controls=CONTROLS, candidates=["fix"])
    failed = {(h.model, h.template) for h in ev.templates if h.failed}
    assert failed == {("post", "B"), ("fix", "B")}
    # read over template B too, every token would be LOST in POST; the rule leaves B out: only 1-10 are LOST
    assert sorted(ev.lost) == list(range(1, 11))
    assert ev.control_lost == ()
    post = next(m for m in ev.models if m.role == "post")
    assert post.templates == ("A",) and post.failed_templates == ("B",)
    fix = ev.candidates[0]
    assert fix.lost_back == 10 and fix.verdict == "REPAIRED" and "template failure: B" in fix.sentence


def test_without_the_rule_the_collapsed_template_would_count() -> None:
    """The same rows with template A removed: B alone is a failure in POST, so no template is left to judge."""
    t = _scene()
    t = t.filter(pa.compute.equal(t["template"], "B"))
    ev = V.evaluate_rows(t, probed=PROBED, controls=CONTROLS, candidates=["fix"])
    assert ev.lost == () and ev.candidates[0].verdict == "NOTHING TO REPAIR"


@pytest.mark.parametrize(("back", "loss", "controls_lost", "word"), [
    (10, 2.00, 0, "REPAIRED"),
    (9, 2.03, 0, "REPAIRED"),  # 90% back, +1.5% loss
    (10, 2.10, 0, "COSTS THE TASK"),  # +5% loss
    (5, 2.00, 0, "PARTIAL"),
    (0, 2.00, 0, "NOT REPAIRED"),
    (10, 2.00, 12, "PARTIAL"),  # the controls got significantly worse
])
def test_verdict_words(back: int, loss: float, controls_lost: int, word: str) -> None:
    ev = V.evaluate_rows(_scene(back, controls_lost_in_cand=controls_lost), probed=PROBED, controls=CONTROLS,
                         candidates=["fix"], losses={"base": 3.0, "post": 2.0, "fix": loss})
    c = ev.candidates[0]
    assert c.verdict == word, c.sentence
    assert c.lost_back == back and c.lost_total == 10
    assert c.loss_vs_post == pytest.approx(loss / 2.0 - 1)
    assert ev.passed is (word == "REPAIRED")


def _binom_greater(k: int, n: int) -> float:
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def test_mcnemar_equals_the_exact_binomial_tail() -> None:
    for gained, lost in ((10, 0), (7, 3), (3, 7), (1, 1)):
        assert V.mcnemar(gained, lost, alternative="greater") == pytest.approx(_binom_greater(gained, gained + lost))
    two = V.mcnemar(7, 3)
    assert two == pytest.approx(min(1.0, 2 * _binom_greater(7, 10)))
    assert V.mcnemar(0, 0) is None


def test_the_statistics_in_the_verdict() -> None:
    ev = V.evaluate_rows(_scene(back=8), probed=PROBED, controls=CONTROLS, candidates=["fix"])
    st = {s.name: s for s in ev.candidates[0].stats}
    # 8 probed tokens came back, none was lost: the exact one-sided tail 2^-8
    assert st["mcnemar_probed"].p == pytest.approx(2 ** -8)
    assert st["mcnemar_control"].p is None  # the controls did not change
    # LOST tokens rose by log(0.4/1e-4) (8 of 10) while the controls did not move: far beyond them
    assert st["beyond_controls"].p < 1e-4
    # a model-wide rise (controls too) is not beyond the controls
    assert V.beyond_controls([1.0, 1.1, 0.9, 1.0], [1.0, 0.9, 1.1, 1.05]) > 0.2


def test_round_trip_through_json() -> None:
    ev = V.evaluate_rows(_scene(), probed=PROBED, controls=CONTROLS, candidates=["fix"],
                         losses={"base": 3.0, "post": 2.0, "fix": 2.0}, drift={"fix": {"below": 3, "min_cos": 0.9}})
    import json

    back = V.Evaluation.from_json(json.loads(json.dumps(ev.to_json())))
    assert back == ev


def test_a_rise_in_language_confusion_is_not_repaired() -> None:
    kw = {"probed": PROBED, "controls": CONTROLS, "candidates": ["fix"]}
    same = V.evaluate_rows(_scene(), confusion={"base": (5, 100), "post": (10, 100), "fix": (12, 100)}, **kw)
    assert same.candidates[0].verdict == "REPAIRED"
    worse = V.evaluate_rows(_scene(), confusion={"base": (5, 100), "post": (10, 100), "fix": (30, 100)}, **kw)
    c = worse.candidates[0]
    st = {s.name: s for s in c.stats}
    from scipy.stats import hypergeom

    # the one-sided Fisher p: P(X >= 30) for 30 of the 40 hits falling among the candidate's 100 of 200 answers
    assert st["confusion"].p == pytest.approx(hypergeom(200, 40, 100).sf(29))
    assert c.verdict == "COSTS THE TASK" and "language confusion rose" in c.sentence


def test_probe_lost_leaves_out_the_template_post_failed() -> None:
    """`probe`, `check` and the recommendation read LOST as `evaluate` does (the scene's template B collapsed in
    POST for every token, controls included)."""
    t = _scene()
    t = t.filter(pa.compute.is_in(t["model"], pa.array(["base", "post"])))
    t = t.append_column("control", pa.compute.is_in(t["token_id"], pa.array(CONTROLS)))
    asked, lost, controls, control_lost, failed, read = V.post_lost(t)
    assert asked == PROBED and controls == CONTROLS and failed == ["B"] and read == ["A"]
    assert sorted(lost) == list(range(1, 11)) and control_lost == []


def test_fisher_greater_equals_scipy_stats_on_many_tables() -> None:
    """The hypergeometric tail (scipy.special, which small commands import in a tenth of scipy.stats' time) equals
    scipy.stats.fisher_exact(..., alternative="greater") on edge cases and 300 random tables."""
    import numpy as np
    from scipy.stats import fisher_exact

    from vocabdrift.analyses.verdict import fisher_greater

    rng = np.random.default_rng(0)
    cases = [(0, 5, 0, 5), (5, 5, 0, 5), (0, 5, 5, 5), (104, 200, 8, 40), (3, 3859, 10, 45000), (1, 1, 0, 1)]
    for _ in range(300):
        na, nb = (int(x) for x in rng.integers(1, 3000, 2))
        cases.append((int(rng.integers(0, na + 1)), na, int(rng.integers(0, nb + 1)), nb))
    for a, na, b, nb in cases:
        want = fisher_exact([[a, na - a], [b, nb - b]], alternative="greater")[1]
        assert fisher_greater(a, na, b, nb) == pytest.approx(want, rel=1e-8, abs=1e-300), (a, na, b, nb)
    assert fisher_greater(1, 0, 1, 5) is None
