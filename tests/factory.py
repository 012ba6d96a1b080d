"""Tiny real checkpoints for tests: saved with `transformers`/`safetensors`/`gguf`, read by the users' readers."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "TNT's leader is 马嘉祺. 马嘉祺 sings. 马嘉祺 dances.",
    "きちんと それほど 色々な 相続税 凄い 日本語の文章です。",
    "Привет, как дела? Всё хорошо, спасибо.",
    "안녕하세요 한국어 문장입니다.",
    "مرحبا بكم في العالم العربي",
    "def f(x):\n    return x + 1\n\nprint(f(2))",
    "<tool_call>{\"name\": \"search\", \"arguments\": {\"q\": \"weather\"}}</tool_call>",
    "$\\frac{a}{b} + \\alpha^{2}$ and 12345 numbers 67890",
]


def train_bpe(path: Path, vocab_size: int = 400, texts: Sequence[str] = TEXTS) -> Path:
    """A byte-level BPE trained on `texts`, saved as tokenizer.json (+ tokenizer_config.json) in `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) * 20, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": None,
        "model_max_length": 512}))
    return path / "tokenizer.json"


def make_llama(path: Path, *, vocab: int | None = None, hidden: int = 32, tied: bool = False, dtype: str = "bfloat16",
               shard: bool = False, seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    """A tiny LlamaForCausalLM saved with save_pretrained (optionally sharded), with a trained BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is None:
        train_bpe(path)
    else:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / f, path / f)
    n_tok = json.loads((path / "tokenizer.json").read_text())
    n_tok = len(n_tok["model"]["vocab"]) + len([a for a in n_tok["added_tokens"]
                                                 if a["content"] not in n_tok["model"]["vocab"]])
    cfg = LlamaConfig(vocab_size=vocab or n_tok, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=tied, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path, max_shard_size="40KB" if shard else "10GB")
    return path


def make_gpt2(path: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny GPT-2 (tied embeddings: only `transformer.wte.weight` is stored) with a trained BPE tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = train_bpe(path)
    n_tok = json.loads(tok.read_text())
    n_tok = len(n_tok["model"]["vocab"])
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=n_tok, n_embd=hidden, n_layer=1, n_head=2, n_positions=64))
    model.save_pretrained(path)
    return path


def plant_drift(src: Path, dst: Path, *, rows: dict[int, float], tensor_suffix: str, noise: float = 0.0,
                seed: int = 1) -> Path:
    """Copy a checkpoint folder and turn the given rows of one matrix toward a random direction.

    rows: {row id: mix} — the new row is (1 - mix) * old + mix * random of the same norm. Other rows of every
    matrix get `noise` relative Gaussian noise.
    """
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    for f in sorted(dst.glob("*.safetensors")):
        sd = load_file(str(f))
        for name, t in sd.items():
            if not name.endswith(tensor_suffix) or t.dim() != 2:
                continue
            x = t.float()
            if noise:
                x = x + noise * x.std() * torch.randn(x.shape, generator=g)
            for r, mix in rows.items():
                rnd = torch.randn(x.shape[1], generator=g)
                rnd = rnd / rnd.norm() * x[r].norm()
                x[r] = (1 - mix) * x[r] + mix * rnd
            sd[name] = x.to(t.dtype)
        save_file(sd, str(f), metadata={"format": "pt"})
    return dst


def read_matrix(folder_or_file: Path, name: str) -> np.ndarray:
    """An independent read of one tensor (whole) as float64 numpy, for reference computations."""
    from safetensors import safe_open

    files = [folder_or_file] if folder_or_file.is_file() else sorted(folder_or_file.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            if name in fh.keys():
                return fh.get_tensor(name).double().numpy()
    raise KeyError(name)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(args: Sequence[str], port: int, *, env: dict[str, str], name: str, timeout: float
                   ) -> Iterator[str]:
    """Start a real OpenAI-compatible server process, yield its URL once /health answers, stop it at the end."""
    import os
    import subprocess
    import time

    import httpx

    proc = subprocess.Popen(list(args), env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {proc.stderr.read().decode()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not come up within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def evict(path: Path) -> None:
    """Drop a file's clean pages from the page cache, so the next read comes from the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
