"""How a model is asked: the one small interface every engine implements.

An engine scores a target token given a prompt (its log-probability, its rank among all tokens, and whether
top-p sampling would keep it) and samples answers. Prompts to `score` are token ids, already templated, so the
tested token never goes through text; prompts to `generate` are user messages (the engine applies the model's chat
template, or sends them as chat messages to a server).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..analyses.probe import TOP_P, Score

__all__ = ["TOP_P", "Engine", "Score", "open_engine"]


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
    """The factory's earlier signature (kept for callers of `engines.base.open_engine`); see `engines.open_engine`."""
    from . import open_engine as factory

    return factory(engine, model, endpoint=endpoint, device=device, trust_remote_code=trust_remote_code,
                   api_key=api_key, served_model=served_model, tokenizer=tokenizer)
