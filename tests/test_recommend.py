"""The one recommendation (`analyses.recommend`) on arrays made by hand: a category judged against the rest of the
vocabulary and against the controls, the order of the tokens at risk, and the recipe's size equal to what `synth`
writes."""

from __future__ import annotations

import numpy as np
import pytest

from vocabdrift.analyses import recommend as A
from vocabdrift.analyses.advice import coverage_advice


def _vocab(n_latin: int = 1000, n_cyr: int = 100, below_latin: int = 80, below_cyr: int = 1):
    ids = np.arange(n_latin + n_cyr + 2)
    cats = np.array(["latin"] * n_latin + ["cyrillic"] * n_cyr + ["special", "special"])
    cos = np.full(len(ids), 0.99)
    cos[:below_latin] = np.linspace(0.80, 0.94, below_latin)
    cos[n_latin:n_latin + below_cyr] = 0.93
    ok = cats != "special"
    return ids, cats, cos, ok


def test_an_english_only_sft_that_drifted_english_needs_data() -> None:
    """8% of Latin rows below 0.95 in an SFT set that targets a few hundred Latin tokens often: the old advice
    called Latin "present" (the quickstart pair's "Not a problem"); judged against the rest of the vocabulary,
    with most of its tokens rarely targeted, it needs data."""
    ids, cats, cos, ok = _vocab()
    rec = A.recommend(ids, cats, cos, ok, counts=np.zeros(len(ids), int), sft_samples=1000)
    by = {a.category: a for a in rec.categories}
    assert by["latin"].verdict == "needs data" and by["cyrillic"].verdict == "not at risk"
    assert rec.status == "repair" and len(rec.at_risk) == 81
    counts = np.zeros(len(ids), int)
    counts[800:1000] = 9  # 200 Latin tokens plainly in the data, the rest rare
    rec = A.recommend(ids, cats, cos, ok, counts=counts, sft_samples=1000)
    assert next(a for a in rec.categories if a.category == "latin").verdict == "needs data"
    old = coverage_advice({"latin": {"tokens": 5000, "at_or_above_floor": 336}}, samples=1000, placements_needed=0,
                          below_floor=0, floor=5, drift={"latin": {"lm_head": {"tokens": 1000, "below_0.95": 80}}},
                          overall={"lm_head": {"tokens": 1100, "below_0.95": 81}})
    assert old["languages"][0]["verdict"] == "present"  # what the old rule said


def test_lost_tokens_beyond_the_controls_call_for_data_even_without_drift() -> None:
    ids, cats, cos, ok = _vocab(below_latin=0)
    probed = list(range(1000, 1020))  # 20 Cyrillic tokens probed, 15 LOST; 2 of 40 controls lost
    rec = A.recommend(ids, cats, cos, ok, probed=probed, lost=probed[:15], controls=list(range(500, 540)),
                      control_lost=[500, 501])
    cyr = next(a for a in rec.categories if a.category == "cyrillic")
    assert cyr.verdict == "needs data" and cyr.lost == 15 and cyr.lost_p < 1e-6
    assert rec.covered[:15] == tuple(probed[:15])
    # the same LOST rate among the controls is no evidence against this category
    rec2 = A.recommend(ids, cats, cos, ok, probed=probed, lost=probed[:15], controls=list(range(500, 540)),
                       control_lost=list(range(500, 530)))
    assert next(a for a in rec2.categories if a.category == "cyrillic").verdict == "not at risk"


def test_tokens_at_risk_come_in_order_and_only_eligible_ones() -> None:
    ids, cats, cos, ok = _vocab()
    counts = np.zeros(len(ids), int)
    counts[5] = 50  # drifted but well targeted: not at risk
    cos[1101] = 0.1  # a special row: never
    risk = A.at_risk(ids, cos, ok, counts=counts, lost=[700, 3], collapsed=[900])
    assert risk[:3] == [700, 3, 900]
    rest = risk[3:]
    assert 5 not in rest and 1101 not in rest and 3 not in rest
    assert list(cos[rest]) == sorted(cos[rest])  # lowest cosine first


@pytest.mark.slow
def test_the_recipe_size_is_what_synth_writes(smollm2_hf) -> None:
    """`synth_samples` (the recommendation's size) equals the samples `analyses.synth.plan` writes for the same
    tokens, on SmolLM2's real tokenizer."""
    from vocabdrift.analyses import synth as S
    from vocabdrift.api.coverage import load_tasks
    from vocabdrift.sources.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_hf)
    words = [" Paul", " Jack", " cut", " Daniel", "hello", " the", " Elizabeth", " ro", " Mat", " Russian", " Anna",
             " Берлин", " мир", "東京", "ありがとう", " Maria", " George"]
    ids = [e.ids[0] for e in tok.backend_tokenizer.encode_batch(words, add_special_tokens=False) if len(e.ids) == 1]
    texts = [tok.decode([i]) for i in ids]
    from vocabdrift.analyses.vocab import classify

    cats = [classify(t, None) for t in texts]
    for placements in (1, 2, 7):
        p = S.plan(tok.backend_tokenizer, ids, texts, cats, [placements] * len(ids), load_tasks(), seed=0)
        assert not p.skipped
        assert A.synth_samples(cats, placements=placements) == len(p.samples), placements
