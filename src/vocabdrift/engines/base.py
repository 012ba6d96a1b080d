"""How a model is asked: the one small interface every engine implements.

An engine scores a target token given a prompt (its log-probability, its rank among all tokens, and whether
top-p sampling would keep it) and samples answers. Prompts to `score` are token ids, already templated, so the
tested token never goes through text; prompts to `generate` are user messages (the engine applies the model's chat
template, or sends them as chat messages to a server).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

TOP_P = 0.95


@dataclass(frozen=True)
class Score:
    """How a model rates one target token as the next token.

    Attributes:
        logprob: natural-log probability of the target.
        rank: 1 when the target is the most likely token; 1 + the number of tokens more likely than it.
        in_top_p: top-p sampling at `top_p` keeps the target (the tokens strictly more likely than it hold less
            than `top_p` of the mass; the most likely token is always kept, so top_p=0 is greedy).
        top_p: the nucleus used for `in_top_p`.
    """

    logprob: float
    rank: int
    in_top_p: bool
    top_p: float = TOP_P

    @property
    def p(self) -> float:
        import math

        return math.exp(self.logprob)


@runtime_checkable
class Engine(Protocol):
    """What `probe`, `cases`, `undertrained` and `confusion` need from a model."""

    name: str

    def score(self, prompts: Sequence[Sequence[int]], targets: Sequence[int], *, top_p: float = TOP_P
              ) -> list[Score]:
        """Score `targets[i]` as the token right after `prompts[i]` (token ids)."""
        ...

    def generate(self, prompts: Sequence[str], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 128, seed: int = 0) -> list[list[str]]:
        """`n` sampled answers (text) to each user message; temperature 0 means greedy."""
        ...

    def close(self) -> None:
        """Release what the engine holds (a server connection, GPU memory)."""
        ...


def open_engine(model: str, *, endpoint: str | None = None, engine: str | None = None, device: str | None = None,
                trust_remote_code: bool = False, api_key: str | None = None, served_model: str | None = None,
                tokenizer: str | None = None) -> Engine:
    """Open the engine for `model`: an OpenAI-compatible server when `endpoint` is given, vLLM in-process when
    `engine="vllm"`, else local `transformers`.

    Example:
        >>> eng = open_engine("runs/lab/models/post")
        >>> eng.generate(["Repeat this word three times: hello"], temperature=0)
    """
    from ..errors import VocabdriftError

    if endpoint:
        from .openai import OpenAIEngine

        return OpenAIEngine(endpoint, model=served_model or model, api_key=api_key,
                            tokenizer=tokenizer or (None if _looks_remote(model) else model))
    kind = engine or "hf"
    if kind == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(model, trust_remote_code=trust_remote_code)
    if kind in ("hf", "transformers"):
        from .hf import HFEngine

        return HFEngine(model, device=device, trust_remote_code=trust_remote_code)
    raise VocabdriftError(f"unknown engine {kind!r}; use hf (local transformers), vllm, or give --endpoint URL")


def _looks_remote(model: str) -> bool:
    from pathlib import Path

    return not Path(model).exists()
