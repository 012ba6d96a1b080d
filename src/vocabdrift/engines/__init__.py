"""How a model is asked: `open_engine` is the only factory, and it takes every setting.

The concrete engines (`hf`, `openai`, `vllm`) are imported here only inside `open_engine`, and they import nothing
from this package: the shared types (`Score`, `TOP_P`) live below them in `analyses.probe`, and the interface they
implement (`Engine`) in `engines.base`, which imports no engine. So there is no import circle.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import VocabdriftError

if TYPE_CHECKING:
    from .base import Engine

KINDS = ("hf", "vllm", "openai")


def open_engine(kind: str | None, model: str | os.PathLike, *, batch_size: int = 64, device: str | None = None,
                dtype: str | None = None, endpoint: str | None = None, api_key: str | None = None,
                served_model: str | None = None, tokenizer: str | os.PathLike | None = None,
                trust_remote_code: bool = False, allow_pickle: bool = False) -> Engine:
    """Open the engine for `model`.

    Args:
        kind: "hf" (local `transformers`, the default for None; "transformers" is the same), "vllm" (in-process) or
            "openai" (an OpenAI-compatible server; implied by `endpoint`).
        model: a model folder, a .gguf file or a hub id (with `endpoint`: the served name, or a local folder whose
            tokenizer is used).
        batch_size: prompts per forward pass (hf).
        device, dtype: where and how a local model runs (hf).
        endpoint, api_key, served_model: the server (openai).
        tokenizer: the model's tokenizer, when MODEL does not hold it (a folder, a tokenizer.json, or a tokenizer
            object for hf).
        trust_remote_code: run the model's own code (off unless asked).
        allow_pickle: accept pickle weights (hf; off unless asked).

    Example:
        >>> eng = open_engine("hf", "runs/lab/models/post", batch_size=32)
        >>> eng.generate(["Repeat this word three times: hello"], temperature=0)
    """
    from ..sources.spec import parse_model_spec

    kind = "openai" if endpoint else (kind or "hf")
    if kind == "openai":
        if not endpoint:
            raise VocabdriftError("the openai engine needs --endpoint URL (an OpenAI-compatible server)")
        from .openai import OpenAIEngine

        if tokenizer is None:
            try:  # a local MODEL holds the tokenizer; a served name does not
                tokenizer = parse_model_spec(model).tokenizer_source()
                tokenizer = None if isinstance(tokenizer, str) else str(tokenizer)
            except VocabdriftError:
                tokenizer = None
        return OpenAIEngine(endpoint, model=served_model or str(model), api_key=api_key, tokenizer=tokenizer)
    if kind == "vllm":
        from .vllm import VLLMEngine

        ms = parse_model_spec(model)
        from ..sources.spec import check_weights_policy

        check_weights_policy(ms, allow_pickle=allow_pickle)
        return VLLMEngine(str(ms), trust_remote_code=trust_remote_code)
    if kind in ("hf", "transformers"):
        from .hf import HFEngine

        return HFEngine(model, device=device, dtype=dtype, batch_size=batch_size,
                        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, tokenizer=tokenizer)
    raise VocabdriftError(f"unknown engine {kind!r}; use hf (local transformers), vllm, or give --endpoint URL")
