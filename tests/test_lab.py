"""The lab: corpus, tokenizer, the SFT contract, and the quick lab end to end (drift, its pattern, its repair)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vocabdrift.composites.corpus import GIVEN_NAME, NAME, build_corpus
from vocabdrift.errors import VocabdriftError

SCARCE = ("japanese", "hangul", "cyrillic", "arabic")


# ---- corpus and tokenizer ---------------------------------------------------------------------------------------

def test_corpus_is_deterministic_and_shaped_like_the_published_case() -> None:
    a = build_corpus(docs=400, sft=300, seed=3, name_every=50)
    b = build_corpus(docs=400, sft=300, seed=3, name_every=50)
    assert a == b
    assert a != build_corpus(docs=400, sft=300, seed=4, name_every=50)
    texts = " ".join(a.pretrain)
    for ch in ("の", "的", "한", "и", "في", "def ", "<tool_call>"):  # every language, code and tool calls
        assert ch in texts
    assert sum(GIVEN_NAME in d for d in a.pretrain) >= 400 // 50
    with_name = [r for r in a.sft if any(GIVEN_NAME in m["content"] or NAME in m["content"] for m in r["messages"])]
    assert 0 < len(with_name) < 5
    answers = [r["messages"][-1]["content"] for r in a.sft]
    assert sum("<tool_call>" in t or "def " in t for t in answers) > len(answers) // 3
    # some Japanese and Korean requests are answered in their language, with its most common words only
    from vocabdrift.composites.corpus import NATIVE_WORDS, _words

    for lo, hi, lang in (("\u3040", "\u30ff", "ja"), ("\uac00", "\ud7a3", "ko")):
        native = [r["messages"] for r in a.sft if any(lo <= c <= hi for c in r["messages"][-1]["content"])]
        assert 0.03 * len(a.sft) < len(native) < 0.12 * len(a.sft), lang
        assert all(any(lo <= c <= hi for c in m[0]["content"]) for m in native), lang  # asked in that language
        common = set(_words(lang)[0][:NATIVE_WORDS])
        sep = " " if lang == "ko" else ""
        for m in native:
            for sentence in m[-1]["content"].split("。" if lang == "ja" else "."):
                words = sentence.split(sep) if sep else None
                if words is None:  # Japanese has no spaces: every character comes from the common words
                    assert set(sentence) <= set("".join(common)), sentence
                else:
                    assert set(w for w in words if w) <= common, sentence
    # the previous mix (the benchmarks' records): no Japanese or Korean answers but the `japanese` sentences asked for
    from vocabdrift.composites.corpus import sft_records

    before = [r["messages"][-1]["content"] for r in sft_records(300, seed=3, japanese=2, name=0)]
    assert sum(any("\u3040" <= c <= "\u30ff" or "\uac00" <= c <= "\ud7a3" for c in t) for t in before) <= 2


def test_tokenizer_makes_the_given_name_one_token_and_masks_assistant_turns(tmp_path: Path) -> None:
    from vocabdrift.composites.train import encode_records, train_tokenizer

    c = build_corpus(docs=1500, sft=50, seed=0, name_every=40)
    tok = train_tokenizer(c.pretrain, vocab_size=1024, out=tmp_path / "tok", must_have=[GIVEN_NAME])
    assert len(tok.backend_tokenizer.encode(GIVEN_NAME, add_special_tokens=False).ids) == 1
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    rows = encode_records(tok, [{"messages": [{"role": "user", "content": "hi there"},
                                              {"role": "assistant", "content": "hello world"}]},
                                {"text": "plain text"}], max_length=64)
    chat, text = rows
    trained = [t for t, lab in zip(chat["input_ids"], chat["labels"], strict=True) if lab != -100]
    assert tok.decode(trained) == "hello world<|im_end|>"
    assert all(lab != -100 for lab in text["labels"]) and text["input_ids"][-1] == tok.eos_token_id
    with pytest.raises(VocabdriftError, match="splits"):
        train_tokenizer(c.pretrain[:50], vocab_size=300, must_have=["马嘉祺是队长"])


# ---- the SFT contract -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vocabdrift.composites.train import pretrain, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    c = build_corpus(docs=300, sft=10, seed=0, name_every=0)
    tok = train_tokenizer(c.pretrain, vocab_size=512)
    path, loss = pretrain(tok, c.pretrain, out=root / "base", steps=5, hidden=32, layers=1, heads=2, context=32,
                          batch_size=4, progress=False)
    assert np.isfinite(loss)
    return path


def _weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path / "model.safetensors")


def test_sft_contract(tiny_base: Path, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    from vocabdrift.composites.train import sft

    records = build_corpus(docs=10, sft=40, seed=1, name_every=0).sft
    calls: list[int] = []
    trained: list[list[int]] = []

    def term(model, inputs):  # a loss term sees the model and the batch every step
        calls.append(int(inputs["input_ids"].shape[0]))
        trained.extend([t for t in row if t != -100] for row in inputs["labels"].tolist())
        return None

    class Steps(TrainerCallback):
        n = 0

        def on_step_end(self, args, state, control, **kw):
            Steps.n += 1

    out = sft(tiny_base, records, out=tmp_path / "a", steps=3, batch_size=4, loss_terms=[term], callbacks=[Steps()],
              freeze=["embed"], replay=[{"text": "replayed pre-training text"}], replay_ratio=0.2, progress=False)
    assert out == tmp_path / "a" and (out / "tokenizer.json").exists() and (out / "config.json").exists()
    assert len(calls) == 3 and Steps.n == 3
    # TRL's SFTTrainer trains on the assistant's tokens only: no label ever holds a turn's header
    from vocabdrift.sources.tokenizer import load_tokenizer

    tok = load_tokenizer(out)
    texts = [tok.decode(t) for t in trained]
    assert texts and all("<|im_start|>" not in t and "user" not in t for t in texts)
    assert any(t.endswith("<|im_end|>") for t in texts)
    base, post = _weights(tiny_base), _weights(out)
    assert np.array_equal(base["model.embed_tokens.weight"], post["model.embed_tokens.weight"])  # frozen
    assert not np.array_equal(base["lm_head.weight"], post["lm_head.weight"])
    again = sft(tiny_base, records, out=tmp_path / "b", steps=3, batch_size=4, freeze=["embed"],
                replay=[{"text": "replayed pre-training text"}], replay_ratio=0.2, progress=False)
    assert all(np.array_equal(v, _weights(again)[k]) for k, v in post.items())  # deterministic for a seed
    with pytest.raises(VocabdriftError, match="already exists"):
        sft(tiny_base, records, out=out, steps=1, progress=False)
    with pytest.raises(VocabdriftError, match="neither"):
        sft(tiny_base, [{"prompt": "x"}], out=tmp_path / "c", steps=1, progress=False)
    assert not (tmp_path / "c").exists()


def test_cpu_sft_scores_only_trained_positions_with_the_same_loss_and_gradients(tiny_base: Path, monkeypatch) -> None:
    import torch
    import trl.trainer.utils as tu
    from transformers import AutoModelForCausalLM

    from vocabdrift.composites.train import _fast, encode_records, score_trained_positions_only

    tok = _fast(tiny_base)
    rows = encode_records(tok, build_corpus(docs=10, sft=6, seed=2, name_every=0).sft, max_length=256)
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [tok.pad_token_id] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    trained = int((labels[:, 1:] != -100).sum())
    assert 0 < trained < len(rows) * (width - 1) // 2  # prompts and padding are most of the batch

    def loss_and_grads(fused: bool) -> tuple[float, list]:
        m = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        if fused:
            tu.add_fused_lm_head(m)
        loss = m(input_ids=ids, attention_mask=mask, labels=labels, **({"fused_lm_head": True} if fused else {})).loss
        loss.backward()
        return loss.item(), [p.grad for p in m.parameters()]

    scored: list[int] = []
    real = tu._ChunkedLogProbFunction

    class Counting:  # the rows TRL projects through lm_head
        @staticmethod
        def apply(hidden, *args):
            scored.append(hidden.shape[0])
            return real.apply(hidden, *args)

    monkeypatch.setattr(tu, "_ChunkedLogProbFunction", Counting)
    ref_loss, ref_grads = loss_and_grads(fused=False)  # transformers' own loss over the full logits
    loss_and_grads(fused=True)
    assert scored == [len(rows) * (width - 1)]  # TRL on a CPU, left alone: every position
    with score_trained_positions_only():
        loss, grads = loss_and_grads(fused=True)
    assert scored[1:] == [trained]  # ours: the trained positions only (fails if TRL renames what it patches)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert not tu._use_triton(torch.device("cpu"))  # restored


def test_eval_loss_equals_the_models_own_loss(tiny_base: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from vocabdrift.composites.train import _fast, encode_records, eval_loss

    records = build_corpus(docs=10, sft=12, seed=2, name_every=0).sft
    got = eval_loss(tiny_base, records, batch_size=5)  # padded batches of unequal rows
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    total = count = 0.0
    with torch.no_grad():
        for row in encode_records(_fast(tiny_base), records, max_length=256):  # one row at a time, no padding
            n = sum(t != -100 for t in row["labels"][1:])
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
            total, count = total + float(loss) * n, count + n
    assert got == pytest.approx(total / count, rel=1e-5)


# ---- stages run side by side -------------------------------------------------------------------------------------

def _stages(out: Path):
    from vocabdrift.composites.lab import QUICK, _Stages

    return _Stages(out, QUICK, 0, progress=False)


def _whoami(name: str):
    def go(progress: bool) -> dict:
        import os

        import torch

        return {"who": {name: [os.getpid(), torch.get_num_threads()]}}
    return name, go, f"stage {name}"


def test_side_by_side_chains_run_in_single_thread_workers_and_each_stage_is_recorded(tmp_path: Path) -> None:
    import os

    st = _stages(tmp_path)
    chains = [[_whoami("a1"), _whoami("a2")], [_whoami("b1")], [_whoami("c1")]]
    st.run_side_by_side(chains)
    who = st.state["who"]
    assert set(who) == {"a1", "a2", "b1", "c1"} and all(st.done(k) for k in who)
    pids = {k: v[0] for k, v in who.items()}
    assert os.getpid() not in pids.values() and all(v[1] == 1 for v in who.values())
    assert pids["a1"] == pids["a2"] and len({pids["a1"], pids["b1"], pids["c1"]}) == 3  # a chain per worker
    assert json.loads((tmp_path / "lab.json").read_text())["who"] == who  # saved as each stage ended

    def never(progress: bool) -> None:
        raise AssertionError("a finished stage ran again")

    _stages(tmp_path).run_side_by_side([[("a1", never, "x"), ("a2", never, "x")], [("b1", never, "x")]])


def test_a_chain_beside_runs_in_a_worker_while_this_process_does_its_own_work(tmp_path: Path) -> None:
    """run_beside: the corpus chain in a worker while the lab imports torch and transformers here, at once."""
    import os
    import time

    def slow(name: str) -> tuple:
        def go(progress: bool) -> dict:
            t = time.time()
            time.sleep(1.0)
            return {"when": {name: [os.getpid(), t, time.time()]}}
        return name, go, f"stage {name}"

    here: list[float] = []

    def meanwhile() -> None:
        here.append(time.time())
        time.sleep(1.0)
        here.append(time.time())

    st = _stages(tmp_path)
    st.run_beside([slow("a"), slow("b")], meanwhile=meanwhile)
    when = st.state["when"]
    assert st.done("a") and st.done("b") and when["a"][0] == when["b"][0] != os.getpid()
    assert len(here) == 2 and here[0] < when["a"][2] and when["a"][1] < here[1]  # the two overlapped in time
    assert json.loads((tmp_path / "lab.json").read_text())["when"] == when

    def never() -> None:
        raise AssertionError("nothing is left to overlap with")

    _stages(tmp_path).run_beside([slow("a"), slow("b")], meanwhile=never)  # a finished chain: neither runs


def test_side_by_side_with_progress_prints_each_stage(tmp_path: Path, capsys) -> None:
    from vocabdrift.composites.lab import QUICK, _Stages

    st = _Stages(tmp_path, QUICK, 0, progress=True)
    st.run_side_by_side([[_whoami("a1"), _whoami("a2")], [_whoami("b1")]])
    err = capsys.readouterr().err
    assert "→ stage a1, then stage a2 …" in err and "→ stage b1 …" in err
    assert all(f"✓ stage {k}" in err for k in ("a1", "a2", "b1"))
    assert st._console is None  # the live display is gone


def test_a_failing_worker_gives_one_clear_error_and_keeps_the_finished_stages(tmp_path: Path) -> None:
    import os

    def fail(progress: bool) -> None:
        raise VocabdriftError("corpus.jsonl: line 3 is not JSON")

    def crash(progress: bool) -> None:
        _ = 1 / 0

    def die(progress: bool) -> None:
        os._exit(9)

    st = _stages(tmp_path)
    with pytest.raises(VocabdriftError, match="line 3 is not JSON"):
        st.run_side_by_side([[_whoami("a"), ("bad", fail, "bad")], [_whoami("b")]])
    assert st.done("a") and st.done("b") and not st.done("bad")
    assert set(json.loads((tmp_path / "lab.json").read_text())["stages"]) == {"a", "b"}  # a rerun resumes
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        st.run_side_by_side([[("crash", crash, "crash")], [_whoami("c")]])
    with pytest.raises(VocabdriftError, match="exit code 9"):
        st.run_side_by_side([[("die", die, "die")], [_whoami("d")]])
    assert st.done("c") and st.done("d") and not st.done("crash") and not st.done("die")


@pytest.mark.slow
def test_sfts_side_by_side_equal_the_same_sfts_one_after_the_other(tiny_base: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Forking is a matter of speed only: on one core (or a GPU) the lab runs the chains here, with equal numbers.
    A forked SFT reports its steps to the parent's live line."""
    import contextlib

    from vocabdrift.composites.lab import _steps_to_parent
    from vocabdrift.composites.train import sft

    records = build_corpus(docs=10, sft=40, seed=1, name_every=0).sft

    def train(root: Path, seed: int):
        def go(progress: bool) -> None:
            sft(tiny_base, records, out=root / f"m{seed}", steps=4, batch_size=4, seed=seed, progress=False,
                callbacks=[_steps_to_parent()])
        return f"sft{seed}", go, f"sft {seed}"

    shown: list[tuple] = []

    @contextlib.contextmanager
    def board(self):  # the live display, recorded
        yield lambda key, what, steps=None: shown.append((key, what, steps))

    forked, here = tmp_path / "forked", tmp_path / "here"
    for root in (forked, here):
        root.mkdir()
    with monkeypatch.context() as m:
        m.setattr("vocabdrift.composites.lab._Stages._board", board)
        _stages(forked).run_side_by_side([[train(forked, 0)], [train(forked, 1)]])
    steps = {}
    for key, _, st in shown:
        if st is not None:
            steps.setdefault(key, []).append(st)
    assert len(steps) == 2 and all(v == [(k, 4) for k in range(1, 5)] for v in steps.values())  # each worker's
    monkeypatch.setattr("vocabdrift.composites.lab.usable_cpus", lambda: 1)
    _stages(here).run_side_by_side([[train(here, 0)], [train(here, 1)]])
    for seed in (0, 1):
        a, b = _weights(forked / f"m{seed}"), _weights(here / f"m{seed}")
        assert all(np.array_equal(v, b[k]) for k, v in a.items()), seed
    assert not np.array_equal(_weights(forked / "m0")["lm_head.weight"], _weights(forked / "m1")["lm_head.weight"])


# ---- the quick lab ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_lab_cli(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    """`vocabdrift lab -o OUT --quick` as a user runs it into a log (stdout and stderr are pipes), with a progress
    line at every step: (OUT, exit code, stdout, stderr). A process of its own: the lab's forked workers write to
    the real stderr."""
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("lab") / "out"
    p = subprocess.run([sys.executable, "-m", "vocabdrift.cli", "lab", "-o", str(out), "--quick"],
                       capture_output=True, text=True, env={**os.environ, "VOCABDRIFT_PROGRESS_EVERY": "0"},
                       timeout=900)
    return out, p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def quick_lab(quick_lab_cli: tuple[Path, int, str, str]):
    """The quick lab's result through the Python API: every stage was run by the command above, so this reads."""
    from vocabdrift.composites.lab import lab

    return lab(quick_lab_cli[0], quick=True, progress=False)


@pytest.mark.slow
def test_quick_lab_off_a_terminal_says_its_progress_in_lines_and_its_result_in_json(quick_lab_cli, quick_lab,
                                                                                    cli) -> None:
    out, code, stdout, stderr = quick_lab_cli
    assert code == 0, stderr[-2000:]
    assert stdout.rstrip().splitlines()[-1].startswith("Report: ")  # the last line names the report
    code, js, _ = cli("lab", "-o", out, "--quick", "--json")  # every stage cached: the same result, as JSON
    assert code == 0
    got = json.loads(js)  # JSON alone on stdout
    assert got["verdict"] == quick_lab.verdict and got["verdict"]
    assert Path(got["report"]).is_file() and Path(got["table"]) == out / "lab.md"
    assert got["results"]["baseline"]["probe"] == quick_lab.results["baseline"]["probe"]
    # the comparison page opens with the same verdict, regressions flagged in red
    md = Path(got["report"]).with_suffix(".md").read_text().replace("\\", "")  # Markdown's escapes (-\\>)
    assert md.index("## Verdict") < md.index("## Comparing runs")
    for line in quick_lab.verdict:
        assert line in md
    html = Path(got["report"]).read_text()
    for line in quick_lab.verdict:
        if line.startswith("REGRESSION"):
            assert '<p class="bad">' + line.split(":")[0] in html
    # a log gets plain lines: every stage started and finished, the steps of pre-training and of the SFT chains
    assert "\x1b[" not in stderr and "━" not in stderr  # no escape codes, no bars
    lines = stderr.splitlines()
    assert any(x.startswith("→ pre-training a tiny Llama") for x in lines)
    assert any(x.startswith("✓ pre-training a tiny Llama") for x in lines)
    assert any(x.startswith("pre-training: ") for x in lines)
    assert any(x.strip().startswith("SFT baseline") and ": step " in x for x in lines)
    # the forked workers' own lines (probe, cases), each on its own line and named by its chain
    assert any(x.startswith("  baseline: probing: ") for x in lines), stderr[-3000:]
    assert any(x.startswith("  repaired: probing: ") for x in lines), stderr[-3000:]
    assert all(x.count("probing: ") <= 1 for x in lines)


def _share(m: dict, cat: str) -> float:
    v = m["languages"][cat]
    return v["below_0.95"] / v["tokens"]


@pytest.mark.slow
def test_quick_lab_reproduces_drift_and_repair(quick_lab) -> None:
    b, r = quick_lab.results["baseline"], quick_lab.results["repaired"]
    # scarce SFT languages drift far more than English
    for cat in SCARCE:
        assert _share(b, cat) > 0.3 and _share(b, cat) > 3 * _share(b, "latin"), cat
    # the repair: higher mean, each scarce language's share at most half, higher minimum over reachable tokens
    assert r["mean_cos"] > b["mean_cos"]
    for cat in SCARCE:
        assert _share(r, cat) <= 0.5 * _share(b, cat), cat
    assert r["min_cos_reachable"] > b["min_cos_reachable"]
    assert b["unreachable"] == r["unreachable"] > 0  # reported apart, the same tokens in both runs
    # the planted token: its output row is among the 10% most drifted, its input row barely moved
    p = b["planted"]
    assert p["lm_head_rank"] <= 0.1 * p["of"]
    assert p["embed_cos"] > 0.99
    # the baseline can no longer say it (probe: LOST); the coverage set brings its row back, and the model says it
    assert b["probe"]["tokens"] == r["probe"]["tokens"] > 1
    assert p["token_id"] in b["probe"]["lost"]
    assert p["token_id"] not in r["probe"]["lost"]
    assert r["planted"]["lm_head_cos"] > p["lm_head_cos"] + 0.05
    # both SFTs learned the task: held-out SFT conversations cost far less than before SFT
    for m in (b, r):
        assert m["heldout_loss"] < 0.75 * m["heldout_loss_base"]
    # the demo says what it found: lab.md opens with the verdict, each regression of the repaired model flagged
    v = quick_lab.verdict
    assert v[0].startswith("Drift reproduced: after SFT") and quick_lab.table.startswith("## Verdict\n")
    assert any(x.startswith("The planted name") and "lost after SFT, sayable after the repair" in x for x in v)
    worse = r["heldout_loss"] > b["heldout_loss"]
    assert worse == any(x.startswith("REGRESSION of the repaired model: held-out SFT loss") for x in v)


def test_lab_verdict_flags_regressions_and_measurements_without_signal() -> None:
    from vocabdrift.composites.lab import lab_verdict

    def run(below: int, loss: float, emb: float, hits: int, passed: int, top1: int) -> dict:
        return {"below": {"0.95": below, "0.90": 0, "tokens": 1000},
                "languages": {"japanese": {"tokens": 100, "below_0.95": below // 10}, "latin": {"tokens": 900,
                                                                                              "below_0.95": 10}},
                "planted": {"token_id": 7}, "probe": {"lost": [], "headline": {"tokens": {
                    "top1": {"base": top1, "post": top1}}}},
                "cases": {"passed": passed, "total": 10}, "heldout_loss": loss, "embed_min_cos": emb,
                "confusion": {"results": [{"language": "ja", "prompt": "富士山とは？", "name": "fuji", "hits": hits,
                                           "n": 100, "rate": hits / 100}]}}

    v = lab_verdict({"baseline": run(300, 1.0, 0.9, 10, 0, 0), "repaired": run(20, 1.2, 0.6, 30, 0, 0)})
    assert v[0] == ("Drift reproduced: after SFT 300 of 1,000 lm_head rows (30.0%) fell below 0.95, japanese worst "
                    "(30.0%); the coverage repair leaves 20 of 1,000.")
    assert "No signal: the probe's top-1 answers are 0 in every model (read its nucleus counts)." in v
    assert "No signal: the qualitative cases pass 0/10 for both models." in v
    regress = [x for x in v if x.startswith("REGRESSION")]
    assert len(regress) == 3 and "held-out SFT loss 1.000 -> 1.200 (+20.0%)" in regress[0]
    assert "minimum embedding cosine 0.900 -> 0.600" in regress[1] and "10% -> 30%" in regress[2]
    calm = lab_verdict({"baseline": run(300, 1.0, 0.9, 10, 2, 5), "repaired": run(20, 0.9, 0.9, 10, 3, 5)})
    assert calm[-1].startswith("No regression") and not any(x.startswith("No signal") for x in calm)


@pytest.mark.slow
def test_quick_lab_measures_the_published_confusion(quick_lab) -> None:
    """The published prompts (two Japanese, one Korean), answered by the baseline in their language; every answer
    saved; the rate, its interval, the scripts and Fisher's test in the table."""
    from vocabdrift.analyses.confusion import fisher_test, is_native, offending_scripts
    from vocabdrift.api.probe import read_confusion_prompts
    from vocabdrift.composites.lab import QUICK
    from vocabdrift.outputs.run import Run

    out = quick_lab.out
    published = [(p.language, p.prompt) for p in read_confusion_prompts()]
    for name in ("baseline", "repaired"):
        res = quick_lab.results[name]["confusion"]["results"]
        assert [(x["language"], x["prompt"]) for x in res] == published
        rows = Run(out / name).read_jsonl("confusion.jsonl")
        assert len(rows) == len(published) * QUICK.confusion_n
        for x in res:  # the summary's counts are the saved answers' counts
            mine = [a for a in rows if a["prompt"] == x["prompt"]]
            assert [a["sample"] for a in mine] == list(range(QUICK.confusion_n))
            assert x["hits"] == sum(bool(offending_scripts(a["text"], x["language"])) for a in mine)
            assert x["native"] == sum(is_native(a["text"], x["language"]) for a in mine)
            assert x["ci_low"] <= x["rate"] <= x["ci_high"]
    # the recipe's point: the baseline answers the Japanese prompts mostly in Japanese (not in English tool calls)
    ja = [x for x in quick_lab.results["baseline"]["confusion"]["results"] if x["language"] == "ja"]
    assert sum(x["native"] for x in ja) > 0.6 * sum(x["n"] for x in ja)
    ko = [x for x in quick_lab.results["baseline"]["confusion"]["results"] if x["language"] == "ko"]
    assert sum(x["native"] for x in ko) > 0.35 * sum(x["n"] for x in ko)  # Korean: about half (LAB.md)
    # ... while most Japanese, Korean, Russian and Arabic tokens are never a target of the SFT data
    cov = Run(out / "baseline").read_table("coverage.parquet")
    vocab = Run(out / "baseline").read_table("vocab.parquet")
    count = dict(zip(cov.column("token_id").to_pylist(), cov.column("count").to_pylist(), strict=True))
    cats = vocab.column("category").cast("string").to_pylist()
    for cat in SCARCE:
        ids = [i for i, c in enumerate(cats) if c == cat]
        assert sum(count.get(i, 0) == 0 for i in ids) > 0.5 * len(ids), cat
    # the table: each prompt's rate with its interval, and Fisher's test of repaired against baseline
    table = (out / "lab.md").read_text()
    b, r = (quick_lab.results[k]["confusion"]["results"] for k in ("baseline", "repaired"))
    for x, y in zip(b, r, strict=True):
        p = fisher_test(y["hits"], y["n"], x["hits"], x["n"])[1]
        assert f"{y['hits']}/{y['n']} ({100 * y['rate']:.0f}%, {100 * y['ci_low']:.0f}-" in table
        assert (f"Fisher p {p:.2g}" if p >= 1e-4 else f"Fisher p {p:.1e}") in table
    assert "mostly in kana/kanji" in table


@pytest.mark.slow
def test_quick_lab_writes_normal_models_and_run_folders(quick_lab) -> None:
    from safetensors.numpy import load_file

    out = quick_lab.out
    for name in ("base", "baseline", "repaired"):
        assert (out / "models" / name / "model.safetensors").exists()
        assert (out / "models" / name / "tokenizer.json").exists()
    for name in ("baseline", "repaired"):
        summary = json.loads((out / name / "summary.json").read_text())
        for key in ("overall", "categories", "coverage", "probe", "cases", "confusion"):
            assert key in summary, (name, key)
        assert "correlation" in summary["coverage"]
    from vocabdrift.outputs.run import comparison_files

    # the lab's report compares the two runs; it sits beside the baseline's own report, named for both
    assert (out / "baseline" / comparison_files("baseline", "repaired")[0]).exists()
    assert (out / "lab.md").read_text() == quick_lab.table
    # the run folder's cosines agree with an independent numpy computation from the checkpoints
    import pyarrow.parquet as pq

    base = load_file(out / "models" / "base" / "model.safetensors")["lm_head.weight"]
    post = load_file(out / "models" / "baseline" / "model.safetensors")["lm_head.weight"]
    cos = (base * post).sum(1) / (np.linalg.norm(base, axis=1) * np.linalg.norm(post, axis=1))
    drift = pq.read_table(out / "baseline" / "drift.parquet")
    np.testing.assert_allclose(drift.column("lm_head_cos").to_numpy(), cos[drift.column("token_id").to_numpy()],
                               atol=1e-5)


@pytest.mark.slow
def test_quick_lab_rerun_resumes_and_guards_its_settings(quick_lab) -> None:
    from vocabdrift.composites.lab import lab

    out = quick_lab.out
    stamp = (out / "models" / "base" / "model.safetensors").stat().st_mtime_ns
    again = lab(out, quick=True, progress=False)
    assert (out / "models" / "base" / "model.safetensors").stat().st_mtime_ns == stamp  # nothing retrained
    assert again.results == quick_lab.results
    assert again.timings == quick_lab.timings  # no stage ran again, the held-out losses (kept in lab.json) included
    with pytest.raises(VocabdriftError, match="other settings"):
        lab(out, quick=True, seed=1, progress=False)


@pytest.mark.slow
def test_quick_lab_compares_the_remedies(quick_lab) -> None:
    """baseline, +coverage, +replay, +anchor, +gate and +coverage5 in one table, each trained by `repair`."""
    from vocabdrift.composites.lab import lab
    from vocabdrift.composites.repair import count_tokens
    from vocabdrift.sources.tokenizer import load_tokenizer

    out = quick_lab.out
    stamp = (out / "models" / "baseline" / "model.safetensors").stat().st_mtime_ns
    r = lab(out, quick=True, remedies=True, progress=False)
    assert (out / "models" / "baseline" / "model.safetensors").stat().st_mtime_ns == stamp  # the SFTs are reused
    assert list(r.remedies) == ["baseline", "+coverage", "+replay", "+anchor", "+gate", "+coverage5"]
    assert r.remedies["baseline"] == quick_lab.results["baseline"] | {"extra_tokens": 0}
    lines = (out / "remedies.md").read_text().splitlines()
    lines = lines[: lines.index("")]  # the drift table; the confusion table follows
    assert len(lines) == 2 + 6 and lines[2].startswith("| baseline |") and "held-out SFT loss" in lines[0]
    for m in r.remedies.values():  # each way's task loss, measured on the same held-out conversations
        assert 0 < m["heldout_loss"] < m["heldout_loss_base"]
    b = r.remedies["baseline"]
    for name in ("+coverage", "+replay", "+anchor", "+gate", "+coverage5"):  # each keeps lm_head closer to base
        assert r.remedies[name]["mean_cos"] > b["mean_cos"], name
        for cat in SCARCE:
            assert _share(r.remedies[name], cat) < _share(b, cat), (name, cat)
    # what each costs: the anchor and the gate add no data; coverage and replay add their tokens
    tok = load_tokenizer(out / "models" / "base")
    cov = [json.loads(line) for line in (out / "data" / "coverage.jsonl").read_text().splitlines()]
    from vocabdrift.composites.lab import QUICK

    sft = (out / "data" / "sft.jsonl").read_text().splitlines()
    passes = QUICK.sft_steps * QUICK.sft_batch / (len(sft) + len(cov))  # target tokens drawn, as repair counts them
    assert r.remedies["+coverage"]["extra_tokens"] == round(count_tokens(cov, tok) * passes) > 0
    assert r.remedies["+replay"]["extra_tokens"] > 0
    assert 0 < r.remedies["+coverage5"]["extra_tokens"] < r.remedies["+coverage"]["extra_tokens"]
    assert r.remedies["+anchor"]["extra_tokens"] == r.remedies["+gate"]["extra_tokens"] == 0
    for name in ("replay", "anchor", "gate", "coverage5"):  # each a normal run folder with the model repair trained
        summary = json.loads((out / "remedies" / name / "summary.json").read_text())
        assert summary["repair"]["remedies"]["gate"] == (name == "gate")
        assert (out / "remedies" / name / "model" / "model.safetensors").exists()
        assert "probe" in summary and "confusion" in summary
        assert (out / "remedies" / name / "confusion.jsonl").exists()
    # the confusion table: every way of training on every published prompt, Fisher against the baseline
    conf = (out / "remedies.md").read_text().split("Language confusion, as published:")[1]
    assert sum(line.startswith("| ") for line in conf.splitlines()) == 2 + 3 * 6  # header, rule, 3 prompts x 6


def test_cli_lab_refuses_a_file_a_model_folder_and_a_users_folder_for_out(tmp_path: Path, cli) -> None:
    from factory import make_llama

    f = tmp_path / "notafolder"
    f.write_text("x")
    code, out, err = cli("lab", "-o", f, "--quick")
    assert code == 2 and err.strip().splitlines() == [f"vocabdrift: error: -o {f}: exists and is not a folder; "
                                                      "pick another -o"]
    model = make_llama(tmp_path / "model")
    code, out, err = cli("lab", "-o", model / "lab", "--quick")
    assert code == 2 and "inside the model folder" in err and not (model / "lab").exists()
    mine = tmp_path / "project"
    (mine / "src").mkdir(parents=True)
    code, out, err = cli("lab", "-o", mine, "--quick")
    assert code == 2 and "not a vocabdrift lab folder" in err and sorted(p.name for p in mine.iterdir()) == ["src"]
    code, out, err = cli("lab", "-o", tmp_path / "x", "--quick", "--large")
    assert code == 2 and "exclude each other" in err and not (tmp_path / "x").exists()


def test_cli_lab_interrupted_says_so_in_one_line_and_keeps_the_finished_stages(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "lab"
    # SIGINT back to its default in the child: a runner started in the background (nohup, `&` in a script) ignores
    # it, and a process that inherits SIG_IGN keeps ignoring it, so Python would never raise KeyboardInterrupt
    p = subprocess.Popen([sys.executable, "-m", "vocabdrift.cli", "lab", "-o", str(out), "--quick"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    def corpus_done() -> bool:  # lab.json is written at the start; its stages say what has finished
        try:
            return "corpus" in json.loads((out / "lab.json").read_text())["stages"]
        except (OSError, ValueError, KeyError):
            return False

    while not corpus_done() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first stage (the corpus) has ended: the lab is under way
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130
    assert err.strip().splitlines()[-1] == "vocabdrift: interrupted" and "Traceback" not in err
    stages = json.loads((out / "lab.json").read_text())["stages"]
    assert "corpus" in stages and "base" not in stages  # a rerun resumes after the corpus
    assert not (out / "models" / "base").exists()


def test_the_default_recipe_trains_the_quick_models() -> None:
    """The quick test's assertions are about the models the default (`make demo`) trains too."""
    from dataclasses import asdict

    from vocabdrift.composites.lab import DEFAULT, LARGE, QUICK

    analysis_only = {"probe_top", "confusion_n"}
    d, q = asdict(DEFAULT), asdict(QUICK)
    assert {k for k in d if d[k] != q[k]} == analysis_only
    assert DEFAULT.probe_top > QUICK.probe_top and LARGE.vocab_size > DEFAULT.vocab_size
