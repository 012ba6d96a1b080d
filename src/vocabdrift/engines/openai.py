"""An OpenAI-compatible HTTP server as an engine: vLLM, SGLang, llama.cpp's server, `transformers serve`.

Generation uses /v1/chat/completions, one request per sample (each with its own seed, so a run is repeatable on
servers that honour seeds, and servers without `n` work too). Scoring uses /v1/completions with the prompt as token
ids, one generated token and its top logprobs; a server that returns no logprobs gives a clear error.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..analyses.probe import TOP_P, Score
from ..errors import VocabdriftError, need_extra

log = logging.getLogger(__name__)
TOP_LOGPROBS = 20


MAX_RESPONSE_BYTES = 64 << 20  # one answer of logprobs or text: far below this


class OpenAIEngine:
    """A client of an OpenAI-compatible server.

    Args:
        endpoint: the server's base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is optional).
        model: the model name to send (what the server lists under /v1/models).
        tokenizer: the model's tokenizer (folder or file), needed to name targets in logprobs and to decode.
        concurrency: requests in flight at once while sampling.
        timeout: seconds allowed per request.
    """

    def __init__(self, endpoint: str, *, model: str, api_key: str | None = None, tokenizer: Any = None,
                 concurrency: int = 4, timeout: float = 300.0) -> None:
        httpx = need_extra("httpx", "openai", "the OpenAI-compatible engine")

        base = endpoint.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.model = str(model)
        self.name = self.model.rstrip("/").split("/")[-1] or self.model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = float(timeout)
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), headers=headers)
        self.concurrency = max(1, concurrency)
        self._tok_spec = tokenizer
        self._tok: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tok is None:
            if self._tok_spec is None:
                raise VocabdriftError(f"scoring through {self.base} needs the model's tokenizer; pass --tokenizer "
                                      "(a folder or tokenizer.json)")
            if isinstance(self._tok_spec, str):
                from ..sources.tokenizer import load_tokenizer

                self._tok = load_tokenizer(self._tok_spec)
            else:
                self._tok = self._tok_spec
        return self._tok

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """(status, body) read in chunks, at most MAX_RESPONSE_BYTES and `timeout` seconds in all: a server that
        streams without end, or drips a byte a minute, is one clear error, not a process that grows or waits."""
        import time

        import httpx

        deadline = time.monotonic() + self.timeout
        try:
            with self._client.stream(method, url, json=body) as r:
                got = bytearray()
                for chunk in r.iter_bytes():
                    got += chunk
                    if len(got) > MAX_RESPONSE_BYTES:
                        raise VocabdriftError(f"{url}: the answer is larger than {MAX_RESPONSE_BYTES >> 20} MiB; "
                                              "is this an OpenAI-compatible server?")
                    if time.monotonic() > deadline:
                        raise VocabdriftError(f"{url}: the answer took more than {self.timeout:g} s; raise the "
                                              "timeout or check the server")
                return r.status_code, bytes(got)
        except httpx.HTTPError as e:
            raise VocabdriftError(f"{url}: request failed ({type(e).__name__}: {e}); is the server running?") from e

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.base + path
        status, raw = self._request("POST", url, body)
        text = raw.decode("utf-8", errors="replace")
        if status >= 400:
            detail = text[:300].replace("\n", " ")
            raise VocabdriftError(f"{url}: HTTP {status}: {detail}")
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError, ValueError) as e:
            raise VocabdriftError(f"{url}: the answer is not JSON ({text[:200]!r})") from e

    def models(self) -> list[str]:
        """Model names the server lists."""
        url = self.base + "/models"
        status, raw = self._request("GET", url)
        try:
            if status >= 400:
                raise ValueError(f"HTTP {status}")
            return [m["id"] for m in json.loads(raw).get("data", [])]
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise VocabdriftError(f"{url}: could not list models ({e})") from e

    # ---- generation ---------------------------------------------------------------------------------------
    def _one(self, message: str, temperature: float, top_p: float, max_tokens: int, seed: int) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": message}], "max_tokens": max_tokens,
                "temperature": temperature, "seed": seed, "stream": False}
        if temperature > 0 and top_p < 1.0:
            body["top_p"] = top_p
        res = self._post("/chat/completions", body)
        try:
            return res["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise VocabdriftError(f"{self.base}/chat/completions: unexpected answer {str(res)[:200]}") from e

    def generate(self, prompts: Sequence[str], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 128, seed: int = 0) -> list[list[str]]:
        """`n` answers per user message; sample j of prompt i is sent with seed `seed + j`."""
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            texts = list(pool.map(lambda ij: self._one(prompts[ij[0]], temperature, top_p, max_tokens,
                                                       seed + ij[1]), jobs))
        out: list[list[str]] = [[] for _ in prompts]
        for (i, _), t in zip(jobs, texts, strict=True):
            out[i].append(t)
        return out

    # ---- scoring ------------------------------------------------------------------------------------------
    def _target_key(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def score(self, prompts: Sequence[Sequence[int]], targets: Sequence[int], *, top_p: float = TOP_P
              ) -> list[Score]:
        """Score each target from the server's top logprobs of the next token.

        Exact when the target is among the top TOP_LOGPROBS; otherwise its rank is reported as TOP_LOGPROBS + 1
        and its logprob as the smallest logprob returned (an upper bound), and it counts as outside top-p: certain
        when the listed tokens hold top_p of the mass, a conservative call when they do not (a flat distribution).
        vLLM in-process (`VLLMEngine`) asks again in that case and is exact.
        """
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda pt: self._score_one(pt[0], pt[1], top_p), zip(prompts, targets, strict=True)))

    def _score_one(self, prompt: Sequence[int], target: int, top_p: float) -> Score:
        body = {"model": self.model, "prompt": [int(x) for x in prompt], "max_tokens": 1, "temperature": 0.0,
                "logprobs": TOP_LOGPROBS, "return_tokens_as_token_ids": True}
        try:
            res = self._post("/completions", body)
        except VocabdriftError as e:
            raise VocabdriftError(f"{e}; scoring needs a server that takes token-id prompts and returns logprobs "
                                  "(vLLM, SGLang, llama.cpp), or probe the model locally without --endpoint") from e
        try:
            lp = res["choices"][0].get("logprobs") or {}
            top = (lp.get("top_logprobs") or [None])[0]
        except (KeyError, IndexError, TypeError, AttributeError):
            top = None
        if not top:
            raise VocabdriftError(f"{self.base}/completions returned no logprobs; scoring needs a server that "
                                  "returns them (vLLM, SGLang, llama.cpp), or probe the model locally without "
                                  "--endpoint")
        items = sorted(top.items(), key=lambda kv: -kv[1])
        want_id, want_text = f"token_id:{int(target)}", None
        for j, (key, logprob) in enumerate(items):
            if key.startswith("token_id:"):
                hit = key == want_id
            else:  # a server that names tokens by text
                want_text = want_text if want_text is not None else self._target_key(int(target))
                hit = key == want_text
            if hit:
                above = sum(math.exp(v) for _, v in items[:j] if v > logprob)
                return Score(float(logprob), j + 1, j == 0 or above < top_p, top_p, float(above))
        return Score(float(items[-1][1]), len(items) + 1, False, top_p)
