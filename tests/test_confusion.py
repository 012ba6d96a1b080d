"""Language confusion: script detection on hand-written strings, the interval and the test, and the command on a
tiny local model."""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import pytest
from test_engines import tiny_model as tiny_model  # the fixture

from vocabdrift.analyses.confusion import (
    answer_rows,
    count_confusion,
    fisher_test,
    foreign_spans,
    is_native,
    offending_scripts,
    wilson_interval,
)
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


_FOREIGN_TO_JA = ("CYRILLIC", "HANGUL", "ARABIC", "GREEK", "HEBREW", "DEVANAGARI", "THAI")


def _foreign_of(ch: str) -> str | None:
    """An independent reading of a character's foreign script (for Japanese) from its Unicode name."""
    name = unicodedata.name(ch, "")
    return next((f for f in _FOREIGN_TO_JA if f in name and "LETTER" in name or f in name and "SYLLABLE" in name),
                None)


@pytest.mark.parametrize("text", ["富士山はочень高い山です", "Привет", "日本 안녕 мир です", "ok", "", "αβ и γ",
                                  "東京 (طوكيو) と Москва"])
def test_foreign_spans_cover_exactly_the_foreign_letters_in_runs(text: str) -> None:
    spans = foreign_spans(text, "ja")
    marked = {i for a, b, _ in spans for i in range(a, b)}
    assert marked == {i for i, ch in enumerate(text) if _foreign_of(ch)}
    for a, b, script in spans:  # a run is one script, and the next character is not of it
        assert {_foreign_of(ch) for ch in text[a:b]} == {script.upper()}
        assert b == len(text) or _foreign_of(text[b]) != script.upper()
    # adjacent runs are of different scripts or separated by something allowed
    assert all(x[1] < y[0] or x[2] != y[2] for x, y in zip(spans, spans[1:], strict=False))
    counted = {}
    for a, b, s in spans:
        counted[s] = counted.get(s, 0) + b - a
    assert counted == dict(offending_scripts(text, "ja"))


@pytest.mark.parametrize(("text", "language"), [
    ("富士山は日本で一番高い山です。", "ja"), ("<tool_call>\n{\"name\": \"lookup\"}", "ja"),
    ("Fuji は high mountain です", "ja"), ("です ok", "ja"), ("東京 Tokyo", "ja"), ("123 !!", "ja"),
    ("옛날 옛적에 small 마을", "ko"), ("once upon 옛", "ko"), ("Привет world", "ru")])
def test_is_native_counts_letters_of_the_own_scripts(text: str, language: str) -> None:
    own = {"ja": ("HIRAGANA", "KATAKANA", "CJK UNIFIED"), "ko": ("HANGUL",), "ru": ("CYRILLIC",)}[language]
    letters = [ch for ch in text if ch.isalpha()]
    native = [ch for ch in letters if any(o in unicodedata.name(ch, "") for o in own)]
    assert is_native(text, language) == (len(letters) > 0 and 2 * len(native) > len(letters))


def test_count_confusion_counts_native_answers_and_answer_rows_hold_each_sample() -> None:
    answers = ["富士山です", "富士山はвысокий", "<tool_call>{}</tool_call>", "한국 富士", ""]
    c = count_confusion(answers, "ja")
    # only the first: 4 kana/kanji against 7 Cyrillic letters, 2 against 2 Hangul, no letter at all are not native
    assert c.native == sum(is_native(a, "ja") for a in answers) == 1
    rows = answer_rows(answers, prompt="p", language="ja", model="m", name="n")
    assert [r["sample"] for r in rows] == list(range(len(answers)))
    assert [r["text"] for r in rows] == answers
    assert [bool(r["foreign"]) for r in rows] == [bool(offending_scripts(a, "ja")) for a in answers]
    assert rows[1]["foreign"] == {"cyrillic": 7} and rows[3]["foreign"] == {"hangul": 2}
    assert all(r["prompt"] == "p" and r["model"] == "m" and r["language"] == "ja" for r in rows)


def test_confusion_answers_file_round_trips_through_the_run_contract(tmp_path: Path) -> None:
    from vocabdrift.outputs.run import CONFUSION_ANSWERS, REQUIRED_COLUMNS, Run

    rows = answer_rows(["富士山です\n二行目", "富士はмир"], prompt="富士山", language="ja", model="post")
    run = Run(tmp_path)
    run.write_jsonl(CONFUSION_ANSWERS, rows)
    lines = (tmp_path / CONFUSION_ANSWERS).read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == rows and len(lines) == 2  # one object a line, newlines escaped
    assert run.read_jsonl(CONFUSION_ANSWERS) == rows
    assert set(REQUIRED_COLUMNS[CONFUSION_ANSWERS]) <= set(rows[0])
    with pytest.raises(ValueError, match="lacks text"):
        run.write_jsonl(CONFUSION_ANSWERS, [{k: v for k, v in rows[0].items() if k != "text"}])
    (tmp_path / CONFUSION_ANSWERS).write_text(lines[0] + "\n{\"prompt\": 1}\n", encoding="utf-8")
    with pytest.raises(VocabdriftError, match=":2: missing key"):
        run.read_jsonl(CONFUSION_ANSWERS)
    (tmp_path / CONFUSION_ANSWERS).write_text("not json\n", encoding="utf-8")
    with pytest.raises(VocabdriftError, match=":1: not JSON"):
        run.read_jsonl(CONFUSION_ANSWERS)


def test_the_report_shows_answers_with_the_foreign_letters_marked() -> None:
    from vocabdrift.outputs.report import _md_table, answers_table

    texts = ["富士山です", "富士はмир山", "日本", "Москва と 서울", "山", "川"]
    rows = answer_rows(texts, prompt="富士山について", language="ja", model="baseline")
    rows += answer_rows(["ok"], prompt="富士山について", language="ja", model="repaired")
    t = answers_table(rows, per=4)
    shown = [(r[1], int(r[2])) for r in t.rows]
    # two with foreign letters (1, 3) and the first two without (0, 2), in sample order; the other model's one
    assert shown == [("baseline", 0), ("baseline", 1), ("baseline", 2), ("baseline", 3), ("repaired", 0)]
    marked = ["".join(c.text for c in r[4] if c.cls == "foreign") for r in t.rows]
    assert marked == ["", "мир", "", "Москва서울", ""]
    assert ["".join(c.text for c in r[4]) for r in t.rows[:4]] == [texts[i] for i in range(4)]
    md = _md_table(t)
    assert "富士は⟦мир⟧山" in md and "⟦Москва⟧ と ⟦서울⟧" in md


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
    # every sampled answer, in confusion.jsonl: one line per model and sample, the foreign scripts it holds
    lines = [json.loads(x) for x in (tmp_path / "run" / "confusion.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 12
    for s in doc["samples"]:
        mine = [x for x in lines if x["model"] == s["model"]]
        assert [x["text"] for x in mine] == s["answers"] and [x["sample"] for x in mine] == list(range(12))
        assert all(bool(x["foreign"]) == _foreign_chars(x["text"]) for x in mine)
    for r in doc["results"]:
        assert r["native"] == sum(x["native"] for x in lines if x["model"] == r["model"])


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


def test_console_table_shows_the_answers_in_the_prompts_own_script() -> None:
    from rich.console import Console

    from vocabdrift.analyses.confusion import count_confusion
    from vocabdrift.outputs.console import confusion_table

    answers = ["富士山はとても高い山です", "Fuji is a mountain", "富士山はとても高い山 да"]
    cc = count_confusion(answers, "ja")
    row = {"prompt": "富士山について", "language": "ja", "model": "post", "hits": cc.hits, "n": cc.n,
           "rate": cc.hits / cc.n, "ci_low": 0.0, "ci_high": 1.0, "by_script": cc.by_script, "native": cc.native}
    con = Console(width=200, record=True)
    con.print(confusion_table([row]))
    cells = [c.strip() for c in next(x for x in con.export_text().splitlines() if "post" in x).split("│")[1:-1]]
    assert cells[-1] == "2/3"  # the English answer has no foreign letters, and is not in Japanese either
    assert cells[3] == "1/3 = 33%"
