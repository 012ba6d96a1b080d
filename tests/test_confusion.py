"""Language confusion: script detection on hand-written strings, the interval and the test, and the command on a
tiny local model."""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import pytest
from test_engines import tiny_model as tiny_model  # the fixture

from vocabdrift.analyses.confusion import count_confusion, fisher_test, offending_scripts, wilson_interval
from vocabdrift.errors import VocabdriftError


@pytest.mark.parametrize(("text", "language", "want"), [
    ("富士山は日本で一番高い山です。標高3,776m、Mount Fuji とも呼ばれます！", "ja", {}),
    ("お年玉は、お正月に子供に渡すお金です（1万円）。😊", "ja", {}),
    ("富士山はочень高い山です", "ja", {"cyrillic": 5}),
    ("こんにちは 안녕하세요", "ja", {"hangul": 5}),
    ("日本の首都は東京 (طوكيو) です", "ja", {"arabic": 5}),
    ("αβγ の値", "ja", {"greek": 3}),
    ("옛날 옛적에 작은 마을이 있었습니다.", "ko", {}),
    ("옛날 옛적에 山 마을", "ko", {"han": 1}),
    ("옛날에 とても 작은", "ko", {"japanese": 3}),
    ("Привет, мир! 2024", "ru", {}),
    ("Hello, мир", "en", {"cyrillic": 3}),
    ("北京是中国的首都。", "zh", {}),
    ("北京は中国の首都", "zh", {"japanese": 2}),
])
def test_offending_scripts_on_hand_written_strings(text: str, language: str, want: dict[str, int]) -> None:
    assert dict(offending_scripts(text, language)) == want


def test_count_confusion_counts_answers_not_characters() -> None:
    answers = ["富士山です", "富士山はвысокий", "これはпривет", "한국 富士", "ok"]
    c = count_confusion(answers, "ja")
    assert (c.n, c.hits) == (5, 3)
    assert c.by_script == {"cyrillic": 2, "hangul": 1}
    assert c.rate == pytest.approx(0.6)
    with pytest.raises(VocabdriftError, match="unknown language"):
        count_confusion(answers, "xx")


@pytest.mark.parametrize(("k", "n"), [(0, 100), (47, 100), (1, 100), (100, 100), (3, 7)])
def test_wilson_interval_equals_the_formula(k: int, n: int) -> None:
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(max(0.0, centre - half), abs=1e-9)
    assert hi == pytest.approx(min(1.0, centre + half), abs=1e-9)
    with pytest.raises(VocabdriftError):
        wilson_interval(0, 0)


def test_fisher_test_equals_the_hypergeometric_sum() -> None:
    a, na, b, nb = 47, 100, 1, 100
    odds, p = fisher_test(a, na, b, nb)
    assert odds == pytest.approx((a * (nb - b)) / ((na - a) * b))
    total, hits = na + nb, a + b

    def pmf(x: int) -> float:
        return math.comb(na, x) * math.comb(nb, hits - x) / math.comb(total, hits)

    observed = pmf(a)
    want = sum(pmf(x) for x in range(max(0, hits - nb), min(na, hits) + 1) if pmf(x) <= observed * (1 + 1e-7))
    assert p == pytest.approx(want, rel=1e-6)
    assert fisher_test(5, 10, 5, 10)[1] == pytest.approx(1.0)


def _foreign_chars(text: str) -> bool:
    """An independent reading: Unicode character names of scripts that are not Japanese."""
    foreign = ("CYRILLIC", "HANGUL", "ARABIC", "GREEK", "HEBREW", "DEVANAGARI", "THAI")
    return any(any(f in unicodedata.name(ch, "") for f in foreign) for ch in text)


@pytest.mark.slow
def test_confusion_on_a_local_model_with_a_base(tiny_model: Path, tmp_path: Path) -> None:
    from vocabdrift.api.probe import confusion

    doc = confusion(tiny_model, base=tiny_model, prompts=["富士山について教えてください。"], language="ja", n=12,
                    max_tokens=10, seed=1, out=tmp_path / "run")
    assert [r["model"] for r in doc["results"]] == ["base", "post"]
    for r, s in zip(doc["results"], doc["samples"], strict=True):
        assert r["n"] == 12 and r["hits"] == sum(_foreign_chars(a) for a in s["answers"])
        assert r["ci_low"] <= r["rate"] <= r["ci_high"]
    # the same model and seed on both sides: the same samples, a p-value of 1
    assert doc["samples"][0]["answers"] == doc["samples"][1]["answers"]
    assert doc["tests"][0]["p_value"] == pytest.approx(1.0)
    on_disk = json.loads((tmp_path / "run" / "confusion.json").read_text())
    assert on_disk["tests"] == doc["tests"] and "samples" not in on_disk


def test_shipped_confusion_prompts_and_bad_input(tiny_model: Path) -> None:
    from vocabdrift.api.probe import confusion, read_confusion_prompts

    items = read_confusion_prompts()
    assert {p.language for p in items} == {"ja", "ko"}
    assert any("짧은 이야기를 작성해 주세요" in p.prompt for p in items)
    assert any("お年玉" in p.prompt for p in items) and any("富士山" in p.prompt for p in items)
    with pytest.raises(VocabdriftError, match="--language"):
        confusion(tiny_model, prompts="hello", n=2)
    with pytest.raises(VocabdriftError, match="unknown language"):
        confusion(tiny_model, prompts="hello", language="klingon", n=2)
