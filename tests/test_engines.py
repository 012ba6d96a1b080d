"""Engines: shared-prefix scoring against unbatched scoring, generation, and the OpenAI client against a real
`transformers serve` process."""

from __future__ import annotations

from pathlib import Path

import pytest
from factory import free_port, running_server

from vocabdrift.errors import VocabdriftError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("cat dog bird fish tree house water fire stone river hello world apple green blue red small large "
         "quick slow music paper window garden yellow orange silver golden morning evening winter summer "
         "Repeat this word exactly three times Say nothing else Input Output").split()
EXTRA = ["こんにちは", "富士山", "お年玉", "きちんと", "привет", "мир", "안녕", "이야기", "無痛", "地税", "据介绍"]


def make_tiny_model(folder: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained on a few words and a ChatML chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(WORDS), *(f" {w}" for w in WORDS), *WORDS, *EXTRA, *(f": {w}\n" for w in WORDS + EXTRA)]
    tok.train_from_iterator(corpus * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=fast.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


# ---- local transformers engine ----------------------------------------------------------------------------------

def test_shared_prefix_scores_equal_unbatched_full_prompts(tiny_model: Path) -> None:
    from vocabdrift.engines.hf import HFEngine

    head = HFEngine(tiny_model).render("Repeat this word exactly: X")
    k = len(head) - 6
    # a common head, one varying token, the same tail (the probe case: only the last position's logits are kept)
    equal = [[*head[:k], t, *head[k + 1:]] for t in range(3, 43)]
    # and with two longer tails: right padding inside the batch
    ragged = [list(p) for p in equal]
    ragged[4] += [7, 8, 9]
    ragged[21] += [11]
    for prompts in (equal, ragged):
        eng = HFEngine(tiny_model, batch_size=16)
        targets = [(7 * t) % len(eng.tokenizer) for t in range(40)]
        fast = eng.score(prompts, targets)
        assert eng._prefix is not None and len(eng._prefix[0]) == k  # the prefix cache was really used
        eng.shared_prefix, eng.batch_size = False, 1
        slow = eng.score(prompts, targets)
        for a, b in zip(fast, slow, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4
            assert a.rank == b.rank and a.in_top_p == b.in_top_p


def _tiny_qwen2(tiny_model: Path, folder: Path) -> Path:
    """A tiny random Qwen2 (biases on q, k, v) with the tiny Llama's tokenizer."""
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:  # random biases: initialised to zero, they would test nothing
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def test_tail_pass_scores_equal_the_generic_forward(tiny_model: Path, tmp_path: Path) -> None:
    """`HFEngine.score` through the hand-written decoder pass (shared prefix kept per template, the last layer at
    the last position only) gives the generic forward's scores, on Llama and Qwen2, for equal and ragged tails,
    alternating prefixes, a batch that shares no prefix and a single prompt."""
    from vocabdrift.engines.hf import HFEngine

    for folder in (tiny_model, _tiny_qwen2(tiny_model, tmp_path / "qwen2")):
        eng = HFEngine(folder, batch_size=16)
        generic = HFEngine(folder, batch_size=16, shared_prefix=False)  # no prefix, no tail pass
        assert generic._tails is not None and not generic.shared_prefix
        head = eng.render("Repeat this word exactly: X")
        other = eng.render("Say this word: X")
        k = len(head) - 6
        equal = [[*head[:k], t, *head[k + 1:]] for t in range(3, 43)]
        ragged = [list(p) for p in equal]
        ragged[4] += [7, 8, 9]
        ragged[21] += [11]
        second = [[*other[:-6], t, *other[-5:]] for t in range(50, 70)]
        unrelated = [[t, 5, 6] for t in range(3, 9)] + [[9, 4]]
        for prompts in (equal, second, ragged, equal, unrelated, equal[:1]):
            targets = [(7 * i + 3) % 300 for i in range(len(prompts))]
            got = eng.score(prompts, targets, top_p=0.5)
            assert eng._tails is not None  # the hand-written pass, not the fallback
            want = generic.score(prompts, targets, top_p=0.5)
            assert max(abs(a.logprob - b.logprob) for a, b in zip(got, want, strict=True)) < 1e-4
            assert max(abs(a.mass_above - b.mass_above) for a, b in zip(got, want, strict=True)) < 1e-4
            assert [a.rank for a in got] == [b.rank for b in want]
            assert eng.logprobs(prompts, targets) == [a.logprob for a in got]
        assert len(eng._tail_prefixes) >= 2  # both templates' prefixes kept


def test_tail_pass_falls_back_when_it_disagrees(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from vocabdrift.engines import hf

    eng = hf.HFEngine(tiny_model)
    monkeypatch.setattr(hf._TailForward, "logits", lambda self, past, start, ids, last:
                        torch.zeros(len(ids), eng.vocab_size))
    prompts = [[*eng.render("Repeat this word exactly: X"), t] for t in range(3, 9)]
    got = eng.score(prompts, list(range(6)))
    assert eng._tails is None and "generic forward" in caplog.text
    want = hf.HFEngine(tiny_model, shared_prefix=False).score(prompts, list(range(6)))
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, want, strict=True)) < 1e-5


def test_scores_from_logits_match_a_sorted_nucleus() -> None:
    import torch

    from vocabdrift.engines.hf import scores_from_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=g) * 3
    targets = torch.tensor([0, 5, 9, 13, 21, 34, 40, 49])
    targets[3] = int(logits[3].argmax())  # one target is the first choice: kept even by a zero nucleus (greedy)
    for top_p in (0.9, 0.3, 0.0):
        scores = scores_from_logits(logits, targets, top_p=top_p)
        for row, t, s in zip(logits, targets.tolist(), scores, strict=True):
            probs = torch.softmax(row, 0)
            order = torch.argsort(probs, descending=True).tolist()
            rank = order.index(t) + 1
            keep = set()
            acc = 0.0
            for i in order:  # the nucleus as samplers build it: add tokens until the mass reaches top_p
                keep.add(i)
                acc += float(probs[i])
                if acc >= top_p:
                    break
            assert s.rank == rank
            assert s.in_top_p == (t in keep)
            assert abs(s.logprob - float(torch.log(probs[t]))) < 1e-5
        if top_p == 0.0:
            assert [s.in_top_p for s in scores] == [s.rank == 1 for s in scores] and scores[3].in_top_p


def test_generate_is_seeded_and_greedy_is_repeatable(tiny_model: Path) -> None:
    from vocabdrift.engines.hf import HFEngine

    eng = HFEngine(tiny_model)
    a = eng.generate(["hello", "cat"], n=3, temperature=1.0, max_tokens=6, seed=5)
    b = eng.generate(["hello", "cat"], n=3, temperature=1.0, max_tokens=6, seed=5)
    c = eng.generate(["hello", "cat"], n=3, temperature=1.0, max_tokens=6, seed=6)
    assert a == b and a != c
    assert [len(x) for x in a] == [3, 3]
    g = eng.generate(["hello"], n=2, temperature=0, max_tokens=6)
    assert g[0][0] == g[0][1]


def test_engine_errors_are_one_clear_line(tmp_path: Path, tiny_model: Path) -> None:
    from vocabdrift.engines.hf import HFEngine

    with pytest.raises(VocabdriftError, match="no config.json or .gguf"):
        HFEngine(tmp_path)
    eng = HFEngine(tiny_model)
    with pytest.raises(VocabdriftError, match="outside the model's vocabulary"):
        eng.score([[1, 2, 3]], [10**6])


# ---- OpenAI-compatible server: a real `transformers serve` -------------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny_model: Path):
    """`transformers serve` on the tiny model, on 127.0.0.1 and a free port; killed at the end."""
    import sys

    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    args = [str(exe), "serve", str(tiny_model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with running_server(args, port, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, name="transformers serve",
                        timeout=120) as url:
        yield url


@pytest.mark.slow
def test_openai_engine_generates_like_the_local_model(served: str, tiny_model: Path) -> None:
    from vocabdrift.engines.hf import HFEngine
    from vocabdrift.engines.openai import OpenAIEngine

    remote = OpenAIEngine(served, model=str(tiny_model), tokenizer=str(tiny_model))
    try:
        greedy = remote.generate(["Repeat this word exactly: cat", "hello"], n=1, temperature=0, max_tokens=8)
        sampled = remote.generate(["hello"], n=3, temperature=1.0, max_tokens=8, seed=1)
    finally:
        remote.close()
    local = HFEngine(tiny_model).generate(["Repeat this word exactly: cat", "hello"], temperature=0, max_tokens=8)
    assert greedy == local  # the same weights, greedy: the same answers
    assert len(sampled[0]) == 3 and all(isinstance(s, str) for s in sampled[0])


@pytest.mark.slow
def test_openai_scoring_without_logprobs_is_a_clear_error(served: str, tiny_model: Path) -> None:
    from vocabdrift.engines.openai import OpenAIEngine

    remote = OpenAIEngine(served, model=str(tiny_model), tokenizer=str(tiny_model))
    try:
        with pytest.raises(VocabdriftError, match="returns logprobs"):
            remote.score([[1, 5, 6]], [7])
    finally:
        remote.close()


@pytest.mark.slow
def test_confusion_end_to_end_through_the_server(served: str, tiny_model: Path, tmp_path: Path) -> None:
    import json
    import unicodedata

    from vocabdrift.api.probe import confusion

    doc = confusion(str(tiny_model), endpoint=served, prompts=["こんにちは", "富士山"], language="ja", n=6,
                    max_tokens=12, seed=3, out=tmp_path / "run")
    written = json.loads((tmp_path / "run" / "confusion.json").read_text())
    assert written["results"] == doc["results"] and len(doc["results"]) == 2
    foreign = ("CYRILLIC", "HANGUL", "ARABIC", "GREEK", "HEBREW", "DEVANAGARI", "THAI")
    for res, samp in zip(doc["results"], doc["samples"], strict=True):
        assert len(samp["answers"]) == 6 == res["n"]
        hits = sum(any(any(f in unicodedata.name(ch, "") for f in foreign) for ch in a) for a in samp["answers"])
        assert res["hits"] == hits
        assert res["ci_low"] <= res["rate"] <= res["ci_high"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["confusion"]["results"]) == 2
