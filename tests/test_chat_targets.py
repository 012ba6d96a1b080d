"""One rule for "a generation target", shared by `coverage` and training, on SmolLM2's real chat template.

SmolLM2's template has no `{% generation %}` markers, so transformers' own assistant mask is all zeros on it; the
spans come from rendering. The independent reference is transformers' mask on a copy of the same template with
the markers added.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import vocabdrift
from vocabdrift.composites.train import encode_records, untie_lm_head
from vocabdrift.errors import VocabdriftError
from vocabdrift.sources.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

# SmolLM2's template, with {% generation %} around what the assistant says (its content and <|im_end|>)
SMOL_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chats() -> list[dict]:
    """Chats whose answers also occur in the system prompt, the role headers or the question."""
    out = []
    # "\n" merges with the header's newline into one token that begins before the answer (a target, as in
    # transformers' mask); the empty answer trains <|im_end|> alone
    for w in ("a", "as", "i", "AI", "assistant", "helpful", "Hugging Face", "cat", "im", "", "\n", "  x"):
        out.append({"messages": [{"role": "user", "content": f"Repeat this word exactly: {w}"},
                                 {"role": "assistant", "content": w}]})
    out.append({"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."},
                             {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Pear."}]})
    out.append({"messages": [{"role": "user", "content": "Write code."},
                             {"role": "assistant", "content": "```python\ndef f(x):\n    return x + 1\n```"}]})
    out.append({"messages": [{"role": "user", "content": "Say it twice: ok"},
                             {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"},
                             {"role": "assistant", "content": "ok"}]})
    return out


def trained_labels(rows: list[dict]) -> Counter:
    return Counter(t for r in rows for t in r["labels"][1:] if t != -100)  # position 0 predicts nothing


def test_training_labels_equal_transformers_mask_on_marked_template(smollm2_hf: Path) -> None:
    tok = load_tokenizer(smollm2_hf)
    assert "{% generation" not in tok.chat_template
    recs = chats()
    rows = encode_records(tok, recs, max_length=512)
    assert len(rows) == len(recs)  # the all-zero mask of transformers would have dropped every one

    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm2_hf)
    for rec, row in zip(recs, rows, strict=True):
        want = ref.apply_chat_template(rec["messages"], tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True, chat_template=SMOL_MARKED)
        assert row["input_ids"] == list(want["input_ids"])
        got_mask = [lab != -100 for lab in row["labels"]]
        assert got_mask == [bool(m) for m in want["assistant_masks"]], rec
    # the plain transformers mask on the real template is empty: what repair used to train on
    plain = ref.apply_chat_template(recs[0]["messages"], tokenize=True, return_dict=True,
                                    return_assistant_tokens_mask=True)
    assert not any(plain["assistant_masks"])


def test_coverage_counts_equal_repair_labels_token_for_token(smollm2_hf: Path, tmp_path: Path) -> None:
    from vocabdrift.composites.corpus import sft_records

    recs = chats() + sft_records(60, seed=3, japanese=2, name=1)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    c = vocabdrift.coverage(data, tokenizer=smollm2_hf)
    assert c.summary["render"] == "template"
    counts = c.table.column("count").to_numpy()
    rows = encode_records(load_tokenizer(smollm2_hf), recs, max_length=4096)
    got = trained_labels(rows)
    assert got == {i: int(counts[i]) for i in np.nonzero(counts)[0]}
    assert sum(got.values()) == int(counts.sum()) > 500


def test_a_template_that_hides_the_answer_is_one_clear_error(smollm2_hf: Path) -> None:
    tok = load_tokenizer(smollm2_hf)
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                         "{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}"
                         "{% endfor %}")
    with pytest.raises(VocabdriftError, match="does not reproduce an assistant message"):
        encode_records(tok, chats()[:3], max_length=256)


def test_repair_trains_smollm2_on_its_own_template_and_says_what_it_does(smollm2_hf: Path, tmp_path: Path) -> None:
    recs = chats() * 2
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    out = tmp_path / "fix"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-m", "vocabdrift.cli", "repair", str(smollm2_hf), str(data), "-o", str(out),
                        "--coverage", "none", "--steps", "2", "--batch-size", "2", "--max-length", "96",
                        "--lr", "1e-3"], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    err = p.stderr
    assert f"{len(recs)} training samples ({len(recs)} SFT, 0 coverage, 0 replay); 2 steps x 2 = 4 drawn" in err
    assert "step 2/2 loss" in err and "lm_head min_cos" in err  # a line per log step, with no terminal
    assert "dropped" not in err
    rep = json.loads((out / "summary.json").read_text())["repair"]
    t = rep["training"]["targets"]
    assert t["rows"] == len(recs) and t["unrenderable"] == 0 and t["render"] == "template"
    assert t["trained_tokens"] == sum(trained_labels(encode_records(load_tokenizer(smollm2_hf), recs,
                                                                    max_length=96)).values())
    drift = pq.read_table(out / "drift.parquet")
    cos = drift.column("lm_head_cos").to_numpy()
    assert np.nanmin(cos) < 0.9999  # training reached lm_head: the targets' rows moved


def test_untie_gives_a_tied_model_its_own_head(tmp_path: Path) -> None:
    import torch
    from factory import make_llama
    from transformers import AutoModelForCausalLM

    base = make_llama(tmp_path / "tied", tied=True, dtype="float32")
    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert untie_lm_head(m) and not untie_lm_head(m)
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)
    with torch.no_grad():
        m.lm_head.weight[5] += 1.0
    m.save_pretrained(tmp_path / "untied")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "untied", dtype=torch.float32)
    assert not back.config.tie_word_embeddings
    assert torch.equal(back.lm_head.weight, m.lm_head.weight)
    assert not torch.equal(back.lm_head.weight[5], back.model.embed_tokens.weight[5])


@pytest.mark.parametrize("share", [None, 0.2, 0.5])
def test_coverage_share_and_the_plan_say_what_a_run_sees(share: float | None) -> None:
    from vocabdrift.composites.repair import describe_plan, mix_coverage, plan_warning, training_plan

    sft = [{"text": f"s{i}"} for i in range(1290)]
    cov = [{"text": f"c{i}"} for i in range(6195)]
    mixed = mix_coverage(sft, cov, share, seed=3)
    assert mixed == mix_coverage(sft, cov, share, seed=3)  # deterministic for a seed
    if share is None:
        assert mixed == cov
    else:
        assert abs(len(mixed) / (len(mixed) + len(sft)) - share) < 1e-3
        assert len({r["text"] for r in mixed}) == len(mixed) <= len(cov)  # a subset, no repeats while it is larger
    plan = training_plan(sft=len(sft), coverage=len(mixed), replay=0, steps=160, batch_size=8,
                         coverage_set=len(cov))
    drawn, total = 160 * 8, len(sft) + len(mixed)
    assert plan["drawn"] == drawn and plan["samples"] == total
    assert plan["coverage_seen"] == round(min(1, drawn / total) * len(mixed))
    per_step = len(mixed) / total * 8
    assert plan["steps_for_whole_set"] == int(np.ceil(len(cov) / per_step))
    line = describe_plan(plan)
    assert f"about {plan['coverage_seen']:,} of the coverage set's 6,195 samples will be seen" in line
    assert f"take {plan['steps_for_whole_set']:,} steps at this mix" in line
    warning = plan_warning(plan)  # the whole set (83%), 20% and 50%: above the share that raised the lab's confusion
    assert warning is not None and f"coverage is {100 * len(mixed) / total:.0f}% of the samples" in warning
    small = training_plan(sft=len(sft), coverage=len(mix_coverage(sft, cov, 0.05, seed=3)), replay=0, steps=160,
                          batch_size=8, coverage_set=len(cov))
    assert plan_warning(small) is None


def test_a_small_coverage_set_is_repeated_to_its_share() -> None:
    from vocabdrift.composites.repair import mix_coverage

    mixed = mix_coverage([{"text": "s"}] * 90, [{"text": "a"}, {"text": "b"}], 0.1, seed=0)
    assert len(mixed) == 10 and sorted({r["text"] for r in mixed}) == ["a", "b"]
    assert abs(sum(r["text"] == "a" for r in mixed) - 5) <= 1


def test_model_folders_written_by_training_follow_the_umask(tmp_path: Path) -> None:
    from vocabdrift.composites.train import train_tokenizer

    old = os.umask(0o027)
    try:
        train_tokenizer(["hello world", "the cat sat"] * 20, vocab_size=300, out=tmp_path / "tok")
    finally:
        os.umask(old)
    assert (tmp_path / "tok").stat().st_mode & 0o777 == 0o750
    files = [f for f in (tmp_path / "tok").iterdir() if f.is_file()]
    assert files and all(f.stat().st_mode & 0o777 == 0o640 for f in files)
