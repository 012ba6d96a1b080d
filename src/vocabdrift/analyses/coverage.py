"""Coverage: how often each token id is a *generation target* in a data set, and whether that predicts drift.

Pure: samples and a tokenizer object in, numpy arrays and pyarrow tables out. A sample is rendered the way a
trainer would see it (the chat template where the tokenizer has one, else plain role headers), with the character
spans whose tokens the model is trained to emit; a token is counted when it holds a character of a span
(`target_ranges`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .vocab import LANGUAGES

if TYPE_CHECKING:
    import pyarrow as pa

    from ..sources.data import Sample

Targets = Literal["assistant", "all"]
Span = tuple[int, int]
# A language whose reachable tokens are at or above the floor less often than this is called under-covered.
UNDER_COVERED_SHARE = 0.5
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ---- rendering samples as a trainer sees them -------------------------------------------------------------------

@dataclass(frozen=True)
class Rendered:
    """A sample as text, with the character spans that are generation targets (None: every token is)."""

    text: str
    spans: tuple[Span, ...] | None


class Renderer:
    """Turns `Sample`s into `Rendered` text + target spans, for one tokenizer.

    Chat templates with `{% generation %}` give the assistant spans directly; other templates are rendered whole and
    each assistant message is found in the result (plus the end-of-turn special token right after it); without a
    template, messages are written as `<|role|>\\ncontent` with EOS after each assistant turn. Prompt/completion and
    text samples get EOS appended, as TRL's SFTTrainer does.
    """

    def __init__(self, tok: Any, *, targets: Targets = "assistant", use_template: bool = True):
        if targets not in ("assistant", "all"):
            raise ValueError(f"targets must be 'assistant' or 'all', not {targets!r}")
        self.targets = targets
        tmpl = getattr(tok, "chat_template", None) if use_template else None
        if isinstance(tmpl, dict):  # several named templates: the default one
            tmpl = tmpl.get("default") or next(iter(tmpl.values()), None)
        self.template: str | None = tmpl or None
        self.generation = bool(self.template and _GENERATION_TAG.search(self.template))
        self.kwargs = dict(getattr(tok, "special_tokens_map", {}) or {})
        self._compiled = None
        if self.template is not None:
            try:  # the compiled template itself: render_jinja_template deep-copies every message on each call
                from transformers.utils.chat_template_utils import _compile_jinja_template

                self._compiled = _compile_jinja_template(self.template)
            except ImportError:
                pass
        self.eos = getattr(tok, "eos_token", None) or ""
        specials = set(getattr(tok, "all_special_tokens", []) or [])
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            specials |= {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        ends = sorted((s for s in specials if s), key=len, reverse=True)
        self._end = re.compile("|".join(map(re.escape, ends))) if ends else None

    @property
    def mode(self) -> str:
        if self.template is None:
            return "plain"
        return "template+generation" if self.generation else "template"

    def render(self, samples: Sequence[Sample]) -> list[Rendered | str]:
        """One `Rendered` per sample, or a string saying why the sample could not be rendered."""
        out: list[Rendered | str] = [""] * len(samples)
        chats = [i for i, s in enumerate(samples) if s.messages is not None]
        for i, s in enumerate(samples):
            if s.messages is not None:
                continue
            if s.text is not None:
                out[i] = Rendered(s.text + self.eos, None)
            else:
                p, c = s.prompt or "", (s.completion or "") + self.eos
                out[i] = Rendered(p + c, None if self.targets == "all" else ((len(p), len(p) + len(c)),))
        if chats:
            rendered = self._render_chats([samples[i].messages for i in chats])  # type: ignore[misc]
            for i, r in zip(chats, rendered, strict=True):
                out[i] = r
        return out

    def _render_chats(self, chats: list[list[dict[str, str]]]) -> list[Rendered | str]:
        if self.template is None:
            return [self._plain(c) for c in chats]
        try:
            return self._template_batch(chats)
        except Exception:  # one bad conversation fails the batch: render one at a time to name it
            out: list[Rendered | str] = []
            for c in chats:
                try:
                    out.extend(self._template_batch([c]))
                except Exception as e:  # jinja's TemplateError, raise_exception() in templates, TypeError ...
                    out.append(f"chat template failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return out

    def _plain(self, chat: list[dict[str, str]]) -> Rendered:
        parts: list[str] = []
        spans: list[Span] = []
        pos = 0
        for m in chat:
            head = f"<|{m['role']}|>\n"
            body = m["content"] + (self.eos if m["role"] == "assistant" else "")
            parts += [head, body, "\n"]
            if m["role"] == "assistant":
                spans.append((pos + len(head), pos + len(head) + len(body)))
            pos += len(head) + len(body) + 1
        return Rendered("".join(parts), None if self.targets == "all" else tuple(spans))

    def _template_batch(self, chats: list[list[dict[str, str]]]) -> list[Rendered | str]:
        from transformers.utils.chat_template_utils import render_jinja_template

        if self.generation and self.targets == "assistant":
            texts, indices = render_jinja_template(conversations=chats, chat_template=self.template,
                                                   return_assistant_tokens_mask=True, **self.kwargs)
            return [Rendered(t, tuple((int(a), int(b)) for a, b in idx)) for t, idx in zip(texts, indices, strict=True)]
        if self._compiled is None:
            texts, _ = render_jinja_template(conversations=chats, chat_template=self.template, **self.kwargs)
        else:
            texts = [self._compiled.render(messages=c, add_generation_prompt=False, **self.kwargs) for c in chats]
        if self.targets == "all":
            return [Rendered(t, None) for t in texts]
        return [self._find_assistant(t, c) for t, c in zip(texts, chats, strict=True)]

    def _render_one(self, chat: list[dict[str, str]]) -> str:
        if self._compiled is not None:
            return self._compiled.render(messages=chat, add_generation_prompt=False, **self.kwargs)
        from transformers.utils.chat_template_utils import render_jinja_template

        return render_jinja_template(conversations=[chat], chat_template=self.template, **self.kwargs)[0][0]

    def _find_by_markers(self, text: str, chat: list[dict[str, str]]) -> list[Span] | str | None:
        """Where each assistant message sits in `text`, by rendering the chat once more with a unique marker in
        place of each assistant message. A string if a marker is missing from that render (the template hides
        the assistant's text); None if the render with the markers replaced is not `text` (the template rewrites
        the content, e.g. strips it), so the caller falls back to searching.

        Why: a short answer ("a", " the") also occurs in the system prompt, the role headers or the question, so
        searching the text for it finds the wrong place.
        """
        tags = {i: f"\ue000{i}\ue001" for i, m in enumerate(chat) if m["role"] == "assistant"}
        try:
            marked = self._render_one([{**m, "content": tags[i]} if i in tags else m for i, m in enumerate(chat)])
        except Exception:  # a template that validates content (raise_exception) may refuse the markers
            return None
        pieces: list[str] = []
        spans: list[Span] = []
        pos = length = 0
        for i, tag in tags.items():
            at = marked.find(tag, pos)
            if at < 0:
                return "the chat template does not reproduce an assistant message's text"
            pieces += [marked[pos:at], chat[i]["content"]]
            start = length + at - pos
            length = start + len(chat[i]["content"])
            spans.append((start, length))
            pos = at + len(tag)
        pieces.append(marked[pos:])
        return spans if "".join(pieces) == text else None

    def _find_assistant(self, text: str, chat: list[dict[str, str]]) -> Rendered | str:
        answers = [m["content"] for m in chat if m["role"] == "assistant"]
        if any(text.count(a) != 1 for a in answers):  # absent, empty or found more than once: ask the template
            found = self._find_by_markers(text, chat)
            if isinstance(found, str):
                return found
            if found is not None:
                return Rendered(text, tuple(self._with_end(text, a, b) for a, b in found))
        spans: list[Span] = []
        cursor = 0
        for m in chat:
            content = m["content"]
            if m["role"] != "assistant":
                # step over the other turns too: an answer that repeats words of its question ("Repeat this
                # word: cat" -> "cat") must be found in the answer, not in the question
                at = text.find(content, cursor) if content.strip() else -1
                if at >= 0:
                    cursor = at + len(content)
                continue
            if not content:  # nothing to find (the markers, above, place an empty answer's end token)
                continue
            at = text.find(content, cursor)
            if at < 0 and content.strip():  # a template that strips the answer
                content = content.strip()
                at = text.find(content, cursor)
            if at < 0:
                return "the chat template does not reproduce an assistant message's text"
            span = self._with_end(text, at, at + len(content))
            spans.append(span)
            cursor = span[1]
        return Rendered(text, tuple(spans))

    def _with_end(self, text: str, start: int, end: int) -> Span:
        """The span extended over the special token that closes the turn right after it: it is trained too."""
        m = self._end.match(text, end) if self._end else None
        return (start, m.end() if m else end)


# ---- counting ---------------------------------------------------------------------------------------------------

def target_ranges(spans: Sequence[Span], enc: Any) -> list[tuple[int, int]]:
    """Half-open token index ranges of the tokens that hold a character of one of `spans`.

    This is THE rule for "a generation target": `coverage` counts these tokens and `sft`/`repair` train on them
    (labels), so what coverage predicts is exactly what training sees. It is transformers' assistant mask: from
    the token holding a span's first character to the token holding its last, so a token that merges the end of
    the prompt with the start of the answer ("\n\n" after "assistant\n") is a target. `enc` is the
    `tokenizers.Encoding` of the text: its `char_to_token` finds a span's first and last token without converting
    every token's offsets to Python.
    """
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if b <= a:
            continue
        first = enc.char_to_token(a)
        last = enc.char_to_token(b - 1)
        if first is None or last is None:  # a character no token covers (stripped): go by offsets
            out.extend((k, k + 1) for k, (start, _) in enumerate(enc.offsets) if a <= start < b)
            continue
        if first <= last:
            out.append((first, last + 1))
    return out


def target_ids(ids: list[int], spans: Sequence[Span] | None, enc: Any = None) -> list[int]:
    """The ids of the generation targets among `ids` (`target_ranges`; all of them when spans is None)."""
    if spans is None:
        return ids
    out: list[int] = []
    for a, b in target_ranges(spans, enc):
        out.extend(ids[a:b])
    return out


def target_mask(n: int, spans: Sequence[Span] | None, enc: Any = None) -> list[bool]:
    """Per token of an `n`-token encoding: is it a generation target (the same rule as `target_ids`)."""
    if spans is None:
        return [True] * n
    mask = [False] * n
    for a, b in target_ranges(spans, enc):
        mask[a:b] = [True] * (b - a)
    return mask


def batch_counts(per_sample: Sequence[list[int]], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, samples) for one batch, each int64 (vocab_size,): occurrences of each id, and samples holding it."""
    lengths = np.fromiter((len(a) for a in per_sample), dtype=np.int64, count=len(per_sample))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(per_sample), dtype=np.int64, count=total)
    if total and (ids.max() >= vocab_size or ids.min() < 0):
        raise ValueError(f"token id {int(ids.max())} outside a vocabulary of {vocab_size}")
    counts = np.bincount(ids, minlength=vocab_size)
    keys = np.repeat(np.arange(len(per_sample), dtype=np.int64) * vocab_size, lengths) + ids
    keys.sort()  # one entry per (sample, id) pair after dropping repeats; a sort beats a hash set here
    first = np.ones(total, dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    samples = np.bincount(keys[first] % vocab_size, minlength=vocab_size)
    return counts.astype(np.int64), samples.astype(np.int64)


def coverage_table(count: np.ndarray, samples: np.ndarray) -> pa.Table:
    """coverage.parquet: token_id, count (as a generation target), samples (samples that contain it)."""
    import pyarrow as pa

    return pa.table({"token_id": pa.array(np.arange(len(count), dtype=np.int64)),
                     "count": pa.array(np.asarray(count, dtype=np.int64)),
                     "samples": pa.array(np.asarray(samples, dtype=np.int64))})


# ---- summaries --------------------------------------------------------------------------------------------------

def _eligible(vocab: pa.Table) -> np.ndarray:
    """Tokens a data set can cover: reachable and not special (bool, (V,))."""
    return (vocab.column("reachable").to_numpy(zero_copy_only=False)
            & ~vocab.column("is_special").to_numpy(zero_copy_only=False))


def _categories(vocab: pa.Table) -> np.ndarray:
    return np.asarray(vocab.column("category").cast("string").to_pylist(), dtype=object)


def summarize_categories(coverage: pa.Table, vocab: pa.Table, *, floor: int) -> dict[str, dict[str, Any]]:
    """Per category, over its reachable non-special tokens: how many, how many at or above `floor`, zero share."""
    count = coverage.column("count").to_numpy()
    n = min(len(count), vocab.num_rows)
    count, ok, cats = count[:n], _eligible(vocab)[:n], _categories(vocab)[:n]
    out: dict[str, dict[str, Any]] = {}
    for cat in dict.fromkeys(cats[ok]):
        m = ok & (cats == cat)
        k = int(m.sum())
        out[str(cat)] = {"tokens": k, "at_or_above_floor": int((count[m] >= floor).sum()),
                         "zero_share": round(float((count[m] == 0).sum()) / k, 6) if k else 0.0}
    return dict(sorted(out.items()))


def under_covered(categories: dict[str, dict[str, Any]], *, share: float = UNDER_COVERED_SHARE) -> list[str]:
    """Languages (of LANGUAGES) whose tokens reach the floor less often than `share`."""
    return [lang for lang in LANGUAGES if lang in categories and categories[lang]["tokens"]
            and categories[lang]["at_or_above_floor"] / categories[lang]["tokens"] < share]


def below_floor(coverage: pa.Table, vocab: pa.Table, *, floor: int, cos: np.ndarray | None = None) -> pa.Table:
    """Reachable non-special tokens counted fewer than `floor` times, most at risk first: token_id, text, category,
    count. Rarest first; among equally rare tokens, with `cos` (each row's lm_head cosine, by token id) the most
    drifted first, else by id."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = min(coverage.num_rows, vocab.num_rows)
    count = coverage.column("count").to_numpy()[:n]
    idx = np.nonzero(_eligible(vocab)[:n] & (count < floor))[0]
    if cos is not None:
        c = np.nan_to_num(np.asarray(cos, dtype=np.float64)[idx], nan=-2.0)  # an undefined cosine: most at risk
        idx = idx[np.lexsort((idx, c, count[idx]))]
    else:
        idx = idx[np.lexsort((idx, count[idx]))]
    take = pa.array(idx)
    return pa.table({"token_id": pa.array(idx.astype(np.int64)),
                     "text": pc.take(vocab.column("text"), take),
                     "category": pc.take(vocab.column("category"), take).cast(pa.string()),
                     "count": pa.array(count[idx]),
                     "samples": pc.take(coverage.column("samples"), take)})


def scatter_table(coverage: pa.Table, drift: pa.Table, vocab: pa.Table) -> pa.Table:
    """Reachable non-special tokens with count, log(count+1) and lm_head cosine: ready for a scatter plot."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = min(coverage.num_rows, drift.num_rows, vocab.num_rows)
    cos = drift.column("lm_head_cos").to_numpy(zero_copy_only=False)[:n].astype(np.float64)
    ok = _eligible(vocab)[:n] & np.isfinite(cos)
    if "nonfinite" in drift.column_names:
        ok &= ~drift.column("nonfinite").to_numpy(zero_copy_only=False)[:n]
    idx = np.nonzero(ok)[0]
    count = coverage.column("count").to_numpy()[:n][idx]
    take = pa.array(idx)
    return pa.table({"token_id": pa.array(idx.astype(np.int64)),
                     "category": pc.take(vocab.column("category"), take).cast(pa.string()),
                     "count": pa.array(count.astype(np.int64)),
                     "log_count": pa.array(np.log1p(count)),
                     "lm_head_cos": pa.array(cos[idx])})


def _spearman(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    from scipy.stats import spearmanr

    n = int(len(x))
    if n < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return {"spearman_rho": None, "p_value": None, "n": n}
    r = spearmanr(x, y)
    rho, p = float(r.statistic), float(r.pvalue)
    # when nearly every token has the same count (never a target), the ranks are one big tie: a tiny p says
    # nothing about which rows drifted
    _, counts = np.unique(x, return_counts=True)
    tied = float(counts.max() / n)
    return {"spearman_rho": None if math.isnan(rho) else round(rho, 6),
            "p_value": None if math.isnan(p) else p, "n": n, "tied_share": round(tied, 4),
            "informative": tied < TIED_LIMIT}


TIED_LIMIT = 0.9  # a correlation over tokens most of which share one count (0) is not informative


def correlate(scatter: pa.Table) -> dict[str, Any]:
    """Spearman's rho between log(count+1) and lm_head cosine, overall and per category.

    A positive rho is the prediction holding: tokens rare as targets in the SFT data drifted more (lower cosine).
    Constant columns (e.g. every token unseen) give rho None.
    """
    x = scatter.column("log_count").to_numpy()
    y = scatter.column("lm_head_cos").to_numpy()
    cats = np.asarray(scatter.column("category").to_pylist(), dtype=object)
    per = {str(c): _spearman(x[cats == c], y[cats == c]) for c in sorted(set(cats.tolist()))}
    return {"overall": _spearman(x, y), "categories": per}
