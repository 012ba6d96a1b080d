"""The local `transformers` engine: CPU or CUDA, batched, with a shared-prefix KV cache.

A probe asks the same question of every token: only the token and the few template tokens after it differ. So the
common prefix of a batch (system prompt, chat header, instruction) goes through the model once; its key/value cache
is expanded over the batch, and each row runs only its own tail. On SmolLM2 that is about a fifth of the tokens.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..analyses.probe import TOP_P, Score
from ..errors import VocabdriftError
from ..sources.spec import check_weights_policy, parse_model_spec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def load_model(spec: str | os.PathLike, *, device: torch.device, dtype: torch.dtype,
               trust_remote_code: bool = False, allow_pickle: bool = False) -> Any:
    """An `AutoModelForCausalLM` from a folder, a .gguf file or a hub id, in eval mode on `device`.

    Pickle weights are refused unless `allow_pickle` (the policy of `sources.spec`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()  # our own bar reports progress; "Loading weights" bars would interleave with it
    ms = parse_model_spec(spec)
    check_weights_policy(ms, allow_pickle=allow_pickle)
    where, gguf = ms.pretrained_source()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    elif not allow_pickle:
        kwargs["use_safetensors"] = True  # a hub repository with pickle weights only is refused too
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise VocabdriftError(f"{spec}: could not load a causal language model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]}); pass a model folder with config.json and weights, "
                              "or a .gguf file") from e
    return model.to(device).eval()


SCORE_ROWS = 8  # rows of logits scored at a time: 8 x 152K float32 is 4.9 MB, near a core's cache (5.5x faster
# than the whole batch at once on a 49K vocabulary: bench/README)


def scores_from_logits(logits: torch.Tensor, targets: torch.Tensor, *, top_p: float = TOP_P) -> list[Score]:
    """Scores of `targets` (B,) under next-token `logits` (B, V), computed in float32.

    Rank and the top-p test compare logits, so ties and the sort that top-p sampling does agree: a target is kept
    by top-p when the tokens strictly more likely than it hold less than `top_p` of the probability mass, and the
    most likely token is always kept, as samplers do (so top_p=0 means greedy).
    """
    import torch

    lps, ranks, masses, broken = [], [], [], []
    for r in range(0, logits.shape[0], SCORE_ROWS):  # a few rows at a time: every pass stays in the CPU's cache
        x = logits[r:r + SCORE_ROWS].float()
        t_logit = x.gather(1, targets[r:r + SCORE_ROWS, None])  # (b, 1)
        top = x.amax(dim=1, keepdim=True)
        e = (x - top).exp_()  # the softmax's numerator, once: its sum, and its sum above the target
        z = e.sum(dim=1)
        above = x > t_logit
        ranks.append(above.sum(dim=1) + 1)
        masses.append(e.mul_(above).sum(dim=1) / z)
        lps.append(t_logit[:, 0] - top[:, 0] - z.log())
        # a NaN or infinite logit poisons the softmax: the model computes nothing there, so nothing is sayable (a
        # NaN compares False with everything, which would otherwise rank the target first)
        broken.append(~torch.isfinite(x.sum(dim=1)))
    vocab = logits.shape[1]
    return [Score(float("nan"), vocab, False, top_p) if bad else Score(float(a), int(k), bool(k == 1 or m < top_p),
                                                                      top_p, float(m))
            for a, k, m, bad in zip(torch.cat(lps).tolist(), torch.cat(ranks).tolist(), torch.cat(masses).tolist(),
                                    torch.cat(broken).tolist(), strict=True)]


def _common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1  # every row keeps at least one token of its own
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(0, n)


class _TailForward:
    """The decoder of a Llama-family model (llama, mistral, qwen2) run by hand for one question: the log-probability
    of a target after prompts that share a prefix. Why: `undertrained`'s verification asks it of thousands of
    prompts, and the generic forward spends a fifth of its time around the matrix products: the prefix's KV cache
    copied out to every row, the 4-D mask, an attention kernel sized for long sequences.

    Here the prefix's keys and values are computed once (batch 1) and never copied out: every row's queries attend
    to them through one product per layer, with the kv heads as the batch. The last layer runs its attention and
    MLP at each row's last position only (the other positions give it only keys and values), and the final norm and
    lm_head run on that one position. The model's own modules do the work (projections, norms, rotary, MLP), so
    the weights are the model's; `HFEngine.logprobs` checks the numbers against the generic forward on first use.
    """

    KINDS = ("llama", "mistral", "qwen2")

    def __init__(self, model: Any) -> None:
        import sys

        base = model.model
        self.layers = list(base.layers)
        self.embed, self.norm, self.rotary = base.embed_tokens, base.norm, base.rotary_emb
        self.lm_head = model.get_output_embeddings()
        att = self.layers[0].self_attn
        self.rope = sys.modules[type(att).__module__].apply_rotary_pos_emb
        cfg = model.config
        self.heads, self.kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.head_dim, self.scale = int(att.head_dim), float(att.scaling)
        window = getattr(cfg, "sliding_window", None)
        self.window = int(window) if window and getattr(cfg, "use_sliding_window", True) else None

    @classmethod
    def supports(cls, model: Any) -> bool:
        cfg = getattr(model, "config", None)
        return (getattr(cfg, "model_type", None) in cls.KINDS and hasattr(model, "model")
                and hasattr(model.model, "rotary_emb") and hasattr(model.model, "layers")
                and hasattr(model.model.norm, "variance_epsilon"))

    @staticmethod
    def _norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
        """The model's RMSNorm with its normalisation in one fused kernel (`torch.nn.functional.rms_norm`, in
        float32 as the model's own), out in the model's dtype: fewer elementwise passes, the same numbers."""
        import torch

        y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
        return norm.weight * y.to(norm.weight.dtype)

    def fits(self, n: int) -> bool:
        """A sequence of `n` tokens stays inside the sliding window, if the model has one."""
        return self.window is None or n <= self.window

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
                allowed: torch.Tensor) -> torch.Tensor:
        """q (B, heads, Tq, d) against the row's own k, v (B, kv, T, d), masked by `allowed` (broadcast to
        (B, 1, 1, Tq, T)), and the shared prefix `past` (kv, P, d) each; -> (B, Tq, heads * d)."""
        import torch

        b, _, tq, d = q.shape
        kv, g = self.kv_heads, self.heads // self.kv_heads
        qg = q.reshape(b, kv, g * tq, d)  # head h uses kv head h // g, as repeat_kv does
        own = (qg @ k.transpose(-1, -2)).view(b, kv, g, tq, -1) * self.scale
        own = own.masked_fill(~allowed, float("-inf"))
        if past is None:
            w = torch.softmax(own.float(), dim=-1).to(q.dtype)
            out = w.view(b, kv, g * tq, -1) @ v
        else:
            pk, pv = past
            qp = qg.permute(1, 0, 2, 3).reshape(kv, b * g * tq, d)  # rows fold into the product: no copy of the prefix
            shared = (qp @ pk.transpose(-1, -2)).view(kv, b, g, tq, -1).permute(1, 0, 2, 3, 4) * self.scale
            p = shared.shape[-1]
            w = torch.softmax(torch.cat([shared, own], dim=-1).float(), dim=-1).to(q.dtype)
            wp = w[..., :p].permute(1, 0, 2, 3, 4).reshape(kv, b * g * tq, p)
            out = (wp @ pv).view(kv, b, g * tq, d).permute(1, 0, 2, 3) + w[..., p:].reshape(b, kv, g * tq, -1) @ v
        return out.reshape(b, self.heads, tq, d).transpose(1, 2).reshape(b, tq, self.heads * d)

    def prefix(self, ids: Sequence[int], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values (kv, P, d) of every layer for the prefix `ids`."""
        import torch

        x = self.embed(torch.tensor([list(ids)], device=device))
        n = x.shape[1]
        cos, sin = self.rotary(x, torch.arange(n, device=device)[None])
        allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        out = []
        for layer in self.layers:
            a = layer.self_attn
            h = self._norm(layer.input_layernorm, x)
            q = a.q_proj(h).view(1, n, -1, self.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(1, n, -1, self.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(1, n, -1, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            out.append((k[0].contiguous(), v[0].contiguous()))
            x = x + a.o_proj(self._attend(q, k, v, None, allowed))
            x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x))
        return out

    def logits(self, past: list[tuple[torch.Tensor, torch.Tensor]] | None, start: int, ids: torch.Tensor,
               last: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, V) after row i's tail `ids[i, :last[i] + 1]` (right padded), the tails at
        positions start, start + 1, ... after the shared prefix `past` (None: no prefix)."""
        import torch

        b, t = ids.shape
        dev = ids.device
        x = self.embed(ids)
        cos, sin = self.rotary(x, torch.arange(start, start + t, device=dev)[None])
        rows = torch.arange(b, device=dev)
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()  # padding lies after every real token
        at_last = (torch.arange(t, device=dev)[None, :] <= last[:, None]).view(b, 1, 1, 1, t)
        cos_l, sin_l = cos[0, last][:, None], sin[0, last][:, None]  # (B, 1, d): each row's last position
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            h = self._norm(layer.input_layernorm, x)
            k = a.k_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
            pk = past[i] if past is not None else None
            if i < n - 1:
                q = a.q_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
                q, k = self.rope(q, k, cos, sin)
                x = x + a.o_proj(self._attend(q, k, v, pk, causal))
                x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x))
            else:  # the last layer: only each row's last position is read
                _, k = self.rope(k, k, cos, sin)
                xl = x[rows, last][:, None]  # (B, 1, H)
                q = a.q_proj(h[rows, last][:, None]).view(b, 1, -1, self.head_dim).transpose(1, 2)
                q, _ = self.rope(q, q, cos_l, sin_l)
                x = xl + a.o_proj(self._attend(q, k, v, pk, at_last))
                x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x))
        return self.lm_head(self._norm(self.norm, x[:, 0]))


class HFEngine:
    """A local `transformers` model.

    Args:
        model: a model folder, a .gguf file (read through transformers' GGUF loader) or a hub id.
        device: "cpu", "cuda", "cuda:1"... (default: the best present).
        dtype: "float32", "bfloat16", "float16" (default float32 on CPU, bfloat16 on CUDA).
        batch_size: rows per forward pass in `score`.
        shared_prefix: run the batch's common prefix once and reuse its KV cache (same numbers, faster).
    """

    def __init__(self, model: str | os.PathLike, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 64, shared_prefix: bool = True, trust_remote_code: bool = False,
                 allow_pickle: bool = False, tokenizer: Any = None) -> None:
        import torch

        from ..device import best_device
        from ..sources.tokenizer import load_tokenizer

        ms = parse_model_spec(model)  # a bad path or a refused pickle fails here, before anything loads
        ms.pretrained_source()
        check_weights_policy(ms, allow_pickle=allow_pickle)
        self.device = best_device(device)
        name = dtype or ("float32" if self.device.type == "cpu" else "bfloat16")
        try:
            self.dtype = getattr(torch, name)
        except AttributeError as e:
            raise VocabdriftError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from e
        self.path = str(ms)
        self.name = ms.name
        if isinstance(tokenizer, (str, os.PathLike)):  # a spec (--tokenizer), not a tokenizer object
            tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(ms.tokenizer_source(),
                                                                                 trust_remote_code=trust_remote_code)
        self.batch_size = batch_size
        self.shared_prefix = shared_prefix
        self._use(load_model(ms, device=self.device, dtype=self.dtype, trust_remote_code=trust_remote_code,
                             allow_pickle=allow_pickle))

    def _use(self, model: Any) -> None:
        """Take `model` as this engine's, with empty caches and its own tail pass."""
        self.model = model
        self._prefix: tuple[tuple[int, ...], Any] | None = None  # (ids, batch-1 KV cache) of the last prefix
        # `score`'s own decoder pass (None: the generic forward), checked against the generic one on first use
        self._tails: _TailForward | None = None
        if _TailForward.supports(model):
            try:
                self._tails = _TailForward(model)
            except (AttributeError, TypeError, ValueError) as e:  # a layout it does not know: the generic forward
                log.debug("%s: no tail pass (%s)", self.name, e)
        self._tails_checked = False
        self._tail_prefixes: dict[tuple[int, ...], Any] = {}  # prefix ids -> per-layer (k, v), a few templates'

    def cast(self, dtype: str) -> HFEngine:
        """A second engine on a copy of this model in `dtype` (the map's bfloat16 pass beside its float32 one),
        sharing the tokenizer: the checkpoint is not read, nor a GGUF dequantised, a second time."""
        import torch

        other = copy.copy(self)
        other.dtype = getattr(torch, dtype)
        other._use(copy.deepcopy(self.model).to(other.dtype))
        return other

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def close(self) -> None:
        self.model = None
        self._prefix = None
        self._tails = None
        self._tail_prefixes = {}

    # ---- scoring ------------------------------------------------------------------------------------------
    def score(self, prompts: Sequence[Sequence[int]], targets: Sequence[int], *, top_p: float = TOP_P
              ) -> list[Score]:
        """Score `targets[i]` as the next token after `prompts[i]`; batched, prefix shared when enabled.

        On a Llama-family model (llama, mistral, qwen2) the batch's shared prefix is computed once per prefix and
        kept (several templates alternate), and each row runs only its tail through `_TailForward` (1.2x the
        generic forward in float32, 1.5x in bfloat16 on this project's CPU: bench/README); the first call
        compares its first prompts with the generic forward and keeps to that one if they differ by more than
        1e-3 in log-probability (0.5 in 16-bit dtypes): a model the hand-written pass does not cover.
        """
        import torch

        self._check(prompts, targets)
        out: list[Score] = []
        tails = (self._tails is not None and bool(len(prompts)) and self.shared_prefix
                 and self._tails.fits(max(len(p) for p in prompts)))
        with torch.inference_mode():
            for s in range(0, len(prompts), self.batch_size):
                p, t = prompts[s:s + self.batch_size], targets[s:s + self.batch_size]
                out += self._tail_batch(p, t, top_p) if tails else self._score_batch(p, t, top_p)
        if tails and not self._tails_checked:
            self._tails_checked = True
            n = min(4, len(prompts))
            ref = self._score_batch(prompts[:n], targets[:n], top_p)
            worst = max(abs(a.logprob - b.logprob) for a, b in zip(ref, out[:n], strict=True))
            # 16-bit: the two passes round differently (bfloat16: up to ~0.2 apart); a pass that misreads the
            # model's layout is off by whole nats
            tol = 1e-3 if self.dtype == torch.float32 else 0.5
            if not worst <= tol:  # NaN too
                log.warning("%s: the tail pass differs from the generic forward by %.2g in log-probability; "
                            "scoring uses the generic forward", self.name, worst)
                self._tails = None
                return self.score(prompts, targets, top_p=top_p)
        return out

    def logprobs(self, prompts: Sequence[Sequence[int]], targets: Sequence[int]) -> list[float]:
        """The natural-log probability of `targets[i]` as the next token after `prompts[i]` (`score`'s)."""
        return [s.logprob for s in self.score(prompts, targets)]

    def _check(self, prompts: Sequence[Sequence[int]], targets: Sequence[int]) -> None:
        """One clear error for what no forward pass can score."""
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        if any(len(p) == 0 for p in prompts):
            raise VocabdriftError("an empty prompt cannot be scored; the template must give at least one token")
        v = self.vocab_size
        bad = [t for t in targets if not 0 <= int(t) < v]
        if bad:
            raise VocabdriftError(f"token id {bad[0]} is outside the model's vocabulary (0..{v - 1})")

    def _tail_batch(self, prompts: Sequence[Sequence[int]], targets: Sequence[int], top_p: float) -> list[Score]:
        import torch

        assert self._tails is not None
        k = _common_prefix_len(prompts) if self.shared_prefix and len(prompts) > 1 else 0
        past = None
        if k:
            key = tuple(prompts[0][:k])
            past = self._tail_prefixes.get(key)
            if past is None:
                if len(self._tail_prefixes) >= 16:
                    self._tail_prefixes.pop(next(iter(self._tail_prefixes)))
                past = self._tail_prefixes[key] = self._tails.prefix(key, self.device)
        tails = [list(p[k:]) for p in prompts]
        b, t = len(tails), max(len(x) for x in tails)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((b, t), pad, dtype=torch.long)
        for i, x in enumerate(tails):
            ids[i, : len(x)] = torch.tensor(x)
        last = torch.tensor([len(x) - 1 for x in tails], device=self.device)
        rows = self._tails.logits(past, k, ids.to(self.device), last)
        return scores_from_logits(rows, torch.tensor([int(x) for x in targets], device=self.device), top_p=top_p)

    @functools.cached_property
    def _cache_name(self) -> str:
        """The KV cache's argument (and output) name: `cache` since transformers 5.x, which warns on the older
        `past_key_values` that 4.x takes."""
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _prefix_cache(self, ids: tuple[int, ...]) -> Any:
        import torch

        if self._prefix is None or self._prefix[0] != ids:
            with torch.inference_mode():
                x = torch.tensor([ids], device=self.device)
                cache = getattr(self.model(input_ids=x, use_cache=True, logits_to_keep=1), self._cache_name)
            self._prefix = (ids, cache)
        return self._prefix[1]

    def _score_batch(self, prompts: Sequence[Sequence[int]], targets: Sequence[int], top_p: float) -> list[Score]:
        import torch

        k = _common_prefix_len(prompts) if self.shared_prefix and len(prompts) > 1 else 0
        tails = [list(p[k:]) for p in prompts]
        b, t = len(tails), max(len(x) for x in tails)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((b, t), pad, dtype=torch.long)
        mask = torch.zeros((b, k + t), dtype=torch.long)
        mask[:, :k] = 1
        for i, x in enumerate(tails):  # right padding: a row's real tokens never attend to its padding
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, k: k + len(x)] = 1
        last = torch.tensor([len(x) - 1 for x in tails])
        kwargs: dict[str, Any] = {}
        if k:
            cache = copy.deepcopy(self._prefix_cache(tuple(prompts[0][:k])))
            cache.batch_repeat_interleave(b)  # (1, heads, k, d) -> (B, heads, k, d)
            kwargs[self._cache_name] = cache
            kwargs["position_ids"] = torch.arange(k, k + t, device=self.device).expand(b, t)
        if bool((last == t - 1).all()):  # equal tails (the probe case): only the last position needs logits
            kwargs["logits_to_keep"] = 1
            last = torch.zeros_like(last)
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=bool(k),
                                **kwargs).logits  # (B, T or 1, V)
            rows = logits[torch.arange(b), last.to(self.device)]  # (B, V): each row's next-token logits
            return scores_from_logits(rows, torch.tensor(list(targets), device=self.device), top_p=top_p)

    # ---- generation ---------------------------------------------------------------------------------------
    def render(self, message: str) -> list[int]:
        """Token ids of a user message under the model's chat template (the bare text when it has none)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                           tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(message)["input_ids"]

    def context_length(self) -> int | None:
        """The positions the model was built for (max_position_embeddings and its aliases), or None if unsaid."""
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    def generate(self, prompts: Sequence[str], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 128, seed: int = 0) -> list[list[str]]:
        """`n` answers to each user message; temperature 0 is greedy. Same seed, same answers."""
        import torch

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        context = self.context_length()
        results: list[list[str]] = []
        for i, msg in enumerate(prompts):
            ids = torch.tensor([self.render(msg)], device=self.device)
            if context is not None and ids.shape[1] >= context:  # past the context the model computes nothing
                raise VocabdriftError(f"a prompt of {ids.shape[1]:,} tokens does not fit the model's context of "
                                      f"{context:,}; shorten it")
            # never past the context: a huge --max-tokens would otherwise run on (and the model extrapolate)
            budget = max_tokens if context is None else min(max_tokens, context - ids.shape[1])
            with torch.inference_mode():  # greedy decoding takes the argmax of NaN logits without a word: ask once
                first = self.model(ids).logits[0, -1]
            if not bool(torch.isfinite(first).all()):
                raise VocabdriftError(f"{self.name}: its next-token logits hold NaN/Inf, so its answers mean nothing: "
                                      "the model is broken (`vocabdrift check` names the rows)")
            answers: list[str] = []
            chunk = max(1, min(n, self.batch_size))
            for j in range(0, n, chunk):
                m = min(chunk, n - j)
                torch.manual_seed(seed + 1_000_003 * i + j)
                kw: dict[str, Any] = {"do_sample": False} if temperature <= 0 else \
                    {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                try:
                    with torch.inference_mode():
                        out = self.model.generate(ids.expand(m, -1), attention_mask=torch.ones_like(ids).expand(m, -1),
                                                  max_new_tokens=budget, pad_token_id=pad, **kw)
                except RuntimeError as e:
                    if "inf" not in str(e) and "nan" not in str(e):
                        raise
                    raise VocabdriftError(f"{self.name}: its next-token probabilities hold NaN/Inf, so nothing can be "
                                          "sampled: the model is broken (`vocabdrift check` names the rows)") from e
                answers += tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            results.append(answers)
        return results
