"""vLLM in-process, when installed (`pip install 'vocabdrift[vllm]'`): the fastest engine on a GPU.

Scoring asks vLLM for the prompt's logprobs with the target appended (`prompt_logprobs`), which returns the target's
logprob and its rank among all tokens; top-p membership is judged from the returned top logprobs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from ..errors import VocabdriftError
from .base import TOP_P, Score

TOP_LOGPROBS = 20


class VLLMEngine:
    """A vLLM `LLM` in this process."""

    def __init__(self, model: str | os.PathLike, *, trust_remote_code: bool = False, **llm_kwargs: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise VocabdriftError("engine 'vllm' needs vLLM: pip install 'vocabdrift[vllm]' (GPU only), or use "
                                  "the default transformers engine") from e
        self.name = str(model).rstrip("/").split("/")[-1]
        self.llm = LLM(model=str(model), trust_remote_code=trust_remote_code, **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def close(self) -> None:
        self.llm = None

    def score(self, prompts: Sequence[Sequence[int]], targets: Sequence[int], *, top_p: float = TOP_P
              ) -> list[Score]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=TOP_LOGPROBS, temperature=0.0)
        reqs = [{"prompt_token_ids": [*map(int, p), int(t)]} for p, t in zip(prompts, targets, strict=True)]
        out = []
        for r, t in zip(self.llm.generate(reqs, params, use_tqdm=False), targets, strict=True):
            last = r.prompt_logprobs[-1]  # {token_id: Logprob(logprob, rank, decoded_token)} for the target position
            lp = last[int(t)]
            above = sum(math.exp(v.logprob) for k, v in last.items() if k != int(t) and v.logprob > lp.logprob)
            complete = len(last) > lp.rank  # every token above the target is listed
            kept = int(lp.rank) == 1 or (complete and above < top_p)  # samplers always keep the first choice
            out.append(Score(float(lp.logprob), int(lp.rank), bool(kept), top_p))
        return out

    def generate(self, prompts: Sequence[str], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 128, seed: int = 0) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_tokens, seed=seed)
        msgs = [[{"role": "user", "content": p}] for p in prompts]
        return [[c.text for c in r.outputs] for r in self.llm.chat(msgs, params, use_tqdm=False)]
